"""The speedrun's post-training stages: teacher traces -> SFT -> GRPO, with held-out accuracy after each stage.

The task is chained one-digit addition / subtraction ("Compute 5 - 8 + 8", `nanoseek.rl.tasks` arithmetic with
digits=1, n_operands=3, ops="+-"): a problem space of 4,000 questions with a fixed held-out split of a few hundred.
The teacher is a program that writes short step-by-step traces in the R1 format:
`<think>5 - 8 = -3. -3 + 8 = 5.</think> <answer>5</answer>`, and it is a fallible one, as a distilled teacher is:
half the time it drops the minus sign of a negative step result and carries on from the wrong value (TEACHER_SLIP),
so about a quarter of its traces end in a wrong answer. SFT (SFT_STEPS steps) learns the task and the slip with it;
GRPO (GRPO_MINUTES of training steps) rewards the answer, not the trace, and removes the slip: RL with a verifiable
reward goes past its demonstrations (R1 §2.2; R1 §2.3.3 filters a teacher's wrong traces by rejection sampling
instead). docs/post_training.md has the seeds, and trials with a correct teacher and a shorter SFT.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..data import Tokenizer
from ..eval.harness import EvalConfig, LocalBackend, evaluate
from ..io import load_checkpoint
from ..model import Transformer
from ..rl.grpo import GRPOConfig, GRPOTrainer
from ..rl.tasks import Problem, generate
from ..train.config import TrainConfig
from ..train.sft import SFT_DEFAULTS, prepare_sft
from ..train.trainer import Trainer

TASK_KNOBS: dict[str, Any] = {"digits": 1, "n_operands": 3, "ops": "+-"}
SFT_STEPS = 600
GRPO_MINUTES = 5.0
# With a correct teacher, 600 SFT steps reach ~90% and GRPO adds ~3 points; a shorter SFT (400: 56-66%) gave GRPO +13
# on one seed and nothing on another: it lacked knowledge that rollouts rarely find. A slipping teacher leaves a
# mistake the model's own samples correct half the time, which GRPO's advantages single out (docs/post_training.md).
TEACHER_SLIP = 0.5


def chain_steps(problem: Problem, slip: float = 0.0, rng: random.Random | None = None) -> tuple[list[str], int]:
    """The steps of a `+`/`-` chain evaluated left to right ("5 - 8 = -3", "-3 + 8 = 5") and its value. `slip`: the
    chance, per negative step result, of writing it without its minus sign and carrying on from the wrong value."""
    toks = problem.question.removeprefix("Compute ").split()
    if any(op not in "+-" for op in toks[1::2]):
        raise ValueError(f"the teacher program only writes + / - chains, got {problem.question!r}")
    acc, steps, slipped = int(toks[0]), [], False
    for op, b in zip(toks[1::2], toks[2::2], strict=True):
        new = acc + int(b) if op == "+" else acc - int(b)
        if new < 0 and slip > 0 and (rng or random).random() < slip:
            new, slipped = -new, True
        steps.append(f"{acc} {op} {b} = {new}")
        acc = new
    if not slipped and str(acc) != problem.answer:
        raise AssertionError(f"teacher disagrees with the task on {problem.question!r}")
    return steps, acc


def teacher_trace(problem: Problem, slip: float = 0.0, rng: random.Random | None = None) -> str:
    """A step-by-step solution of a `+`/`-` chain in the R1 format (the teacher program; `slip`: see chain_steps)."""
    steps, value = chain_steps(problem, slip, rng)
    return f"<think>{'. '.join(steps)}.</think> <answer>{value}</answer>"


def write_traces(path: Path, n: int, seed: int, slip: float = 0.0) -> Path:
    """n training-split problems with teacher traces as chat JSONL (with provenance: the problem's id, and whether
    the trace's answer is right)."""
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"teacher_slip must be in [0, 1], got {slip}")
    rng = random.Random(seed)
    rows = []
    for p in generate("arithmetic", n, seed=seed, **TASK_KNOBS):
        trace = teacher_trace(p, slip, rng)
        right = trace.endswith(f"<answer>{p.answer}</answer>")
        rows.append({"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": trace}],
                     "source": "teacher-program", "id": p.id, "correct": right})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def stage_eval(model: Transformer, tok: Tokenizer, n: int, heldout_text: Path | None = None,
               text_docs: int = 50) -> dict[str, Any]:
    """One row of the report's evaluation table, by `nanoseek eval`'s code: greedy accuracy on the task's held-out
    problems (what GRPO's curve plots) and bits per byte on held-out pre-training text (`text_docs` documents)."""
    was_training = model.training
    backend = LocalBackend(model, tok, max_batch=32, max_len=1024)
    res = evaluate(backend, EvalConfig(tasks=("arithmetic",), task_knobs=dict(TASK_KNOBS), limit=n, max_new_tokens=40))
    row = {"accuracy": res["tasks"]["arithmetic"]["pass@1_greedy"], "n": n,
           "seconds": res["tasks"]["arithmetic"]["seconds"]}
    if heldout_text is not None:
        text = evaluate(backend, EvalConfig(tasks=(f"heldout_text={heldout_text}",), limit=text_docs))["tasks"]
        row.update(bpb=text["heldout_text"]["bpb"], bpb_docs=text["heldout_text"]["n"],
                   seconds=row["seconds"] + text["heldout_text"]["seconds"])
    model.train(was_training)
    return row


def post_train(out: Path, init: Path, tok: Tokenizer, sft_steps: int = SFT_STEPS, grpo_minutes: float = GRPO_MINUTES,
               seed: int = 0, eval_n: int = 200, progress: bool = True,
               heldout_text: Path | None = None, teacher_slip: float = TEACHER_SLIP) -> dict[str, Any]:
    """SFT on teacher traces from `init`, then GRPO for `grpo_minutes`; returns the accuracies and run paths.
    Each stage is evaluated by `stage_eval` (held-out accuracy; BPB on `heldout_text`, a JSONL of {"text"}, if
    given)."""
    out = Path(out)
    traces = write_traces(out / "traces.jsonl", 8000, seed, teacher_slip)
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    data = out / "sft" / "data"
    prepare_sft([traces], tok, data, seed=seed)
    model = load_checkpoint(init)
    gcfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), steps=100_000, max_minutes=grpo_minutes,
                      lr=2e-5, max_new_tokens=40, eval_every=25, ckpt_every=100, eval_n=eval_n, seed=seed)
    table = {"pre-trained": stage_eval(model, tok, eval_n, heldout_text)}
    cfg = TrainConfig(**{**SFT_DEFAULTS, "lr": 1e-3, "steps": sft_steps, "seed": seed, "init_from": str(init),
                         "eval_every": max(1, sft_steps // 4), "ckpt_every": sft_steps})
    sft = Trainer(model.config, cfg, data, out / "sft", progress=progress)
    sft.run()
    table["sft"] = stage_eval(sft.model, tok, eval_n, heldout_text)
    grpo = GRPOTrainer(sft.model, tok, gcfg, out / "grpo", progress=progress)
    records = grpo.run()
    table["grpo"] = stage_eval(grpo.model, tok, eval_n, heldout_text)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    return {
        "task": "arithmetic " + json.dumps(TASK_KNOBS), "heldout_n": evals[-1]["heldout_n"],
        "teacher_slip": teacher_slip, "teacher_accuracy": sum(r["correct"] for r in rows) / len(rows),
        "accuracy_pretrained": table["pre-trained"]["accuracy"], "accuracy_sft": table["sft"]["accuracy"],
        "accuracy_grpo": table["grpo"]["accuracy"], "eval": table, "sft_steps": sft_steps, "grpo_steps": grpo.step,
        "grpo_seconds": round(sum(r["seconds"] for r in train), 1), "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
    }
