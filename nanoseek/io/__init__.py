"""Checkpoint interop: the Hugging Face DeepSeek-V3 layout (sharded safetensors, per-expert keys, FP8)."""

from .checkpoint import (
    MANIFEST,
    CheckpointError,
    build,
    check_finite,
    checkpoint_layout,
    is_sharded,
    load_checkpoint,
    read_config,
    save,
    verify_manifest,
)

__all__ = ["MANIFEST", "CheckpointError", "build", "check_finite", "checkpoint_layout", "is_sharded",
           "load_checkpoint", "read_config", "save", "verify_manifest"]
