#!/usr/bin/env python
"""DualPipeV's all-to-all / compute overlap measured (nanoseek.parallel.overlap): `nanoseek pretrain` on 4 ranks
(pp=2 x ep=2, DualPipeV, gloo on the CPU, one thread per rank), the same steps with overlap off and on.

Per step (median over the steps after the first): wall time, all-to-all seconds a rank waited with nothing else
computing (`ep_a2a_exposed_s`, mean over ranks), and the all-to-alls run beside the other chunk's compute. The
fraction of all-to-all time hidden = 1 - exposed with overlap / exposed without. With more ranks than cores the
ranks also wait for each other's compute inside an all-to-all: that wait is hidden the same way.

    .venv/bin/python benchmarks/bench_overlap.py [--steps 6] [--layers 4] [--batch 16] [--seq 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from nanoseek.data.prepare import prepare_corpus

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    sets = {"num_hidden_layers": args.layers, "batch_size": args.batch, "micro_batch_size": 1, "seq_len": args.seq,
            "eval_every": 10_000, "ckpt_every": 10_000, "warmup_frac": 0.0, "batch_ramp_frac": 0.0}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_corpus(None, data, vocab_size=512, max_chars=300_000, seed=0, progress=False)
        for overlap in (False, True):
            out = Path(tmp) / f"run_{overlap}"
            spec = "pp=2,ep=2,pp_schedule=dualpipev" + (",overlap=true" if overlap else "")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                   "-m", "nanoseek", "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out),
                   "--steps", str(args.steps), "--parallel", spec,
                   *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
            recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                    if r.get("kind") == "train"][1:]
            rows["on" if overlap else "off"] = {
                "step_s": statistics.median(r["tokens"] / r["tokens_per_s"] for r in recs),
                "a2a_exposed_s": statistics.median(r["ep_a2a_exposed_s"] for r in recs),
                "a2a_overlapped": statistics.median(r["ep_a2a_overlapped"] for r in recs),
                "loss": recs[-1]["loss"],
            }
    off, on = rows["off"], rows["on"]
    res = {**rows, "hidden_fraction": 1 - on["a2a_exposed_s"] / off["a2a_exposed_s"],
           "speedup": off["step_s"] / on["step_s"], "args": vars(args)}
    print(f"tiny, {args.layers} layers, {args.batch} x {args.seq} tokens a step, pp=2 x ep=2 DualPipeV, 4 ranks\n")
    print("| overlap | step (s) | all-to-all exposed (s / step / rank) | all-to-alls overlapped / step | final loss |\n"
          "|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['step_s']:.3f} | {r['a2a_exposed_s']:.3f} | {r['a2a_overlapped']:.0f} | {r['loss']:.6f} |")
    print(f"\nhidden: {res['hidden_fraction']:.1%} of the all-to-all time; step {res['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
