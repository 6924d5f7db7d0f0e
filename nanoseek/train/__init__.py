"""Pre-training: the V3 recipe (AdamW, LR and batch schedules, MTP, auxiliary-loss-free balancing), exact resume."""

from .checkpoint import RunDirError
from .config import TrainConfig, apply_overrides
from .schedule import batch_at, bias_speed_at, lr_at, mtp_lambda_at
from .trainer import Trainer, TrainResult

__all__ = ["RunDirError", "TrainConfig", "TrainResult", "Trainer", "apply_overrides", "batch_at", "bias_speed_at",
           "lr_at", "mtp_lambda_at"]
