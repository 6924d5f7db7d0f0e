"""Evaluation speed: batched log-likelihood scoring against one request per forward, on MMLU-STEM rows.

    .venv/bin/python benchmarks/bench_eval.py --data ../shared/data/mmlu_stem_test.jsonl [--preset tiny] [--rows 40]

Both paths score the same (context, option) pairs of a 5-shot cloze prompt and must agree to 1e-4; the table gives
requests/s and tokens/s of each and their ratio, and the forward's share of the GEMM roofline is left to
bench_train.py (the same model forward).
"""

from __future__ import annotations

import argparse
import time

import torch

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.eval.harness import LocalBackend
from nanoseek.eval.loglik import loglikelihood
from nanoseek.eval.tasks import choice_prompt, load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--fewshot", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:200]]
    tok = train_tokenizer(texts, vocab_size=4096, show_progress=False)
    model = nanoseek.load(nanoseek.preset(args.preset).replace(vocab_size=tok.vocab_size)).eval()
    task = load_task(f"mmlu={args.data}", fewshot=args.fewshot, limit=args.rows)
    backend = LocalBackend(model, tok, max_len=1024)
    reqs = [backend.encode_pair(choice_prompt(r, task.shots), " " + o) for r in task.rows for o in r["options"]]
    n_tok = sum(len(c) + len(x) - 1 for c, x in reqs)
    loglikelihood(model, reqs[:4])  # warm-up
    t0 = time.perf_counter()
    batched = loglikelihood(model, reqs, max_len=1024)
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [loglikelihood(model, [r], max_len=1024)[0] for r in reqs]
    ts = time.perf_counter() - t0
    worst = max(abs(a.logprob - b.logprob) for a, b in zip(batched, single, strict=True))
    assert worst < 1e-4, worst
    print("| preset | requests | tokens | batched req/s | one-at-a-time req/s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {len(reqs)} | {n_tok} | {len(reqs) / tb:.1f} ({n_tok / tb:,.0f} tok/s) | "
          f"{len(reqs) / ts:.1f} ({n_tok / ts:,.0f} tok/s) | {ts / tb:.2f}x | {worst:.1e} |")


if __name__ == "__main__":
    main()
