"""Training hyper-parameters (one dataclass, JSON-serialisable) and `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.config import ConfigError, ModelConfig


@dataclass
class TrainConfig:
    """The V3 pre-training recipe (V3 §4.2), with the schedule's phases as fractions of the run."""

    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step at the end of the ramp
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation above it)
    seq_len: int = 256
    # AdamW
    lr: float = 3e-3  # peak; V3 uses 2.2e-4 at 671B
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # no decay on norms, biases and embeddings unless asked
    bf16_moments: bool = False
    grad_clip: float = 1.0
    # V3 LR shape: warm-up -> constant -> cosine to 10% -> constant 10% -> constant 3.3% (fractions of the run:
    # 2K steps warm-up; constant to 10T of 14.8T tokens; cosine over 4.3T; 2.2e-5 for 333B; 7.3e-6 for 167B)
    warmup_frac: float = 0.05
    constant_until: float = 0.676
    cosine_until: float = 0.966
    tail_until: float = 0.989
    min_lr_ratio: float = 0.1  # 2.2e-5 / 2.2e-4
    final_lr_ratio: float = 0.0332  # 7.3e-6 / 2.2e-4
    # batch-size ramp: 3072 -> 15360 sequences over the first 469B of 14.8T tokens
    batch_ramp_frac: float = 0.032
    batch_ramp_start_ratio: float = 0.2
    # MTP lambda: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch: float = 0.676
    # auxiliary-loss-free balancing: bias speed gamma, 0 for the last 500B tokens
    bias_update_speed: float = 0.001
    bias_freeze_frac: float = 0.966
    aux_loss_alpha: float | None = None  # None: the model config's value; 0 disables the sequence-wise loss
    # logging / eval / checkpoints
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    fp8: bool = False  # FP8 GEMMs (attention projections, MLPs, experts) with fine-grained scales (V3 §3.3)
    fp8_pow2_scale: bool = False  # round FP8 scales up to powers of two (ue8m0)
    fp8_backend: str = "auto"  # auto | emulate | rowwise | blockwise (nanoseek.fp8.gemm): how FP8 GEMMs run
    # the BF16 baseline on a CPU: the GEMMs FP8 would quantise see bf16-rounded operands (fp32 accumulation;
    # nanoseek.fp8.bf16), the rest stays fp32 -- for studying FP8 vs BF16 numerics without bf16 hardware
    emulate_bf16: bool = False
    init_from: str | None = None  # start from this checkpoint's weights (fine-tuning: SFT) instead of random init

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "grad_clip", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        fr = [self.warmup_frac, self.constant_until, self.cosine_until, self.tail_until]
        if not all(0 <= a <= b <= 1 for a, b in zip([0, *fr], [*fr, 1], strict=True)):
            raise ConfigError(f"schedule fractions must increase within [0, 1]: {fr}")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size ({self.micro_batch_size}) > batch_size ({self.batch_size})")
        if self.fp8_backend not in ("auto", "emulate", "rowwise", "blockwise"):
            raise ConfigError(f"fp8_backend must be auto, emulate, rowwise or blockwise, got {self.fp8_backend!r}")
        if self.fp8 and self.emulate_bf16:
            raise ConfigError("fp8 and emulate_bf16 are two formats for the same GEMMs: choose one")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training field(s): {', '.join(unknown)}")
        return cls(**d)


def parse_value(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, true/false/null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, sets: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` overrides; a key names a TrainConfig field or a ModelConfig field (`model.` optional)."""
    m_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    t_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_changes: dict[str, Any] = {}
    t_changes: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        val = parse_value(value)
        if key.startswith("model."):
            key = key[len("model."):]
            if key not in m_fields:
                raise ConfigError(f"--set {key}: not a model config field")
            m_changes[key] = val
        elif key in t_fields:
            t_changes[key] = val
        elif key in m_fields:
            m_changes[key] = val
        else:
            raise ConfigError(f"--set {key}: not a training or model config field")
    if m_changes:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **m_changes}, strict=True)
    if t_changes:
        train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), **t_changes})
    return model_cfg, train_cfg


def write_resolved(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Every run writes its resolved configuration next to its outputs."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), **extra}
    (out / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
