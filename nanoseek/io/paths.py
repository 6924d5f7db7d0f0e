"""Finding a checkpoint and its tokenizer from what a user types: a checkpoint directory or a training output."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CheckpointError, is_sharded, verify_manifest

if TYPE_CHECKING:
    from ..data import Tokenizer


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """A model directory: config.json beside safetensors weights (the HF layout) or a distributed run's shards. (A
    training output has a config.json too -- the run's resolved configuration -- but no weights beside it.)"""
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or is_sharded(p))


def find_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Path:
    """The checkpoint `path` names, to load its model: a checkpoint directory itself (its model files checked against
    its manifest.json when it has one and `verify`), or for a training output (or its checkpoints/ folder) its newest
    checkpoint whose model files are complete and match its manifest; newer ones that are not are skipped with a
    warning naming them, as `--resume` does. `verify=False` trusts the newest checkpoint without reading it.
    CheckpointError when there is none."""
    p = Path(path)
    if is_checkpoint_dir(p):
        if verify:
            verify_manifest(p, required=False, model_only=True)
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(d for d in root.glob("step_*") if d.is_dir()) if root.is_dir() else []
    if not steps:
        raise CheckpointError(f"{p}: no checkpoint here (expected config.json + *.safetensors, or "
                              f"checkpoints/step_*/)")
    skipped: list[str] = []
    for d in reversed(steps):
        try:
            if not (d / "config.json").is_file():
                raise CheckpointError(f"{d}: no config.json (incomplete checkpoint)")
            if verify:
                verify_manifest(d, required=True, model_only=True)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            warnings.warn(f"skipping {len(skipped)} newer invalid checkpoint(s) of {p} ({'; '.join(skipped)}); "
                          f"using {d.name}", stacklevel=2)
        return d
    raise CheckpointError(f"{p}: no valid checkpoint among {len(steps)} ({'; '.join(skipped)})")


def resolve_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Path:
    """`find_checkpoint` for the command line: a missing or invalid checkpoint ends the program with one line."""
    try:
        return find_checkpoint(path, verify)
    except CheckpointError as e:
        raise SystemExit(f"nanoseek: {e}") from None


def load_tokenizer(ckpt: Path, explicit: str | None) -> Tokenizer:
    """`explicit` if given, else the checkpoint's own tokenizer.json."""
    from ..data import Tokenizer  # data imports io.atomic: imported here, not at module level

    candidates = [Path(explicit)] if explicit else [ckpt / "tokenizer.json"]
    for c in candidates:
        if c.exists():
            return Tokenizer.load(c)
    raise SystemExit(f"nanoseek: no tokenizer.json in {ckpt}; pass --tokenizer PATH")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what a checkpoint carries of its tokenizer


def copy_tokenizer_files(src: str | Path, dest: str | Path) -> None:
    """The tokenizer files `src` has, copied into `dest`."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dest) / name)
