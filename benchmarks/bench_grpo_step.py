"""GRPO step time split into rollout / scoring / log-prob forwards / training, for each source of pi_old, with and
without rollout routing replay and MTP distillation, each with the rollout engine's prefix cache off and on (run it
alone on the machine: these are timings).

    python benchmarks/bench_grpo_step.py [--init runs/speedrun/post/sft] [--steps 6] [--beta 0] [--template chat]

"before" is the old step (old_logprobs=recompute: a no-grad forward of the policy before the update); "trainer"
takes pi_old from the first optimisation pass itself and "rollout" from the engine's sampling log-probs, neither
spends a forward on it. "cache on" reads each question's prompt once per group (the other samples start from the
first's keys and recorded routing, `GRPOConfig.prefix_cache`); "off" reads it once per sample. Every run starts from
the same checkpoint and seed (the same rollouts, checked: off and on must sample the same completions); the two
trainers of a configuration step alternately (off, on, off, ...) so that a change in the machine's load falls on
both alike; the first step of each is a warm-up and is not counted. Prints a markdown table of the mean seconds
per step, rollout tokens/s (completion tokens sampled, EOS included, over the rollout time), steps/minute and the
prompt tokens the engine read per step, and writes <out>/bench_grpo_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

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


def timed_step(tr: GRPOTrainer, n_rollouts: int) -> dict[str, Any]:
    """One train_step's record plus the rollout's throughput and the prompt tokens the engine read for it."""
    read = tr.engine.stats.prefill_tokens
    rec = tr.train_step()
    tokens = rec["completion_len"] * n_rollouts
    return {**rec, "rollout_tokens": tokens, "rollout_tok_s": tokens / rec["time_rollout"],
            "prompt_tokens_read": tr.engine.stats.prefill_tokens - read}


def summary(recs: list[dict[str, Any]]) -> dict[str, float]:
    out = {k: statistics.mean(r[k] for r in recs) for k in (*KEYS, "rollout_tokens", "prompt_tokens_read")}
    out["rollout_tok_s"] = out["rollout_tokens"] / out["time_rollout"]  # (total tokens / total time)
    out["steps_per_min"] = 60.0 / out["seconds"]
    out["logprob_diff_max"] = max(r["logprob_diff_max"] for r in recs)
    out["routing_disagree"] = statistics.mean(r["routing_disagree"] for r in recs)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/speedrun/post/sft")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (> 0 adds the reference forward)")
    ap.add_argument("--questions", type=int, default=8, help="questions per step")
    ap.add_argument("--group", type=int, default=8, help="rollouts per question")
    ap.add_argument("--template", default="chat", choices=("chat", "r1-zero"),
                    help="the prompt (r1-zero: the longer R1-Zero instruction, more to share)")
    ap.add_argument("--out", default="runs/bench_grpo_step")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first is a warm-up)")
    init = resolve_checkpoint(args.init)
    tok = Tokenizer.load(Path(args.tokenizer) if args.tokenizer else init / "tokenizer.json")
    n_rollouts = args.questions * args.group
    results = {}
    for name, kw in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {}
            for cache in ("off", "on"):
                torch.manual_seed(0)
                cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), steps=args.steps, lr=2e-5,
                                 max_new_tokens=40, beta=args.beta, questions_per_step=args.questions,
                                 group_size=args.group, template=args.template, prefix_cache=cache == "on",
                                 **kw)  # type: ignore[arg-type]
                trainers[cache] = GRPOTrainer(nanoseek.load(init), tok, cfg, Path(tmp) / cache, progress=False)
            recs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for _ in range(args.steps):
                for cache, tr in trainers.items():
                    recs[cache].append(timed_step(tr, n_rollouts))
        same = all((a["completion_len"], a["reward_mean"]) == (b["completion_len"], b["reward_mean"])
                   for a, b in zip(recs["off"], recs["on"], strict=True))
        for cache in ("off", "on"):
            results[f"{name} | {cache}"] = {**summary(recs[cache][1:]), "same_rollouts": same}
            print(name, cache, results[f"{name} | {cache}"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grpo_step.json").write_text(json.dumps({"init": str(init), "steps": args.steps, "beta": args.beta,
                                                          "template": args.template, "questions": args.questions,
                                                          "group": args.group, "results": results}, indent=1))
    print("| pi_old | prefix cache | prompt tokens read / step | rollout s | rollout tokens/s | scoring s "
          "| log-prob forwards s | training s | step s | steps/min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        print(f"| {key} | {r['prompt_tokens_read']:.0f} | {r['time_rollout']:.3f} | {r['rollout_tok_s']:.0f} | "
              + " | ".join(f"{r[k]:.3f}" for k in KEYS[1:]) + f" | {r['steps_per_min']:.1f} |")
    if not all(r["same_rollouts"] for r in results.values()):
        print("WARNING: the cache changed the rollouts of some configuration (see same_rollouts in the JSON)")


if __name__ == "__main__":
    main()
