#!/usr/bin/env python
"""FP8 training vs high-precision training of `tiny` from the same seeds, data and steps: the relative gap of the
final held-out loss (DeepSeek-V3 reports < 0.25% at scale; the FP8 issue asks < 0.5%). On the CPU the FP8 GEMMs
are emulated exactly (quantise per tile/block, fp32 accumulation per 128-slice) and the reference runs in fp32.

Each seed trains both arms from the same initialisation and data order; the gap is paired per seed and averaged
over seeds, next to the seed-to-seed spread of the reference runs (a single pair cannot resolve a gap smaller than
that spread). Runs go to `--workers` processes of one thread each.

    .venv/bin/python benchmarks/fp8_vs_fp32.py --steps 250 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _train(arm: str, seed: int, steps: int, pow2: bool, data: str, out: str, vocab: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from nanoseek.model import preset
    from nanoseek.train import TrainConfig, Trainer

    cfg = preset("tiny").replace(vocab_size=vocab)
    t = TrainConfig(steps=steps, batch_size=16, micro_batch_size=16, seq_len=256, seed=seed,
                    eval_every=max(1, steps // 5), eval_batches=16, ckpt_every=steps,
                    bias_update_speed=0.01, fp8=arm == "fp8", fp8_pow2_scale=pow2)
    t0 = time.perf_counter()
    r = Trainer(cfg, t, Path(data), Path(out) / f"{arm}_seed{seed}").run()
    return {"arm": arm, "seed": seed, "heldout_loss": r.final_heldout_loss,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/fp8_vs_fp32")
    ap.add_argument("--pow2", action="store_true", help="power-of-two scales")
    args = ap.parse_args()
    from nanoseek.data import prepare_corpus
    from nanoseek.model import preset

    out = Path(args.out)
    info = prepare_corpus(None, out / "data", vocab_size=preset("tiny").vocab_size, max_chars=6_000_000, seed=0)
    jobs = [(arm, s) for s in args.seeds for arm in ("fp8", "fp32")]
    with ProcessPoolExecutor(args.workers) as pool:
        futs = [pool.submit(_train, arm, s, args.steps, args.pow2, str(out / "data"), str(out), info["vocab_size"])
                for arm, s in jobs]
        runs = []
        for f in futs:
            runs.append(f.result())
            print(runs[-1], flush=True)
    loss = {(r["arm"], r["seed"]): r["heldout_loss"] for r in runs}
    gaps = [(loss["fp8", s] - loss["fp32", s]) / loss["fp32", s] for s in args.seeds]
    ref = [loss["fp32", s] for s in args.seeds]
    res = {
        "runs": runs,
        "paired_gaps": gaps,
        "mean_gap": statistics.fmean(gaps),
        "mean_abs_gap": statistics.fmean(abs(g) for g in gaps),
        "gap_of_means": statistics.fmean(loss["fp8", s] for s in args.seeds) / statistics.fmean(ref) - 1,
        "fp32_seed_spread": (max(ref) - min(ref)) / statistics.fmean(ref),
        "command": "python benchmarks/fp8_vs_fp32.py " + " ".join(sys.argv[1:]),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    for s, g in zip(args.seeds, gaps, strict=True):
        print(f"seed {s}: fp32 {loss['fp32', s]:.4f}  fp8 {loss['fp8', s]:.4f}  gap {100 * g:+.3f}%")
    print(f"mean paired gap {100 * res['mean_gap']:+.3f}%, gap of the means {100 * res['gap_of_means']:+.3f}%, "
          f"fp32 seed-to-seed spread {100 * res['fp32_seed_spread']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
