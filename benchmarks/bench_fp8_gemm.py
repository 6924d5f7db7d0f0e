#!/usr/bin/env python
"""Fp8Linear forward + backward vs a high-precision nn.Linear at DeepSeek-V3 shapes (the FP8 issue's GPU target:
>= 1.4x faster than BF16 on Hopper), with the device, torch version and FP8 backend recorded.

On CUDA the reference is bf16 nn.Linear; on the CPU it is fp32 (bf16 GEMMs are slow on most CPUs) and the FP8
side is the exact emulation, so CPU figures measure the emulation's cost, not an FP8 speed-up.

    .venv/bin/python benchmarks/bench_fp8_gemm.py                       # V3 shapes, 4096 tokens
    .venv/bin/python benchmarks/bench_fp8_gemm.py --tokens 256 --shapes 512x256   # quick CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from nanoseek.fp8 import Fp8Linear, resolve_backend

V3_SHAPES = ["7168x2048", "2048x7168", "7168x1536"]


def _time(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", nargs="+", default=V3_SHAPES, help="IN x OUT")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backend", default="auto", choices=["auto", "emulate", "rowwise", "blockwise"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (fuses the quantisation)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = resolve_backend(device) if args.backend == "auto" else args.backend
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        x = torch.randn(args.tokens, k, device=device)
        dy = torch.randn(args.tokens, n, device=device, dtype=ref_dtype)
        ref = torch.nn.Linear(k, n, bias=False, device=device, dtype=ref_dtype)
        fp8 = Fp8Linear(k, n, device=device, backend=backend)  # fp32 master weight, bf16 output on CUDA
        xr = x.to(ref_dtype).requires_grad_()
        xf = x.to(ref_dtype).requires_grad_()
        f_ref, f_fp8 = ref, fp8
        if args.compile:
            f_ref, f_fp8 = torch.compile(ref), torch.compile(fp8)

        def step_ref(f=f_ref, xr=xr, dy=dy):
            f(xr).backward(dy)

        def step_fp8(f=f_fp8, xf=xf, dy=dy):
            f(xf).backward(dy)

        t_ref = _time(step_ref, args.iters, device)
        t_fp8 = _time(step_fp8, args.iters, device)
        flop = 6 * args.tokens * k * n
        rows.append({"shape": f"{k}->{n}", "tokens": args.tokens, "ref_ms": round(1e3 * t_ref, 3),
                     "fp8_ms": round(1e3 * t_fp8, 3), "speedup": round(t_ref / t_fp8, 3),
                     "ref_tflops": round(flop / t_ref / 1e12, 3), "fp8_tflops": round(flop / t_fp8 / 1e12, 3)})
        print(rows[-1], flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "backend": backend, "reference_dtype": str(ref_dtype),
            "compile": args.compile, "command": "python benchmarks/bench_fp8_gemm.py " + " ".join(sys.argv[1:])}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
