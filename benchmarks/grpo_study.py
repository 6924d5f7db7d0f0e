"""GRPO acceptance study: does RL with a rule-based reward raise held-out accuracy within 15 CPU minutes?

    python benchmarks/grpo_study.py [--init runs/speedrun/pretrain] [--seeds 0 1 2] [--grpo-minutes 15]

1. SFT the pre-trained checkpoint on teacher-program traces of chained one-digit + / − (nanoseek.recipes.posttrain),
   once; 2. from that checkpoint, GRPO with each seed for --grpo-minutes of training steps (evaluation excluded);
3. held-out accuracy (200 problems, greedy) before and after GRPO per seed, mean gain and a t-based 95% interval.
Writes <out>/results.json and prints a markdown table. The seeds change the rollouts' sampling, not the SFT start.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import nanoseek
from nanoseek.data import Tokenizer
from nanoseek.io import read_config
from nanoseek.io.paths import resolve_checkpoint
from nanoseek.recipes.posttrain import TASK_KNOBS, write_traces
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, prepare_sft
from nanoseek.train.trainer import Trainer

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided t quantiles by degrees of freedom


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/speedrun/pretrain")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's, else runs/speedrun/data")
    ap.add_argument("--out", default="runs/grpo_study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--grpo-minutes", type=float, default=15.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args(argv)
    out = Path(args.out)
    init = resolve_checkpoint(args.init)
    tok_path = Path(args.tokenizer) if args.tokenizer else init / "tokenizer.json"
    if not tok_path.exists():
        tok_path = Path("runs/speedrun/data/tokenizer.json")
    tok = Tokenizer.load(tok_path)

    sft_ckpt = out / "sft" / "checkpoints" / f"step_{args.sft_steps:08d}"
    if not sft_ckpt.is_dir():
        traces = write_traces(out / "traces.jsonl", 8000, seed=1)
        prepare_sft([traces], tok, out / "sft" / "data")
        cfg = TrainConfig(**{**SFT_DEFAULTS, "lr": 1e-3, "steps": args.sft_steps, "init_from": str(init),
                             "eval_every": max(1, args.sft_steps // 3), "ckpt_every": args.sft_steps})
        model_cfg = read_config(init)
        Trainer(model_cfg, cfg, out / "sft" / "data", out / "sft").run()

    runs = []
    for seed in args.seeds:
        cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), steps=100_000, max_minutes=args.grpo_minutes,
                         lr=args.lr, max_new_tokens=40, eval_every=25, ckpt_every=100, seed=seed)
        recs = GRPOTrainer(nanoseek.load(sft_ckpt), tok, cfg, out / f"grpo_seed{seed}").run()
        ev = [r for r in recs if r["kind"] == "eval"]
        tr = [r for r in recs if r["kind"] == "train"]
        runs.append({"seed": seed, "before": ev[0]["heldout_accuracy"], "after": ev[-1]["heldout_accuracy"],
                     "best": max(r["heldout_accuracy"] for r in ev), "steps": tr[-1]["step"] if tr else 0,
                     "train_seconds": round(sum(r["seconds"] for r in tr), 1)})
    gains = [r["after"] - r["before"] for r in runs]
    mean = statistics.mean(gains)
    half = T95.get(len(gains) - 1, 1.96) * statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else None
    result = {"task": TASK_KNOBS, "sft_steps": args.sft_steps, "grpo_minutes": args.grpo_minutes, "runs": runs,
              "mean_gain": mean, "ci95_half_width": half}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("| seed | held-out accuracy before GRPO | after | gain | GRPO steps | training s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['seed']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
              f"{100 * (r['after'] - r['before']):+.1f} | {r['steps']} | {r['train_seconds']:.0f} |")
    ci = f" ± {100 * half:.1f} (95% CI)" if half is not None else ""
    print(f"mean gain {100 * mean:+.1f} points{ci}")


if __name__ == "__main__":
    main()
