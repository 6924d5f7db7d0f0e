"""The DeepSeek-V3 model: config, MLA, DeepSeekMoE, MTP."""

from .attention import MLA
from .config import PRESETS, ConfigError, ModelConfig, preset
from .model import MTP, Block, ModelOutput, Positions, Stage, Transformer
from .moe import MLP, Experts, Gate, MoE, dispatch_combine, update_bias
from .norm import RMSNorm

__all__ = [
    "MLA", "MLP", "MTP", "PRESETS", "Block", "ConfigError", "Experts", "Gate", "ModelConfig", "ModelOutput",
    "MoE", "Positions", "RMSNorm", "Stage", "Transformer", "dispatch_combine", "preset", "update_bias",
]
