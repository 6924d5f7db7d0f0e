"""Time to first token with and without prefix caching: requests sharing a long prefix (a system prompt, few-shot
examples) after one request has left its keys in a slot.

    .venv/bin/python benchmarks/bench_prefix_cache.py [--preset tiny] [--prefix 1024] [--suffix 16] [--rounds 5]

Each round: a warm-up request with the prefix, then `--rounds` requests of the same prefix and different suffixes,
one at a time (so TTFT is the prefill alone); median over them. Outputs are compared between the two engines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nanoseek
from nanoseek.infer.engine import Engine, SamplingParams


def ttft(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    req = engine.submit(prompt, params)
    while not req.output_ids:
        engine.step()
    first = time.perf_counter() - t0
    while not req.finished:
        engine.step()
    return first, req.output_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nanoseek.load(args.preset).eval()
    V = model.config.vocab_size
    prefix = torch.randint(3, V, (args.prefix,)).tolist()
    suffixes = [torch.randint(3, V, (args.suffix,)).tolist() for _ in range(args.rounds)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    rows, outs = {}, {}
    for cached in (False, True):
        engine = Engine(model, max_batch=4, max_len=args.prefix + args.suffix + 16, prefix_cache=cached)
        ttft(engine, prefix + suffixes[0], params)  # warm-up: leaves the prefix in a slot
        times, outs[cached] = [], []
        for s in suffixes:
            t, out = ttft(engine, prefix + s, params)
            times.append(t)
            outs[cached].append(out)
        rows[cached] = (statistics.median(times), engine.stats.prefix_hit_tokens)
    print(f"{args.preset}: {args.prefix}-token shared prefix + {args.suffix}-token suffix, batch 1, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; outputs equal: {outs[True] == outs[False]}")
    print("| prefix cache | TTFT ms (median) | prefix tokens reused |")
    print("|---|---:|---:|")
    for cached, (t, hit) in rows.items():
        print(f"| {'on' if cached else 'off'} | {t * 1e3:.1f} | {hit} |")
    print(f"speed-up {rows[False][0] / rows[True][0]:.1f}x")


if __name__ == "__main__":
    main()
