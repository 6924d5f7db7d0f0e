"""The V3 schedules scaled to a run of `steps` optimizer steps (V3 §4.2)."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, constant, cosine to min_lr_ratio,
    constant min, then the final constant."""
    f = step / max(cfg.steps, 1)
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if f < cfg.constant_until:
        return cfg.lr
    if f < cfg.cosine_until:
        t = (f - cfg.constant_until) / max(cfg.cosine_until - cfg.constant_until, 1e-12)
        lo = cfg.min_lr_ratio
        return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))
    if f < cfg.tail_until:
        return cfg.lr * cfg.min_lr_ratio
    return cfg.lr * cfg.final_lr_ratio


def batch_at(cfg: TrainConfig, step: int) -> int:
    """Sequences in optimizer step `step`: linear ramp from start_ratio * batch to batch, in whole micro-batches
    where possible."""
    ramp = cfg.batch_ramp_frac * cfg.steps
    full = cfg.batch_size
    if ramp < 1 or step >= ramp:
        return full
    start = max(1, round(cfg.batch_ramp_start_ratio * full))
    b = start + (full - start) * step / ramp
    return max(1, min(full, int(b)))


def mtp_lambda_at(cfg: TrainConfig, step: int) -> float:
    return cfg.mtp_lambda if step / max(cfg.steps, 1) < cfg.mtp_lambda_switch else cfg.mtp_lambda_late


def bias_speed_at(cfg: TrainConfig, step: int) -> float:
    return cfg.bias_update_speed if step / max(cfg.steps, 1) < cfg.bias_freeze_frac else 0.0
