"""Where a speedrun's post-training errors are: greedy answers to the held-out problems after SFT and after GRPO,
each classified as right, wrong only by dropped minus signs (the slipping teacher's mistake, nanoseek.recipes.posttrain)
or wrong in other steps.

    python benchmarks/speedrun_errors.py runs/speedrun
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from nanoseek.data import Tokenizer
from nanoseek.infer.engine import SamplingParams
from nanoseek.io import load_checkpoint
from nanoseek.io.paths import resolve_checkpoint
from nanoseek.recipes.posttrain import TASK_KNOBS
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.rewards import extract_answer

STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)")


def classify(answer: str, completion: str) -> str:
    if extract_answer(completion) == answer:
        return "right"
    wrong = [(int(a) + int(b) if op == "+" else int(a) - int(b), int(c)) for a, op, b, c in STEP.findall(completion)]
    wrong = [(true, c) for true, c in wrong if true != c]
    return "sign only" if wrong and all(c == -true for true, c in wrong) else "other"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a speedrun's --out folder")
    ap.add_argument("--n", type=int, default=200, help="held-out problems")
    args = ap.parse_args(argv)
    run = Path(args.run)
    tok = Tokenizer.load(run / "data" / "tokenizer.json")
    print("| stage | right | wrong by dropped minus signs only | other wrong steps |\n|---|---:|---:|---:|")
    for stage in ("sft", "grpo"):
        model = load_checkpoint(resolve_checkpoint(run / "post" / stage))
        cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), eval_n=args.n, max_new_tokens=40)
        with tempfile.TemporaryDirectory() as tmp:  # the trainer's own files (config, metrics): not kept
            trainer = GRPOTrainer(model, tok, cfg, Path(tmp), progress=False)
            rolls = trainer.sample(trainer.heldout, 1, SamplingParams(max_new_tokens=40), seed=None)
        kinds = [classify(p.answer, r.text) for p, r in zip(trainer.heldout, rolls, strict=True)]
        print(f"| {stage} | {kinds.count('right')} | {kinds.count('sign only')} | {kinds.count('other')} |")


if __name__ == "__main__":
    main()
