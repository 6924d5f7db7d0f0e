#!/usr/bin/env python
"""Pre-training throughput and peak memory of the real training step (nanoseek.train.Trainer.train_step:
forward with MTP and the balance loss, chunked cross-entropy, backward, clipping, AdamW, bias update) at the
`tiny` and `small` presets. Each preset runs in its own subprocess so peak RSS is its own.

    .venv/bin/python benchmarks/bench_pretrain.py                      # tiny and small, batch 16 x 256
    .venv/bin/python benchmarks/bench_pretrain.py --presets small --steps 5
    python3 benchmarks/bench_pretrain.py --presets small --fp8 --json out.json   # on a GPU: FP8 vs the BF16 default

On CUDA the trainer runs under bf16 autocast; `--fp8` adds the FP8 GEMMs (nanoseek.fp8, backend `auto`); the
GPU's peak allocated memory is reported next to the host's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(preset_name: str, steps: int, batch: int, seq: int, data_dir: Path, bf16_moments: bool,
           fp8: bool = False) -> dict:
    import torch

    from nanoseek.model import preset
    from nanoseek.train import TrainConfig, Trainer

    info = json.loads((data_dir / "data.json").read_text())
    cfg = preset(preset_name, vocab_size=info["vocab_size"])
    tcfg = TrainConfig(steps=1000, batch_size=batch, micro_batch_size=batch, seq_len=seq, batch_ramp_frac=0.0,
                       bf16_moments=bf16_moments, eval_batches=1, fp8=fp8)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tcfg, data_dir, Path(tmp), progress=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tr.train_step()  # warm-up: allocates gradients and optimizer state
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"preset": preset_name, "params": sum(p.numel() for p in tr.model.parameters()),
           "tokens_per_s": batch * seq / dt, "s_per_step": dt, "peak_rss_mib": peak / 1024,
           "rss_growth_mib": (peak - base) / 1024, "threads": torch.get_num_threads(), "bf16_moments": bf16_moments,
           "fp8": fp8, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        row["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", default="runs/bench_data")
    ap.add_argument("--bf16-moments", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMMs (TrainConfig.fp8)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data_dir = Path(args.data)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq, data_dir, args.bf16_moments, args.fp8)))
        return 0
    from nanoseek.data import prepare_corpus
    from nanoseek.model import preset

    rows = []
    for name in args.presets:
        d = data_dir / f"vocab{preset(name).vocab_size}"
        prepare_corpus(None, d, vocab_size=preset(name).vocab_size, max_chars=6_000_000, seed=0, progress=False)
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--data", str(d)] + (["--bf16-moments"] if args.bf16_moments else []) \
            + (["--fp8"] if args.fp8 else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| preset | params | batch x seq | tokens/s | s/step | peak RSS (MiB) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {args.batch} x {args.seq} | {r['tokens_per_s']:,.0f} | "
              f"{r['s_per_step']:.2f} | {r['peak_rss_mib']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
