#!/usr/bin/env python
"""Distributed training throughput and communication (nanoseek.parallel) at `tiny` and `small`: the real training
step (Trainer.train_step) at world size 1 (one process, no parallelism; and FSDP2 at dp=1), 2 (dp=2, ep=2) and 4
(dp=2 x ep=2, oversubscribed), gloo on the CPU, one thread per rank, launched with torchrun.

Every byte the collectives move is counted (torch.distributed's all_gather_single / reduce_scatter_single /
all_to_all_single wrapped in each rank) and set against its formula from the parameter shapes and the routing:

    FSDP all-gather   per rank, per gather of a parameter sharded over g ranks: (g - 1) * ceil(d0 / g) * rest * 4 B;
                      blocks are gathered in the forward and again in the backward (reshard_after_forward), the root
                      (embedding, head, final norm) and the MTP modules once
    FSDP reduce-scat. per rank, per parameter: (g - 1) * ceil(d0 / g) * rest * 4 B sent
    EP all-to-all     per rank: 4 x rows sent to other ranks x H x 4 B (dispatch and combine in the forward, their
                      gradients in the backward); rows from the dispatch's own count of the routing

    .venv/bin/python benchmarks/bench_parallel.py                  # tiny and small, all meshes
    .venv/bin/python benchmarks/bench_parallel.py --presets tiny --steps 3
    python3 benchmarks/bench_parallel.py --presets small --meshes 1:dp=1 [--fp8]     # on a GPU: FSDP2 at world 1

On CUDA the row adds the GPU's peak allocated memory and the MFU: 3 x forward FLOPs per token (model_stats) x
tokens/s / the GPU's dense BF16 peak (--peak-tflops, 989 for an H100 / H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESHES = [("1", None), ("1", "dp=1"), ("2", "dp=2"), ("2", "ep=2"), ("4", "dp=2,ep=2")]


def _count_bytes() -> dict[str, int]:
    """Wrap the collectives FSDP2 and the EP dispatch call; returns the live byte counters."""
    import torch.distributed as dist

    counts = {"all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}
    ag, rs, a2a = dist.all_gather_single, dist.reduce_scatter_single, dist.all_to_all_single

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def all_gather_single(output, input, *a, **k):  # noqa: A002
        counts["all_gather"] += nbytes(output) - nbytes(input)  # received from the others
        return ag(output, input, *a, **k)

    def reduce_scatter_single(output, input, *a, **k):  # noqa: A002
        counts["reduce_scatter"] += nbytes(input) - nbytes(output)  # sent to the others
        return rs(output, input, *a, **k)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **k):
        if input_split_sizes is not None and input.dim() == 2:  # token rows (not the per-expert counts)
            me = dist.get_rank(group)
            sent = sum(n for r, n in enumerate(input_split_sizes) if r != me)
            counts["all_to_all"] += sent * input.shape[1] * input.element_size()
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, **k)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
    dist.all_to_all_single = all_to_all_single
    return counts


def _fsdp_formula(model, ctx) -> dict[str, int]:
    """Bytes per rank per step from the parameter shapes: gather and reduce-scatter of every FSDP group."""
    from nanoseek.model.moe import Experts

    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    resharded = {id(p) for b in model.model.layers for p in b.parameters()}  # main blocks (MTP modules stay gathered,
    if ctx.cfg.ep > 1:  # ... except their experts, an FSDP group of their own)
        resharded |= expert_ids
    gather = scatter = 0
    for p in model.parameters():
        d0, rest = p.shape[0], math.prod(p.shape[1:])  # a DTensor's shape is the global one
        if id(p) in expert_ids and ctx.cfg.ep > 1:
            g, d0 = ctx.cfg.dp, d0 // ctx.cfg.ep  # experts: split over ep, then sharded over dp
        else:
            g = ctx.world_size
        b = (g - 1) * math.ceil(d0 / g) * rest * 4
        times = 2 if (id(p) in resharded and ctx.cfg.reshard_after_forward) else 1
        gather += times * b
        scatter += b
    return {"all_gather": gather, "reduce_scatter": scatter}


def worker(preset_name: str, spec: str | None, steps: int, batch: int, seq: int, data_dir: Path, fp8: bool = False,
           peak_tflops: float = 989.0) -> dict | None:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the machine's cores shared out
    from nanoseek.model import preset
    from nanoseek.parallel import ParallelConfig, init_distributed
    from nanoseek.train import TrainConfig, Trainer

    ctx = init_distributed(ParallelConfig.parse(spec)) if spec else None
    counts = _count_bytes() if ctx else None
    info = json.loads((data_dir / "data.json").read_text())
    cfg = preset(preset_name, vocab_size=info["vocab_size"])
    W = ctx.world_size if ctx else 1
    tcfg = TrainConfig(steps=1000, batch_size=batch, micro_batch_size=batch // W, seq_len=seq, batch_ramp_frac=0.0,
                       eval_batches=1, fp8=fp8, bf16_moments=fp8)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tcfg, data_dir, Path(tmp) / "run", progress=False, parallel=ctx)
        tr.train_step()  # warm-up
        cuda = tr.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        per_step, ep_bytes = [], 0
        t0 = time.perf_counter()
        for _ in range(steps):
            if counts:
                for k in counts:
                    counts[k] = 0
            rec = tr.train_step()
            per_step.append(dict(counts or {}))
            ep_bytes += rec.get("ep_bytes", 0)  # the forward's dispatch + combine rows, all ranks, as counted
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    row = {"preset": preset_name, "mesh": spec or "none", "world": W, "tokens_per_s": batch * seq / dt,
           "s_per_step": dt, "fp8": fp8, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        from nanoseek.model.stats import model_stats

        flops = 3 * model_stats(cfg, seq_len=seq).forward_flops_per_token * batch * seq / dt
        row.update({"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                    "mfu": flops / W / (peak_tflops * 1e12)})
    if ctx is not None:
        # bytes per rank per step, averaged over ranks and steps
        keys = ("all_gather", "reduce_scatter", "all_to_all")
        total = torch.tensor([sum(s[k] for s in per_step) for k in keys], dtype=torch.float64)
        measured = dict(zip(keys, (ctx.all_reduce(total) / (W * steps)).tolist(), strict=True))
        formula = _fsdp_formula(tr.model, ctx)
        formula["all_to_all"] = 2 * ep_bytes / (W * steps)  # the forward's rows again in the backward
        # what uniform routing would send: per MoE layer (MTP's too) T_local x K slots, (ep-1)/ep of them away, four
        # times (dispatch, combine, and their gradients), H fp32 values each
        n_moe = cfg.n_moe_layers + cfg.num_nextn_predict_layers
        ep = ctx.cfg.ep
        formula["all_to_all_uniform"] = (4 * n_moe * (batch // W) * seq * cfg.num_experts_per_tok * (ep - 1) / ep
                                         * cfg.hidden_size * 4)
        row.update({"measured_bytes_per_rank": measured, "formula_bytes_per_rank": formula})
        if not ctx.is_main:
            return None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", default="runs/bench_data")
    ap.add_argument("--json", default=None)
    ap.add_argument("--meshes", nargs="+", help="RANKS:MESH items (1:none = one process, no parallelism); default: "
                    + " ".join(f"{n}:{m or 'none'}" for n, m in MESHES))
    ap.add_argument("--fp8", action="store_true", help="V3's FP8 recipe (TrainConfig fp8 + bf16 moments)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, spec = args.worker
        row = worker(name, None if spec == "none" else spec, args.steps, args.batch, args.seq, Path(args.data),
                     args.fp8, args.peak_tflops)
        if row is not None:
            print("ROW " + json.dumps(row))
        return 0
    from nanoseek.data import prepare_corpus
    from nanoseek.model import preset

    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name in args.presets:
        d = Path(args.data) / f"vocab{preset(name).vocab_size}"
        prepare_corpus(None, d, vocab_size=preset(name).vocab_size, max_chars=6_000_000, seed=0, progress=False)
        meshes = [(m.split(":")[0], None if m.split(":")[1] == "none" else m.split(":")[1])
                  for m in args.meshes] if args.meshes else MESHES
        for n, spec in meshes:
            base = [__file__, "--worker", name, spec or "none", "--steps", str(args.steps), "--batch",
                    str(args.batch), "--seq", str(args.seq), "--data", str(d), "--peak-tflops", str(args.peak_tflops)]
            base += ["--fp8"] if args.fp8 else []
            cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n, *base]
                   if spec else [sys.executable, *base])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
            row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("ROW "))[4:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| preset | ranks | mesh | tokens/s | s/step | all-gather MiB/rank (formula) | reduce-scatter MiB/rank "
          "(formula) | all-to-all MiB/rank (counted rows; uniform routing) |\n|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for r in rows:
        m, f = r.get("measured_bytes_per_rank"), r.get("formula_bytes_per_rank")
        cells = ["-"] * 3 if m is None else [
            f"{m[k] / mib:.2f} ({f[k] / mib:.2f})" for k in ("all_gather", "reduce_scatter")] + [
            f"{m['all_to_all'] / mib:.2f} ({f['all_to_all'] / mib:.2f}; {f['all_to_all_uniform'] / mib:.2f})"]
        print(f"| {r['preset']} | {r['world']} | {r['mesh']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.2f} | "
              + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
