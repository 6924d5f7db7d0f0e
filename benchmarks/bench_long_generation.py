"""Long generations: decode tokens/s of the engine for a 2,000-token answer (an R1-style reasoning trace), with
the tokenizer attached so that every step also produces the text (stop strings, streaming).

    python benchmarks/bench_long_generation.py [--new-tokens 2000] [--batch 1 --batch 8] [--rounds 3]

Uses only the engine's public API, so the same script measures an older checkout side by side:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/bench_long_generation.py --json before.json

`tiny` preset with random weights (its vocabulary resized to a BPE trained on a few standard-library files), a
32-token prompt, EOS ignored; greedy and sampled (temperature 1, top-p 0.95) rows; median over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.infer.engine import Engine, SamplingParams

FILES = {"abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py",
         "operator.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py", "argparse.py"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=2000)
    ap.add_argument("--batch", type=int, action="append", help="default 1 and 8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources() if p.name in FILES]
    tok = train_tokenizer(texts, vocab_size=4096, show_progress=False)
    cfg = dataclasses.replace(nanoseek.preset("tiny"), vocab_size=tok.vocab_size)
    model = nanoseek.load(cfg).eval()
    prompt = tok.encode(texts[0][:2000])[:32]
    rows = []
    for batch in args.batch or [1, 8]:
        for name, params in [
            ("greedy", SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)),
            ("sampled", SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, seed=0,
                                       ignore_eos=True)),
        ]:
            rates = []
            for _ in range(args.rounds):
                eng = Engine(model, tok, max_batch=batch, max_len=args.new_tokens + 64)
                t0 = time.perf_counter()
                reqs = eng.generate([prompt] * batch, params)
                dt = time.perf_counter() - t0
                n = sum(len(r.output_ids) for r in reqs)
                assert n == batch * args.new_tokens and all(r.text for r in reqs)
                rates.append(n / dt)
            row = {"batch": batch, "sampling": name, "tokens_per_s": statistics.median(rates),
                   "rounds": [round(r, 1) for r in rates]}
            rows.append(row)
            print(f"batch {batch:2d} {name:8s} {row['tokens_per_s']:8.1f} tok/s  (rounds {row['rounds']})",
                  flush=True)
    out = {"new_tokens": args.new_tokens, "torch": torch.__version__, "machine": platform.processor(),
           "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
