#!/usr/bin/env python
"""FP8 training vs high-precision training of `tiny` from the same seed, data and steps: the relative gap of the
final held-out loss (DeepSeek-V3 reports < 0.25% at scale; the FP8 issue asks < 0.5%). On the CPU the FP8 GEMMs
are emulated exactly (quantise per tile/block, fp32 accumulation per 128-slice) and the reference runs in fp32.

    .venv/bin/python benchmarks/fp8_vs_fp32.py --steps 250
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nanoseek.data import prepare_corpus
from nanoseek.model import preset
from nanoseek.train import TrainConfig, Trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", default="runs/fp8_vs_fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pow2", action="store_true", help="power-of-two scales")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = preset("tiny")
    info = prepare_corpus(None, out / "data", vocab_size=cfg.vocab_size, max_chars=6_000_000, seed=args.seed)
    cfg = cfg.replace(vocab_size=info["vocab_size"])
    res = {}
    for name, fp8 in (("fp32", False), ("fp8", True)):
        t = TrainConfig(steps=args.steps, batch_size=16, micro_batch_size=16, seq_len=256, seed=args.seed,
                        eval_every=max(1, args.steps // 5), eval_batches=16, ckpt_every=args.steps,
                        bias_update_speed=0.01, fp8=fp8, fp8_pow2_scale=args.pow2)
        t0 = time.perf_counter()
        r = Trainer(cfg, t, out / "data", out / name).run()
        res[name] = {"heldout_loss": r.final_heldout_loss, "seconds": round(time.perf_counter() - t0, 1)}
        print(name, res[name])
    gap = (res["fp8"]["heldout_loss"] - res["fp32"]["heldout_loss"]) / res["fp32"]["heldout_loss"]
    res["relative_gap"] = gap
    res["command"] = "python benchmarks/fp8_vs_fp32.py " + " ".join(sys.argv[1:])
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"relative held-out loss gap FP8 vs fp32: {100 * gap:+.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
