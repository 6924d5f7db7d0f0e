"""Resumable training checkpoints: the model in the HF layout, optimizer, schedule position, RNG and data state.

Layout: `<out>/checkpoints/step_00000100/{config.json, model.safetensors, optimizer.safetensors, rng.safetensors,
trainer.json, manifest.json}`. A checkpoint is written into a temporary directory, every file fsynced, then the
directory is renamed into place; `manifest.json` (sizes + sha256) is written last and checked on load, so a
truncated or corrupt checkpoint is detected and the previous one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import CheckpointError, load_checkpoint, save
from ..io.atomic import commit_dir
from ..model import Transformer
from .optim import optimizer_from_tensors, optimizer_to_tensors

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_checkpoint(
    root: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    keep_last: int = 2, extra_files: list[Path] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep_last`. `extra_files` (e.g. the
    tokenizer.json, so that the checkpoint alone can be served) are copied in when they exist."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save(model, tmp)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
    for extra in extra_files or []:
        if Path(extra).is_file():
            shutil.copyfile(extra, tmp / Path(extra).name)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"step": step, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    commit_dir(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present, complete and unchanged."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{mf}: malformed ({e})") from None
    for name, info in manifest.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: checksum mismatch (corrupt)")


def load_latest(root: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                ) -> tuple[Path, Transformer, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]] | None:
    """(path, model, optimizer tensors, trainer state, rng tensors) of the newest valid checkpoint, or None.
    Invalid newer checkpoints are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            model = load_checkpoint(path, dtype=dtype, device=device)
            opt = load_file(path / "optimizer.safetensors")
            rng = load_file(path / "rng.safetensors")
            state = json.loads((path / "trainer.json").read_text())
        except (CheckpointError, SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
            continue
        return path, model, opt, state, rng
    return None


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    optimizer_from_tensors(optimizer, {k: v.to(device) if v.dim() else v for k, v in tensors.items()}, meta)
