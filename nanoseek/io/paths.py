"""Finding a checkpoint and its tokenizer from what a user types: a checkpoint directory or a training output."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data import Tokenizer


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (with config.json), or a training output whose newest checkpoint is used."""
    p = Path(path)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(d for d in root.glob("step_*") if (d / "config.json").is_file())
    if steps:
        return steps[-1]
    raise SystemExit(f"nanoseek: {p}: no checkpoint here (expected config.json + *.safetensors, or "
                     f"checkpoints/step_*/)")


def load_tokenizer(ckpt: Path, explicit: str | None) -> Tokenizer:
    """`explicit` if given, else the checkpoint's own tokenizer.json."""
    from ..data import Tokenizer  # data imports io.atomic: imported here, not at module level

    candidates = [Path(explicit)] if explicit else [ckpt / "tokenizer.json"]
    for c in candidates:
        if c.exists():
            return Tokenizer.load(c)
    raise SystemExit(f"nanoseek: no tokenizer.json in {ckpt}; pass --tokenizer PATH")
