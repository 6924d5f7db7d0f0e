"""MTP through post-training: speculative-decoding acceptance after pre-training, SFT and GRPO, with and without
training the MTP module in the post-training stages.

    python benchmarks/mtp_posttrain_study.py [--init runs/speedrun/pretrain] [--sft-steps 600] [--grpo-steps 100]

Stages (the speedrun's post-training recipe, nanoseek.recipes.posttrain.post_train): SFT on teacher traces of
chained one-digit + / - with the MTP loss on the assistant tokens (mtp_lambda 0.3, as pre-training) and without
(mtp_lambda 0); GRPO
from the SFT-with-MTP checkpoint with MTP distillation (mtp_lambda 0.3) and without (0: the MTP module frozen while
the policy moves). The GRPO policies of the two runs are the same (the MTP loss trains only the MTP module), so any
acceptance difference is the MTP module's. Acceptance: the share of MTP module 1's drafts that the main model
confirmed, greedy answers to --n held-out task prompts (nanoseek.rl.grpo.draft_acceptance). Finished stages are
reused (delete --out to start over). Writes <out>/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nanoseek
from nanoseek.data import Tokenizer
from nanoseek.io import read_config
from nanoseek.io.paths import resolve_checkpoint
from nanoseek.recipes.posttrain import TASK_KNOBS, write_traces
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer, draft_acceptance
from nanoseek.rl.tasks import heldout_set
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, prepare_sft
from nanoseek.train.trainer import Trainer


def latest(run: Path) -> Path | None:
    found = list_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/speedrun/pretrain")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's, else runs/speedrun/data")
    ap.add_argument("--out", default="runs/mtp_study")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--grpo-steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=100, help="held-out prompts for the acceptance rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("all", "sft", "grpo"), default="all",
                    help="run only these stages (two processes at once: each results.json holds its rows)")
    ap.add_argument("--sft-mtp-checkpoint", default=None,
                    help="reuse this SFT-with-MTP run (e.g. the speedrun's runs/speedrun/post/sft: the same recipe)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    init = resolve_checkpoint(args.init)
    tok_path = Path(args.tokenizer) if args.tokenizer else init / "tokenizer.json"
    tok = Tokenizer.load(tok_path if tok_path.exists() else Path("runs/speedrun/data/tokenizer.json"))
    problems = heldout_set("arithmetic", args.n, **TASK_KNOBS)

    def acceptance(ckpt: Path) -> float:
        return draft_acceptance(nanoseek.load(ckpt).eval(), tok, problems, max_new_tokens=40)

    rows: dict[str, dict] = {"pre-trained": {"checkpoint": str(init), "acceptance": acceptance(init)}}
    print(rows["pre-trained"], flush=True)
    data = out / "sft_data"
    if not (data / "data.json").exists():
        prepare_sft([write_traces(out / "traces.jsonl", 8000, args.seed)], tok, data, seed=args.seed)
    sft: dict[float, Path] = {}
    for lam in (0.3, 0.0) if args.only != "grpo" else (0.3,):
        run = out / f"sft_mtp{lam}"
        if lam and args.sft_mtp_checkpoint:
            run = Path(args.sft_mtp_checkpoint)
        if latest(run) is None:
            cfg = TrainConfig(**{**SFT_DEFAULTS, "lr": 1e-3, "steps": args.sft_steps, "seed": args.seed,
                                 "init_from": str(init), "eval_every": max(1, args.sft_steps // 3),
                                 "ckpt_every": args.sft_steps, "mtp_lambda": lam})
            Trainer(read_config(init), cfg, data, run).run()
        sft[lam] = latest(run)  # type: ignore[assignment]
        rows[f"SFT, mtp_lambda={lam}"] = {"checkpoint": str(sft[lam]), "acceptance": acceptance(sft[lam])}
        print(rows[f"SFT, mtp_lambda={lam}"], flush=True)
    for lam in (0.3, 0.0) if args.only != "sft" else ():
        run = out / f"grpo_mtp{lam}"
        if latest(run) is None or json.loads((latest(run) / "trainer.json").read_text()).get("step", 0) < \
                args.grpo_steps:
            cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), steps=args.grpo_steps, lr=2e-5,
                             max_new_tokens=40, eval_every=args.grpo_steps, ckpt_every=args.grpo_steps,
                             eval_n=args.n, seed=args.seed, mtp_lambda=lam)
            GRPOTrainer(nanoseek.load(sft[0.3]), tok, cfg, run).run()
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in metrics if r.get("kind") == "eval"]
        rows[f"GRPO (from SFT with MTP), mtp_lambda={lam}"] = {
            "checkpoint": str(latest(run)), "acceptance": acceptance(latest(run)),  # type: ignore[arg-type]
            "heldout_accuracy": ev[-1]["heldout_accuracy"] if ev else None}
        print(rows[f"GRPO (from SFT with MTP), mtp_lambda={lam}"], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"task": TASK_KNOBS, "n": args.n, "sft_steps": args.sft_steps,
                                                  "grpo_steps": args.grpo_steps, "rows": rows}, indent=1))
    print("| stage | MTP draft acceptance |")
    print("|---|---:|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['acceptance']:.1f}% |")


if __name__ == "__main__":
    main()
