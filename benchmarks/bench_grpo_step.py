"""GRPO step time split into rollout / scoring / log-prob forwards / training, for each source of pi_old, with and
without rollout routing replay and MTP distillation (run it alone on the machine: these are timings).

    python benchmarks/bench_grpo_step.py [--init runs/speedrun/post/sft] [--steps 6] [--beta 0]

"before" is the old step (old_logprobs=recompute: a no-grad forward of the policy before the update); "trainer"
takes pi_old from the first optimisation pass itself and "rollout" from the engine's sampling log-probs, neither
spends a forward on it. Every configuration starts from the same checkpoint and seed (the same rollouts); the first
step is a warm-up and is not counted. Prints a markdown table of the mean seconds per step and writes
<out>/bench_grpo_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import nanoseek
from nanoseek.data import Tokenizer
from nanoseek.io.paths import resolve_checkpoint
from nanoseek.recipes.posttrain import TASK_KNOBS
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer

CONFIGS = {
    "before (recompute)": dict(old_logprobs="recompute", mtp_lambda=0.0),
    "trainer": dict(old_logprobs="trainer", mtp_lambda=0.0),
    "rollout + replay": dict(old_logprobs="rollout", routing_replay=True, mtp_lambda=0.0),
    "trainer + replay": dict(old_logprobs="trainer", routing_replay=True, mtp_lambda=0.0),
    "trainer + MTP distillation": dict(old_logprobs="trainer", mtp_lambda=0.3),
}
KEYS = ("time_rollout", "time_score", "time_logprob", "time_train", "seconds")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/speedrun/post/sft")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (> 0 adds the reference forward)")
    ap.add_argument("--questions", type=int, default=8, help="questions per step")
    ap.add_argument("--group", type=int, default=8, help="rollouts per question")
    ap.add_argument("--out", default="runs/bench_grpo_step")
    args = ap.parse_args(argv)
    init = resolve_checkpoint(args.init)
    tok = Tokenizer.load(Path(args.tokenizer) if args.tokenizer else init / "tokenizer.json")
    results = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), steps=args.steps, lr=2e-5,
                         max_new_tokens=40, beta=args.beta, questions_per_step=args.questions,
                         group_size=args.group, **kw)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            tr = GRPOTrainer(nanoseek.load(init), tok, cfg, tmp, progress=False)
            recs = [tr.train_step() for _ in range(args.steps)][1:]
        results[name] = {k: statistics.mean(r[k] for r in recs) for k in KEYS}
        results[name]["logprob_diff_max"] = max(r["logprob_diff_max"] for r in recs)
        results[name]["routing_disagree"] = statistics.mean(r["routing_disagree"] for r in recs)
        print(name, results[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grpo_step.json").write_text(json.dumps({"init": str(init), "steps": args.steps, "beta": args.beta,
                                                          "results": results}, indent=1))
    print("| pi_old | rollout s | scoring s | log-prob forwards s | training s | step s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
