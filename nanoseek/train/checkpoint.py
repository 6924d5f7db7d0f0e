"""Resumable training checkpoints: the model in the HF layout, optimizer, schedule position, RNG and data state.

Layout: `<out>/checkpoints/step_00000100/{config.json, model.safetensors, optimizer.safetensors, rng.safetensors,
trainer.json, manifest.json}`. A checkpoint is written into a temporary directory, every file fsynced, then the
directory is renamed into place; `manifest.json` (sizes + sha256) is written last and checked on load, so a
truncated or corrupt checkpoint is detected and the previous one is used instead (`--resume` with checkpoints none
of which is usable is an error, not a fresh start).

Every checkpoint records the id of its run (`run_id` in trainer.json; a resumed run keeps the id of the checkpoint it
resumed). Writing checkpoint N removes only the same run's checkpoints older than N beyond the newest `keep_last`:
never the one just written, a higher-numbered one, another run's, or one whose trainer.json cannot be read.

A distributed run (nanoseek.parallel) writes sharded checkpoints with torch.distributed.checkpoint instead: every
rank writes its shards of the model and optimizer into `dcp/`, then rank 0 adds config.json, trainer.json,
rng.safetensors and the manifest and renames the directory into place. DCP reshards on load, so a run resumes at
another world size or mesh; `export_sharded` turns one into the HF layout.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..config import ConfigError
from ..io import (
    MANIFEST,
    CheckpointError,
    build,
    check_finite,
    is_sharded,
    load_checkpoint,
    read_config,
    save,
    verify_manifest,
)
from ..io.atomic import commit_dir
from ..io.checkpoint import SHARDED_DIR, file_sha256, write_config
from ..io.paths import copy_tokenizer_files
from ..model import Transformer
from .optim import optimizer_from_tensors, optimizer_to_tensors


class RunDirError(ConfigError):
    """An output directory that does not fit the request: a fresh run into one that holds checkpoints of an earlier
    run, or a resume where checkpoints exist but none is usable. The one-line message names the directory and what
    to do (the command line prints it without a traceback)."""


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
    _finish(root, tmp, step, keep_last, extra_files, trainer_state.get("run_id"))
    return root / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step_XXXXXXXX` checkpoint directory (None for another name)."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _same_run(path: Path, run_id: str | None) -> bool:
    """Whether checkpoint `path` was written by run `run_id` (None: a checkpoint written without a run id). False
    when its trainer.json cannot be read: a checkpoint that cannot be attributed is never removed."""
    try:
        state = json.loads((path / "trainer.json").read_text())
        return isinstance(state, dict) and state.get("run_id") == run_id
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def prune_checkpoints(root: Path, step: int, keep_last: int, run_id: str | None) -> list[Path]:
    """Remove run `run_id`'s checkpoints older than `step` beyond the newest `keep_last` (checkpoint `step` itself
    counted); returns the removed paths. Checkpoints with a higher step, of another run, or that cannot be
    attributed (an unreadable trainer.json) are kept."""
    older = [p for p in list_checkpoints(root)
             if (s := checkpoint_step(p)) is not None and s < step and _same_run(p, run_id)]
    doomed = older[: max(len(older) - (keep_last - 1), 0)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _finish(root: Path, tmp: Path, step: int, keep_last: int, extra_files: list[Path] | None,
            run_id: str | None) -> None:
    """Copy the extra files in, fsync everything, write the manifest last, rename into place, prune this run's
    older ones."""
    for extra in extra_files or []:
        if Path(extra).is_file():
            shutil.copyfile(extra, tmp / Path(extra).name)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"step": step, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    commit_dir(tmp, root / f"step_{step:08d}")
    prune_checkpoints(root, step, keep_last, run_id)


def save_sharded_checkpoint(
    root: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    keep_last: int = 2, extra_files: list[Path] | None = None, keys: set[str] | None = None,
) -> Path:
    """A sharded checkpoint of a parallelized model (every rank calls this): each rank writes its shards, rank 0
    the rest, atomically as `save_training_checkpoint`. `keys`: the model state-dict names this rank holds (a
    pipeline rank; default all)."""
    main = dist.get_rank() == 0
    tmp = root / f".step_{step:08d}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer, keys)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED_DIR)
    if main:
        write_config(model.config, tmp)
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {**trainer_state, "step": step, "rng": rng_meta, "world_size": dist.get_world_size()}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        _finish(root, tmp, step, keep_last, extra_files, trainer_state.get("run_id"))
    dist.barrier()
    return root / f"step_{step:08d}"


def _state_dicts(model: Transformer, optimizer: torch.optim.Optimizer, keys: set[str] | None, flat: bool = True,
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and optimizer state dicts of this rank (the model's restricted to `keys`). `flat`: the optimizer's
    hyper-parameters stored per parameter name, not per group, so that ranks whose groups hold different parameters
    (pipeline stages) do not write the same group keys; checkpoints before it stored them per group index."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=flat))
    if keys is not None:
        model_sd = {k: v for k, v in model_sd.items() if k in keys}
    return model_sd, optim_sd


def load_latest_sharded(root: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                        keys: set[str] | None = None,
                        ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """Load the newest valid sharded checkpoint under `root` into a parallelized model and its optimizer (every rank
    calls this; DCP reshards to this run's mesh; `keys`: the model state-dict names this rank holds). Returns (path,
    trainer state, rng tensors); None when `root` holds no checkpoint; RunDirError when it holds some but none is
    usable. Invalid newer ones are skipped with a warning."""
    found = list_checkpoints(root)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
            if not is_sharded(path):
                raise ValueError(f"{path}: a single-process checkpoint; resume it without --parallel")
            state = json.loads((path / "trainer.json").read_text())
            rng = load_file(path / "rng.safetensors")
        except (CheckpointError, SafetensorError, OSError, json.JSONDecodeError) as e:
            skipped.append(f"{path.name}: {e}")
            continue
        stored = dcp.FileSystemReader(path / SHARDED_DIR).read_metadata().state_dict_metadata
        flat = not any(k.startswith("optim.param_groups.0.") for k in stored)
        model_sd, optim_sd = _state_dicts(model, optimizer, keys, flat)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path / SHARDED_DIR)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=StateDictOptions(strict=keys is None, flatten_optimizer_state_dict=flat))
        _warn_skipped(skipped, path)
        return path, state, rng
    _no_usable(root, found, skipped)
    return None


def _warn_skipped(skipped: list[str], used: Path) -> None:
    for why in skipped:
        warnings.warn(f"skipping checkpoint {why}", stacklevel=3)
    if skipped:
        warnings.warn(f"resuming from {used.name}, the newest valid checkpoint", stacklevel=3)


def _no_usable(root: Path, found: list[Path], skipped: list[str]) -> None:
    """RunDirError when `root` holds checkpoints but none could be resumed (nothing when it holds none)."""
    if found:
        raise RunDirError(f"{root}: cannot resume: none of its {len(found)} checkpoint(s) is usable "
                          f"({'; '.join(skipped)}); restore a valid checkpoint, or move {root} away to start afresh")


def load_sharded_model(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                       verify: bool = True) -> Transformer:
    """The whole model of a sharded checkpoint, in this process (fp32), e.g. to fine-tune from it or export it.
    `verify`: check its model files against its manifest first; weights holding NaN or infinity are refused in any
    case."""
    path = Path(path)
    if verify:
        verify_manifest(path, required=True, model_only=True)
    if not is_sharded(path):
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    model = build(read_config(path), torch.float32, device, init=False)
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=path / SHARDED_DIR, no_dist=True)
    for name, t in sd.items():
        check_finite(name, t, path)
    model.load_state_dict(sd)
    return model


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu", verify: bool = True) -> Transformer:
    """The fp32 model of a checkpoint directory: the HF layout, or a distributed run's sharded checkpoint (checked
    against its manifest when it has one and `verify`)."""
    if is_sharded(path):
        return load_sharded_model(path, device, verify)
    return load_checkpoint(path, torch.float32, device, verify=verify)


def export_sharded(path: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """The model of a sharded checkpoint, gathered in this one process, written in the Hugging Face layout (with the
    checkpoint's tokenizer files when it has them)."""
    path = Path(path)
    dest = save(load_sharded_model(path), out, dtype=dtype)
    copy_tokenizer_files(path, dest)
    return dest


def list_checkpoints(root: Path) -> list[Path]:
    """The `step_*` directories under `root` (valid or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present, complete and unchanged."""
    verify_manifest(path, required=True)


def check_fresh_out_dir(root: Path) -> None:
    """RunDirError if checkpoint folder `root` already holds checkpoints (valid or not): a fresh run writing there
    would mix its checkpoints with an earlier run's (and `--resume` would later pick whichever is newest)."""
    found = list_checkpoints(root)
    if found:
        names = found[0].name if len(found) == 1 else f"{found[0].name} .. {found[-1].name}"
        raise RunDirError(f"{root.parent}: holds {len(found)} checkpoint(s) of an earlier run ({names} in {root}); "
                          f"pass --resume to continue it, or use a fresh --out")


def load_latest(root: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                ) -> tuple[Path, Transformer, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]] | None:
    """(path, model, optimizer tensors, trainer state, rng tensors) of the newest valid checkpoint under `root`; None
    when it holds no checkpoint; RunDirError when it holds some but none is usable. Invalid newer checkpoints
    (incomplete, not matching their manifest, non-finite weights) are skipped with a warning."""
    found = list_checkpoints(root)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
            if is_sharded(path):
                raise ValueError(f"{path}: a sharded checkpoint of a distributed run: resume it with --parallel (any "
                                 f"mesh, dp=1 in one process too), or turn it into a model with `nanoseek export`")
            model = load_checkpoint(path, dtype=dtype, device=device, verify=False)  # verified just above
            opt = load_file(path / "optimizer.safetensors")
            rng = load_file(path / "rng.safetensors")
            state = json.loads((path / "trainer.json").read_text())
        except (CheckpointError, SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
            skipped.append(f"{path.name}: {e}")
            continue
        _warn_skipped(skipped, path)
        return path, model, opt, state, rng
    _no_usable(root, found, skipped)
    return None


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    optimizer_from_tensors(optimizer, {k: v.to(device) if v.dim() else v for k, v in tensors.items()}, meta)
