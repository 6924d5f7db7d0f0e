"""Checkpoint interop: the Hugging Face DeepSeek-V3 layout (sharded safetensors, per-expert keys, FP8)."""

from .checkpoint import (
    CheckpointError,
    build,
    checkpoint_layout,
    is_sharded,
    load_checkpoint,
    read_config,
    save,
)

__all__ = ["CheckpointError", "build", "checkpoint_layout", "is_sharded", "load_checkpoint", "read_config", "save"]
