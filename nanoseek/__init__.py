"""nanoseek: DeepSeek-V3 / R1 in plain PyTorch.

    import nanoseek
    model = nanoseek.load("tiny")              # a preset, a config.json, or an HF-layout checkpoint directory
    logits = model(input_ids).logits            # [B, S, V]
    nanoseek.save(model, "out/ckpt")            # Hugging Face DeepSeek-V3 layout
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import CheckpointError, build, load_checkpoint, save
from .model import PRESETS, ConfigError, ModelConfig, Transformer, preset

__version__ = "0.1.0"


def load(
    path_or_preset: str | os.PathLike[str] | ModelConfig, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Transformer:
    """The model for a checkpoint directory (weights loaded), a config.json or preset name / ModelConfig
    (randomly initialised). dtype defaults to float32; device to the CPU."""
    if isinstance(path_or_preset, ModelConfig):
        return build(path_or_preset, dtype, device)
    p = Path(path_or_preset)
    if p.is_dir():
        return load_checkpoint(p, dtype, device)
    if p.is_file():
        return build(ModelConfig.from_json(p), dtype, device)
    if str(path_or_preset) in PRESETS:
        return build(preset(str(path_or_preset)), dtype, device)
    raise FileNotFoundError(
        f"{path_or_preset}: not a checkpoint directory, a config.json, or a preset ({', '.join(PRESETS)})"
    )


__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "Transformer", "__version__", "load", "preset", "save",
]
