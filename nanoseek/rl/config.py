"""GRPO hyper-parameters: one dataclass, each field's allowed values declared once (nanoseek.config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..config import NON_NEGATIVE, POSITIVE, Range, at_least, check_fields, param
from .tasks import check_knobs


@dataclass
class GRPOConfig:
    """Defaults are sized for a tiny model on a CPU; R1-Zero used lr 3e-6, beta 0.001, G 16, 32 questions."""

    task: str = "arithmetic"  # a nanoseek.rl.GENERATORS name
    task_knobs: dict[str, Any] = param(default_factory=dict)  # e.g. {"digits": 1, "n_operands": 2}
    template: Literal["chat", "r1-zero"] = "chat"  # chat: the question as a user turn; r1-zero: the R1-Zero prompt
    steps: int = param(50, POSITIVE)
    questions_per_step: int = param(8, POSITIVE)
    group_size: int = param(8, at_least(2))  # >= 2: advantages are relative within a group (DeepSeekMath §4.1)
    mu: int = param(1, POSITIVE)  # optimisation passes per sampled batch (mu = 1: ratio is 1, clipping inactive)
    lr: float = param(1e-4, POSITIVE)
    weight_decay: float = param(0.0, NON_NEGATIVE)
    grad_clip: float = param(1.0, POSITIVE)
    beta: float = param(0.0, NON_NEGATIVE)  # KL weight (R1-Zero: 0.001)
    eps_low: float = param(0.2, Range(0, 1, hi_open=True))  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float | None = param(None, NON_NEGATIVE)  # None: eps_low; DAPO: 0.28
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    scale_std: bool = True  # Dr. GRPO: False
    format_weight: float = param(0.1, NON_NEGATIVE)  # reward = accuracy + format_weight * format
    temperature: float = param(1.0, POSITIVE)
    top_p: float | None = param(None, Range(0, 1, lo_open=True))
    max_new_tokens: int = param(48, POSITIVE)
    prefix_cache: bool = True  # rollouts read a question's prompt once per group (the rest reuse its keys, routing)
    micro_batch: int = param(32, POSITIVE)  # sequences per forward/backward
    # pi_old of the importance ratio: "trainer" = the first optimisation pass's own log-probs (detached; no extra
    # forward, ratio exactly 1 in that pass); "rollout" = the engine's sampling log-probs (no extra forward; the
    # ratio then corrects for what the sampler computed differently); "recompute" = a separate no-grad forward
    routing_replay: bool = False  # run the training forwards with the experts the rollout routed each token to
    old_logprobs: Literal["trainer", "rollout", "recompute"] = "trainer"
    # MTP distillation weight (the module learns the main head's next-next token distribution on the completions,
    # only the MTP module is trained by it); None: 0.3 (0 for a model without MTP modules)
    mtp_lambda: float | None = param(None, NON_NEGATIVE)
    ref_refresh_every: int = param(400, POSITIVE)
    eval_every: int = param(10, POSITIVE)
    eval_n: int = param(200, POSITIVE)
    log_completions: int = param(0, NON_NEGATIVE)  # the step's first N rollouts (text, reward...) to completions.jsonl
    ckpt_every: int = param(25, POSITIVE)
    keep_last: int = param(2, POSITIVE)
    seed: int = 0
    max_minutes: float | None = param(None, POSITIVE)  # wall-clock budget for training steps (evaluation excluded)

    def __post_init__(self) -> None:
        check_fields(self)
        self.task_knobs = check_knobs(self.task, self.task_knobs)  # names the task or knob; parses text values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
