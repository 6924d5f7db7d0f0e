"""Training hyper-parameters (one dataclass, JSON-serialisable) and `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    check_fields,
    field_names,
    override,
    param,
    parse_assignments,
    unknown_key,
)
from ..model.config import ModelConfig


@dataclass
class TrainConfig:
    """The V3 pre-training recipe (V3 §4.2), with the schedule's phases as fractions of the run.

    Each field declares its allowed values once (`param(default, range)`, nanoseek.config)."""

    steps: int = param(300, POSITIVE)
    batch_size: int = param(16, POSITIVE)  # sequences per optimizer step at the end of the ramp
    micro_batch_size: int = param(16, POSITIVE)  # sequences per forward/backward (gradient accumulation above it)
    seq_len: int = param(256, POSITIVE)
    # AdamW
    lr: float = param(3e-3, POSITIVE)  # peak; V3 uses 2.2e-4 at 671B
    betas: tuple[float, float] = param((0.9, 0.95), Range(0, 1, hi_open=True))
    eps: float = param(1e-8, POSITIVE)
    weight_decay: float = param(0.1, NON_NEGATIVE)
    decay_embeddings: bool = False  # no decay on norms, biases and embeddings unless asked
    bf16_moments: bool = False
    grad_clip: float = param(1.0, POSITIVE)
    # V3 LR shape: warm-up -> constant -> cosine to 10% -> constant 10% -> constant 3.3% (fractions of the run:
    # 2K steps warm-up; constant to 10T of 14.8T tokens; cosine over 4.3T; 2.2e-5 for 333B; 7.3e-6 for 167B)
    warmup_frac: float = param(0.05, FRACTION)
    constant_until: float = param(0.676, FRACTION)
    cosine_until: float = param(0.966, FRACTION)
    tail_until: float = param(0.989, FRACTION)
    min_lr_ratio: float = param(0.1, FRACTION)  # 2.2e-5 / 2.2e-4
    final_lr_ratio: float = param(0.0332, FRACTION)  # 7.3e-6 / 2.2e-4
    # batch-size ramp: 3072 -> 15360 sequences over the first 469B of 14.8T tokens
    batch_ramp_frac: float = param(0.032, FRACTION)
    batch_ramp_start_ratio: float = param(0.2, Range(0, 1, lo_open=True))
    # MTP lambda: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda: float = param(0.3, NON_NEGATIVE)
    mtp_lambda_late: float = param(0.1, NON_NEGATIVE)
    mtp_lambda_switch: float = param(0.676, FRACTION)
    # auxiliary-loss-free balancing: bias speed gamma, 0 for the last 500B tokens
    bias_update_speed: float = param(0.001, NON_NEGATIVE)
    bias_freeze_frac: float = param(0.966, FRACTION)
    # alpha of the complementary sequence-wise balance loss (V3 §2.1.2; 0.0001 in V3 §4.2), set on the MoE layers
    # for training (the model config's aux_loss_alpha is not used by the trainer); 0 disables the loss
    aux_loss_alpha: float = param(1e-4, NON_NEGATIVE)
    # logging / eval / checkpoints
    log_every: int = param(1, POSITIVE)
    eval_every: int = param(50, POSITIVE)
    eval_batches: int = param(8, POSITIVE)
    ckpt_every: int = param(100, POSITIVE)
    keep_last: int = param(2, POSITIVE)
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    fp8: bool = False  # FP8 GEMMs (attention projections, MLPs, experts) with fine-grained scales (V3 §3.3)
    fp8_pow2_scale: bool = False  # round FP8 scales up to powers of two (ue8m0)
    # how FP8 GEMMs run (nanoseek.fp8.gemm)
    fp8_backend: Literal["auto", "emulate", "rowwise", "blockwise"] = "auto"
    # the BF16 baseline on a CPU: the GEMMs FP8 would quantise see bf16-rounded operands (fp32 accumulation;
    # nanoseek.fp8.bf16), the rest stays fp32 -- for studying FP8 vs BF16 numerics without bf16 hardware
    emulate_bf16: bool = False
    init_from: str | None = None  # start from this checkpoint's weights (fine-tuning: SFT) instead of random init

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self)  # types and per-field ranges; betas lists become tuples
        fr = [self.warmup_frac, self.constant_until, self.cosine_until, self.tail_until]
        if not all(a <= b for a, b in itertools.pairwise(fr)):
            raise ConfigError("schedule fractions must increase: warmup_frac <= constant_until <= cosine_until <= "
                              f"tail_until, got {fr}")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size ({self.micro_batch_size}) > batch_size ({self.batch_size})")
        if self.fp8 and self.emulate_bf16:
            raise ConfigError("fp8 and emulate_bf16 are two formats for the same GEMMs: choose one")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = field_names(cls)
        for key in d:
            if key not in names:
                raise unknown_key(key, names, "training field")
        return cls(**d)


def apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, sets: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` overrides; a key names a TrainConfig field or a ModelConfig field (`model.` optional).

    Values are typed by the field's annotation (nanoseek.config): `betas=0.9,0.95`, `init_from=none`."""
    m_fields = field_names(ModelConfig)
    t_fields = field_names(TrainConfig)
    m_changes: dict[str, Any] = {}
    t_changes: dict[str, str] = {}
    for key, text in parse_assignments(sets, "--set").items():
        if key.startswith("model."):
            key = key[len("model."):]
            if key not in m_fields:
                raise unknown_key(key, m_fields, "model config field")
            m_changes[key] = ModelConfig.parse_field(key, text)
        elif key in t_fields:
            t_changes[key] = text
        elif key in m_fields:
            m_changes[key] = ModelConfig.parse_field(key, text)
        else:
            raise unknown_key(key, t_fields + m_fields, "training or model config field")
    if m_changes:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **m_changes}, strict=True)
    if t_changes:
        train_cfg = override(train_cfg, t_changes)
    return model_cfg, train_cfg


def write_resolved(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Every run writes its resolved configuration next to its outputs."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), **extra}
    (out / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
