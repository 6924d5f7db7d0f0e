"""The V3 schedules (V3 §4.2) as fractions of the run.

A step-driven run (`progress=None`) measures the run in optimizer steps: step `step` of `cfg.steps`. A time-budgeted
run (nanoseek.train.loop.TimeBudget) passes `progress`, the fraction of its budget spent where the step is expected to
end, so that the phases (warm-up, constant, cosine, tails; the batch ramp; the MTP-lambda switch; the bias freeze)
follow elapsed time and end with the budget whatever the steps cost.
"""

from __future__ import annotations

import math

from .config import TrainConfig

# under a time budget the first step's cost is unknown: its warm-up LR is this fraction of the peak
FIRST_STEP_WARMUP = 0.01


def _after_warmup(cfg: TrainConfig, f: float) -> float:
    if f < cfg.constant_until:
        return cfg.lr
    if f < cfg.cosine_until:
        t = (f - cfg.constant_until) / max(cfg.cosine_until - cfg.constant_until, 1e-12)
        lo = cfg.min_lr_ratio
        return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))
    if f < cfg.tail_until:
        return cfg.lr * cfg.min_lr_ratio
    return cfg.lr * cfg.final_lr_ratio


def lr_at(cfg: TrainConfig, step: int, progress: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based), or at `progress` of a time budget: linear warm-up,
    constant, cosine to min_lr_ratio, constant min, then the final constant. The warm-up is evaluated where the step
    ends: (step + 1) / warm-up steps, or progress / warmup_frac."""
    if progress is None:
        f = step / max(cfg.steps, 1)
        warm = max(1, round(cfg.warmup_frac * cfg.steps))
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return _after_warmup(cfg, f)
    if progress < cfg.warmup_frac:
        return cfg.lr * max(progress / cfg.warmup_frac, FIRST_STEP_WARMUP)
    return _after_warmup(cfg, progress)


def batch_at(cfg: TrainConfig, step: int, progress: float | None = None) -> int:
    """Sequences in optimizer step `step`: linear ramp from start_ratio * batch to batch, in whole micro-batches
    where possible."""
    full = cfg.batch_size
    start = max(1, round(cfg.batch_ramp_start_ratio * full))
    if progress is None:
        ramp = cfg.batch_ramp_frac * cfg.steps
        if ramp < 1 or step >= ramp:
            return full
        b = start + (full - start) * step / ramp
    else:
        if cfg.batch_ramp_frac <= 0 or progress >= cfg.batch_ramp_frac:
            return full
        b = start + (full - start) * progress / cfg.batch_ramp_frac
    return max(1, min(full, int(b)))


def _fraction(cfg: TrainConfig, step: int, progress: float | None) -> float:
    return step / max(cfg.steps, 1) if progress is None else progress


def mtp_lambda_at(cfg: TrainConfig, step: int, progress: float | None = None) -> float:
    """MTP loss weight: mtp_lambda, then mtp_lambda_late from mtp_lambda_switch of the run (V3 §4.2: 0.3, then 0.1)."""
    return cfg.mtp_lambda if _fraction(cfg, step, progress) < cfg.mtp_lambda_switch else cfg.mtp_lambda_late


def bias_speed_at(cfg: TrainConfig, step: int, progress: float | None = None) -> float:
    """Bias update speed gamma of auxiliary-loss-free balancing, 0 from bias_freeze_frac of the run (V3 §4.2)."""
    return cfg.bias_update_speed if _fraction(cfg, step, progress) < cfg.bias_freeze_frac else 0.0
