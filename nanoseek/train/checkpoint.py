"""Resumable training checkpoints: the model in the HF layout, optimizer, schedule position, RNG and data state.

Layout: `<out>/checkpoints/step_00000100/{config.json, model.safetensors, optimizer.safetensors, rng.safetensors,
trainer.json, manifest.json}`. A checkpoint is written into a temporary directory, every file fsynced, then the
directory is renamed into place; `manifest.json` (sizes + sha256) is written last and checked on load, so a
truncated or corrupt checkpoint is detected and the previous one is used instead.

A distributed run (nanoseek.parallel) writes sharded checkpoints with torch.distributed.checkpoint instead: every
rank writes its shards of the model and optimizer into `dcp/`, then rank 0 adds config.json, trainer.json,
rng.safetensors and the manifest and renames the directory into place. DCP reshards on load, so a run resumes at
another world size or mesh; `export_sharded` turns one into the HF layout.
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..io import CheckpointError, build, is_sharded, load_checkpoint, read_config, save
from ..io.atomic import commit_dir
from ..io.checkpoint import SHARDED_DIR, write_config
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
    _finish(root, tmp, step, keep_last, extra_files)
    return root / f"step_{step:08d}"


def _finish(root: Path, tmp: Path, step: int, keep_last: int, extra_files: list[Path] | None) -> None:
    """Copy the extra files in, fsync everything, write the manifest last, rename into place, prune old ones."""
    for extra in extra_files or []:
        if Path(extra).is_file():
            shutil.copyfile(extra, tmp / Path(extra).name)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"step": step, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    commit_dir(tmp, root / f"step_{step:08d}")
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    root: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    keep_last: int = 2, extra_files: list[Path] | None = None,
) -> Path:
    """A sharded checkpoint of a parallelized model (every rank calls this): each rank writes its shards, rank 0
    the rest, atomically as `save_training_checkpoint`."""
    main = dist.get_rank() == 0
    tmp = root / f".step_{step:08d}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED_DIR)
    if main:
        write_config(model.config, tmp)
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {**trainer_state, "step": step, "rng": rng_meta, "world_size": dist.get_world_size()}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        _finish(root, tmp, step, keep_last, extra_files)
    dist.barrier()
    return root / f"step_{step:08d}"


def load_latest_sharded(root: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                        ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """Load the newest valid sharded checkpoint under `root` into a parallelized model and its optimizer (every rank
    calls this; DCP reshards to this run's mesh). Returns (path, trainer state, rng tensors) or None."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            if not is_sharded(path):
                raise ValueError(f"{path}: a single-process checkpoint; resume it without --parallel")
            state = json.loads((path / "trainer.json").read_text())
            rng = load_file(path / "rng.safetensors")
        except (CheckpointError, SafetensorError, OSError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
            continue
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path / SHARDED_DIR)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return path, state, rng
    return None


def load_sharded_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Transformer:
    """The whole model of a sharded checkpoint, in this process (fp32), e.g. to fine-tune from it or export it."""
    path = Path(path)
    verify_checkpoint(path)
    if not is_sharded(path):
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    model = build(read_config(path), torch.float32, device, init=False)
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=path / SHARDED_DIR, no_dist=True)
    model.load_state_dict(sd)
    return model


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Transformer:
    """The fp32 model of a checkpoint directory: the HF layout, or a distributed run's sharded checkpoint."""
    return load_sharded_model(path, device) if is_sharded(path) else load_checkpoint(path, torch.float32, device)


def export_sharded(path: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """The model of a sharded checkpoint, gathered in this one process, written in the Hugging Face layout (with the
    checkpoint's tokenizer.json when it has one)."""
    path = Path(path)
    dest = save(load_sharded_model(path), out, dtype=dtype)
    if (path / "tokenizer.json").is_file():
        shutil.copyfile(path / "tokenizer.json", dest / "tokenizer.json")
    return dest


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
            if is_sharded(path):
                raise ValueError(f"{path}: a sharded checkpoint of a distributed run: resume it with --parallel (any "
                                 f"mesh, dp=1 in one process too), or turn it into a model with `nanoseek export`")
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
