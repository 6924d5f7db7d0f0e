"""nanoseek: DeepSeek-V3 / R1 in plain PyTorch.

    import nanoseek
    model = nanoseek.load("tiny")              # a preset, a config.json, an HF-layout checkpoint directory, a
                                                # distributed run's sharded checkpoint, or a GGUF file
    logits = model(input_ids).logits            # [B, S, V]
    nanoseek.save(model, "out/ckpt")            # Hugging Face DeepSeek-V3 layout
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import CheckpointError, build, is_sharded, load_checkpoint, save
from .model import PRESETS, ConfigError, ModelConfig, Transformer, preset

__version__ = "0.1.0"


def load(
    path_or_preset: str | os.PathLike[str] | ModelConfig, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, keep_fp8: bool = False, verify: bool = True, int8: bool = False,
) -> Transformer:
    """The model for a checkpoint directory or a llama.cpp GGUF file (`.gguf`, its F16 / BF16 / Q8_0 tensors
    dequantised; weights loaded), a config.json or preset name / ModelConfig (randomly initialised). dtype defaults
    to float32; device to the CPU. `keep_fp8`: the attention / MLP / expert weights stay in FP8 with 128x128 block
    scales (as the FP8 release) and are dequantised in each forward. `int8`: every matrix but the embedding is held
    as int8 codes with per-row scales and read by an int8 GEMV (nanoseek.fp8.int8; a GGUF is quantised tensor by
    tensor as it is read).

    A training output (or its checkpoints/ folder) loads its newest valid checkpoint: newer ones that are incomplete
    or do not match their manifest are skipped with a warning. A checkpoint with a manifest.json is checked against
    it (`verify=False` skips that, for speed); weights holding NaN or infinite values are refused in any case
    (CheckpointError naming the tensor)."""
    if keep_fp8 and int8:
        raise ValueError("keep_fp8 and int8 are two weight formats: choose one")
    if isinstance(path_or_preset, ModelConfig):
        model = build(path_or_preset, dtype, device)
    elif Path(path_or_preset).is_dir():
        from .io.paths import find_checkpoint

        ckpt = find_checkpoint(path_or_preset, verify)  # verified here, so not again below
        if not is_sharded(ckpt):
            model = load_checkpoint(ckpt, dtype, device, keep_fp8=keep_fp8, verify=False)
        else:
            from .train.checkpoint import load_sharded_model  # a distributed run's sharded checkpoint

            model = load_sharded_model(ckpt, device or "cpu", verify=False).to(dtype or torch.float32)
    elif Path(path_or_preset).is_file() and Path(path_or_preset).suffix == ".gguf":
        from .io.gguf import read_gguf

        model = read_gguf(path_or_preset, dtype, device, int8=int8)
    elif Path(path_or_preset).is_file():
        model = build(ModelConfig.from_json(path_or_preset), dtype, device)
    elif str(path_or_preset) in PRESETS:
        model = build(preset(str(path_or_preset)), dtype, device)
    else:
        raise FileNotFoundError(
            f"{path_or_preset}: not a checkpoint directory, a config.json, or a preset ({', '.join(PRESETS)})"
        )
    if keep_fp8:
        from .fp8.weights import quantize_model_weights

        model = quantize_model_weights(model)  # no-op when load_checkpoint kept them already
    if int8:
        from .fp8.int8 import quantize_int8

        model = quantize_int8(model)  # no-op when read_gguf made the int8 modules already
    return model


__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "Transformer", "__version__", "load", "preset", "save",
]
