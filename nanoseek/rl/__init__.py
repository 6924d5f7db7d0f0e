"""R1-style post-training pieces: verifiable tasks, rule-based rewards, a code sandbox, and GRPO loss functions."""

from .grpo_loss import aggregate, all_equal_fraction, clipped_objective, group_advantages, grpo_loss, kl_k3
from .rewards import (
    REWARDS,
    accuracy_reward,
    combine,
    countdown_reward,
    evaluate_countdown,
    extract_answer,
    find_boxed,
    format_reward,
    is_equivalent,
    language_reward,
    strict_answer,
)
from .sandbox import SandboxResult, code_reward, extract_code, run_code
from .tasks import (
    GENERATORS,
    HELDOUT_FRACTION,
    Problem,
    arithmetic_problem,
    countdown_problem,
    generate,
    heldout_set,
    is_heldout,
    load_gsm8k,
    load_jsonl,
    load_math,
    r1_zero_prompt,
    sample_problems,
)

__all__ = [
    "GENERATORS", "HELDOUT_FRACTION", "REWARDS", "Problem", "SandboxResult", "accuracy_reward", "aggregate",
    "all_equal_fraction", "arithmetic_problem", "clipped_objective", "code_reward", "combine", "countdown_problem",
    "countdown_reward", "evaluate_countdown", "extract_answer", "extract_code", "find_boxed", "format_reward",
    "generate", "group_advantages", "grpo_loss", "heldout_set", "is_equivalent", "is_heldout", "kl_k3",
    "language_reward", "load_gsm8k", "load_jsonl", "load_math", "r1_zero_prompt", "run_code", "sample_problems",
    "strict_answer",
]
