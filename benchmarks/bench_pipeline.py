#!/usr/bin/env python
"""Pipeline bubbles measured against their formulas (nanoseek.parallel.pipeline, gloo on the CPU, one thread per rank).

The bubble of a step is the fraction of the ranks' time not spent computing: 1 - T_1 / (PP x T_PP), where T_PP is the
step's wall time on PP ranks and T_1 the same forward + backward in one process on one thread, in the same m
micro-batches (the work the ranks share, at the same granularity; point-to-point transfers and the schedule's own
overhead count as bubble). Formulas, with m micro-batches, B = 2F and W = F
(the DualPipe repository's table, as fractions of a step):

    GPipe, 1F1B           (PP-1) / (m + PP-1)
    interleaved (2 / rank) (PP-1) / (2m + PP-1)
    DualPipeV             2(PP-1) / (2(PP-1) + 6m)   [(S/2-1)(F&B+B-3W) with S = 2 PP half-size stages, F&B = F+B]

    .venv/bin/python benchmarks/bench_pipeline.py [--pp 2 4] [--micro 8] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ["gpipe", "1f1b", "interleaved", "dualpipev"]


def formula(schedule: str, pp: int, m: int) -> float:
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved":
        return (pp - 1) / (2 * m + pp - 1)
    return 2 * (pp - 1) / (2 * (pp - 1) + 6 * m)


def _model(layers: int):
    import torch

    from nanoseek.io import build
    from nanoseek.model import preset

    cfg = preset("tiny", num_hidden_layers=layers)
    torch.manual_seed(0)
    return cfg, build(cfg, torch.float32, "cpu").train()


def single(layers: int, batch: int, seq: int, steps: int, micro: int) -> float:
    """Seconds of the forward + backward of the batch in `micro` micro-batches, one process, one thread."""
    import torch

    torch.set_num_threads(1)
    cfg, model = _model(layers)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        for xm in x.chunk(micro):
            (model(xm[:, :-1], labels=xm[:, 1:]).loss / micro).backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def ranked(schedule: str, layers: int, batch: int, seq: int, micro: int, steps: int) -> float | None:
    """Seconds of one pipeline step on this torchrun launch (rank 0 returns it)."""
    import torch
    import torch.distributed as dist

    from nanoseek.parallel import ParallelConfig, init_distributed
    from nanoseek.parallel.pipeline import build_pipeline

    torch.set_num_threads(1)
    ctx = init_distributed(ParallelConfig(dp=int(os.environ["WORLD_SIZE"])))
    cfg, model = _model(layers)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    sched, mods = build_pipeline(model, dist.group.WORLD, schedule, micro)
    first, last = any(m.first for m in mods), any(m.last for m in mods)
    times = []
    for _ in range(steps + 1):  # the first step also infers the shapes passed between stages: not timed
        dist.barrier()
        t = time.perf_counter()
        if first and last:
            sched.step(x[:, :-1], target=x[:, 1:], losses=[])
        elif first:
            sched.step(x[:, :-1])
        elif last:
            sched.step(target=x[:, 1:], losses=[])
        else:
            sched.step()
        dist.barrier()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    best = torch.tensor([min(times[1:])])
    dist.all_reduce(best, op=dist.ReduceOp.MAX)
    return best.item() if ctx.is_main else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2])  # more ranks than cores would hide the bubble
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind = args.worker[0]
        if kind == "single":
            print("T " + json.dumps(single(args.layers, args.batch, args.seq, args.steps, args.micro[0])))
        else:
            t = ranked(kind, args.layers, args.batch, args.seq, args.micro[0], args.steps)
            if t is not None:
                print("T " + json.dumps(t))
        return 0
    common = ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
              str(args.steps)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def run(cmd: list[str]) -> float:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
        return json.loads(next(ln for ln in out.splitlines() if ln.startswith("T "))[2:])

    print(f"{args.batch} x {args.seq} tokens per step, tiny with {args.layers} layers\n")
    print("| PP | schedule | micro-batches | one process (s) | step (s) | bubble measured | formula |\n"
          "|---|---|---|---|---|---|---|")
    for pp in args.pp:
        for m in args.micro:
            t1 = run([sys.executable, __file__, "--worker", "single", *common, "--micro", str(m)])
            for s in SCHEDULES:
                if s == "dualpipev" and m < 2 * pp:
                    continue
                tp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(pp),
                          __file__, "--worker", s, *common, "--micro", str(m)])
                print(f"| {pp} | {s} | {m} | {t1:.3f} | {tp:.3f} | {1 - t1 / (pp * tp):.1%} | "
                      f"{formula(s, pp, m):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
