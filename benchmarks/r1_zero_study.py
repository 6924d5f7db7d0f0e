"""R1-Zero in miniature: GRPO straight from a pre-trained base (no SFT), R1-Zero template, rule rewards only.

    python benchmarks/r1_zero_study.py [--out runs/r1zero] [--minutes 10] [--grpo-minutes 10] [--lr 2e-5]
    python benchmarks/r1_zero_study.py --out runs/r1zero_lr5e-5 --base runs/r1zero/base --lr 5e-5

Pre-trains `tiny` on the Python standard library plus arithmetic text (nanoseek.recipes.r1zero: equations, prose
solutions, tagged transcripts of 2- and 3-operand chains; never a held-out problem) with the speedrun's time budget,
then runs GRPO on 3-operand chains with the R1-Zero template, measuring the base's and the trained policy's greedy
accuracy, pass@1 / pass@8 at temperature 1 and format rates, and the completions over training (length, format,
reflective words). Writes <out>/r1zero.json and <out>/report.md (docs/r1_zero.md records a run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.recipes.r1zero import PLAIN_STYLES, STYLES, r1_zero


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/r1zero")
    ap.add_argument("--base", default=None, help="an earlier study's base/ folder: skip pre-training")
    ap.add_argument("--minutes", type=float, default=10.0, help="pre-training budget (the speedrun's)")
    ap.add_argument("--grpo-minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arithmetic-docs", type=int, default=3000, help="documents of 20 chains each in the mix")
    ap.add_argument("--conversations", action="store_true",
                    help="also documents of worked problems after the R1-Zero template's preamble")
    ap.add_argument("--slip", type=float, default=0.0, help="the documents' worked answers drop a minus sign with "
                    "this chance per negative step (the speedrun's fallible teacher)")
    args = ap.parse_args(argv)
    r = r1_zero(Path(args.out), args.minutes, args.grpo_minutes, args.seed, args.arithmetic_docs, args.lr,
                base_dir=Path(args.base) if args.base else None,
                styles=STYLES if args.conversations else PLAIN_STYLES, slip=args.slip)
    print(json.dumps({key: r[key] for key in ("base", "grpo", "grpo_steps", "seconds")}, indent=1))
    print(f"report: {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
