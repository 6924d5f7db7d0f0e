#!/usr/bin/env python
"""Redundant experts in expert-parallel training (nanoseek.parallel.redundant) on a skewed expert load: the real
training step (Trainer.train_step) under `--parallel ep=N` with and without `redundant=R` replica slots per rank,
gloo on the CPU, one process per rank (torchrun), the machine's cores shared out.

The routers are skewed towards ep rank 0's experts (every gate's bias raised by --skew for the first --hot experts;
bias_update_speed 0 keeps the skew for the whole run). The plan is made from the first step's loads (`replan_every`
1000: one plan, after the first step); the warm-up steps are not timed. Per mesh:

    rows max/mean   per MoE layer and step, the expert rows of the busiest rank over the ranks' mean, counted by the
                    dispatch (Traffic.expert_rows): the mean over layers and steps, and the worst layer
    s/step          the mean of the timed steps (tokens/s from it)
    replica MiB     weight bytes each rank sent to other ranks' replica slots per step, forward (their gradients
                    come back as many), as counted, and the formula: MoE layers x micro-batches x R x 3 H I x 4 B
    token MiB       the token all-to-all's dispatch + combine bytes per rank per step, forward (Trainer's ep_bytes; the
                    backward sends as many again), beside it
    plan s          the time of one plan (rebalance_owned) for the run's MoE layers

    .venv/bin/python benchmarks/bench_redundant.py                              # tiny, ep=2 with R = 0, 2, 4
    .venv/bin/python benchmarks/bench_redundant.py --preset small --steps 4 --meshes 2:ep=2 2:ep=2,redundant=2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESHES = ["2:ep=2", "2:ep=2,redundant=2", "2:ep=2,redundant=4"]


def worker(preset_name: str, spec: str, steps: int, warmup: int, batch: int, seq: int, data_dir: Path,
           skew: float, hot: int) -> dict | None:
    import torch

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from nanoseek.model import preset
    from nanoseek.model.moe import MoE
    from nanoseek.parallel import ParallelConfig, init_distributed
    from nanoseek.parallel.eplb import rebalance_owned
    from nanoseek.train import TrainConfig, Trainer

    pc = ParallelConfig.parse(spec + (",replan_every=1000" if "redundant" in spec else ""))
    ctx = init_distributed(pc)
    info = json.loads((data_dir / "data.json").read_text())
    cfg = preset(preset_name, vocab_size=info["vocab_size"])
    W = ctx.world_size
    tcfg = TrainConfig(steps=1000, batch_size=batch, micro_batch_size=batch // W, seq_len=seq, batch_ramp_frac=0.0,
                       eval_batches=1, bias_update_speed=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tcfg, data_dir, Path(tmp) / "run", progress=False, parallel=ctx)
        with torch.no_grad():
            for gate in tr.model.moe_gates():
                gate.e_score_correction_bias[:hot] += skew
        moes = [m for m in tr.model.modules() if isinstance(m, MoE)]
        last = [0] * len(moes)  # each layer's rows counted so far in this step (the trainer resets them per step)

        def hook(i: int):
            def f(module, args, output) -> None:
                last[i] = module.dispatch.traffic.expert_rows
            return f

        for i, m in enumerate(moes):
            m.register_forward_hook(hook(i))
        for _ in range(warmup):
            tr.train_step()
        rows, times, replica, tokens = [], [], 0, 0
        for _ in range(steps):
            t0 = time.perf_counter()
            rec = tr.train_step()
            times.append(time.perf_counter() - t0)
            rows.append(ctx.all_gather(torch.tensor([last], dtype=torch.float64)))  # [ranks, layers]
            replica += rec.get("ep_replica_bytes", 0)
            tokens += rec["ep_bytes"]
        r = torch.stack(rows)  # [steps, ranks, layers]
        ratio = r.amax(1) / r.mean(1)  # [steps, layers]
        plan_s = None
        if tr.replicas is not None:
            load = torch.rand(len(moes), cfg.n_routed_experts)
            t0 = time.perf_counter()
            rebalance_owned(load, pc.ep, pc.redundant, ctx.ep_nodes)
            plan_s = time.perf_counter() - t0
    if not ctx.is_main:
        return None
    dt = sum(times) / steps
    micro = batch // (W * tcfg.micro_batch_size)
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    return {"preset": preset_name, "mesh": spec, "world": W, "skew": skew, "hot": hot, "s_per_step": dt,
            "tokens_per_s": batch * seq / dt, "rows_max_over_mean": ratio.mean().item(),
            "rows_max_over_mean_worst_layer": ratio.mean(0).max().item(),
            "replica_mib_per_rank": replica / W / steps / 2**20,
            "replica_mib_formula": len(moes) * micro * pc.redundant * expert_bytes / 2**20,
            "token_mib_per_rank": tokens / W / steps / 2**20, "plan_s": plan_s, "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (>= 1: the plan follows the first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skew", type=float, default=0.1, help="router bias added to the --hot first experts")
    ap.add_argument("--hot", type=int, default=4)
    ap.add_argument("--data", default="runs/bench_data")
    ap.add_argument("--json", default=None)
    ap.add_argument("--meshes", nargs="+", default=MESHES, help="RANKS:MESH items")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the plan is made after the first step)")
    if args.worker:
        row = worker(args.preset, args.worker, args.steps, args.warmup, args.batch, args.seq, Path(args.data),
                     args.skew, args.hot)
        if row is not None:
            print("ROW " + json.dumps(row))
        return 0
    from nanoseek.data import prepare_corpus
    from nanoseek.model import preset

    vocab = preset(args.preset).vocab_size
    d = Path(args.data) / f"vocab{vocab}"  # bench_parallel.py's corpus
    prepare_corpus(None, d, vocab_size=vocab, max_chars=6_000_000, seed=0, progress=False)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows = []
    for item in args.meshes:
        n, spec = item.split(":", 1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n, __file__,
               "--worker", spec, "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq), "--data", str(d), "--skew", str(args.skew),
               "--hot", str(args.hot)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
        row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("ROW "))[4:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, skew {args.skew} on the first {args.hot} experts\n"
          "| ranks | mesh | rows max/mean (worst layer) | s/step | tokens/s | replica MiB/rank/step (formula) | "
          "token all-to-all MiB/rank/step | plan s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        plan = "-" if r["plan_s"] is None else f"{r['plan_s']:.3f}"
        ratio = f"{r['rows_max_over_mean']:.2f} ({r['rows_max_over_mean_worst_layer']:.2f})"
        print(f"| {r['world']} | {r['mesh']} | {ratio} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['replica_mib_per_rank']:.2f} ({r['replica_mib_formula']:.2f}) | {r['token_mib_per_rank']:.2f} | "
              f"{plan} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
