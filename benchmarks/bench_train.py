#!/usr/bin/env python
"""Training-step throughput and peak memory: nanoseek `Transformer` vs transformers' `DeepseekV3ForCausalLM`.

Both models get the same config (our preset with MTP off, since transformers has no MTP) and the same weights
(ours are copied into the transformers model with `load_state_dict`), so they compute the same function; the
first-step losses are printed side by side as a sanity check.

One step = forward + loss (mean cross-entropy on the next tokens) + backward + zero grads.
  ours:         out = model(x, labels=y); out.loss.backward()  (main CE + the MoE balance loss, as in training;
                `--loss main` backprops the CE alone)
  transformers: model(input_ids=x, labels=y, shift_labels=y).loss.backward()  (CE over the same S positions)

Each implementation runs in its own subprocess (so the peak RSS of one is not polluted by the other), in the
order ours, transformers[, transformers with eager experts], repeated `--rounds` times. Peak memory is sampled
by a background thread reading /proc/self/statm every `--sample-ms` milliseconds during all steps (warmup
included: the first step allocates the gradients); the delta is over the RSS right after model construction.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py                 # small preset, batch 4 x seq 256
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --profile       # + top ops by self CPU time
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --out runs/bench_train.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMPLS = {
    "ours": "nanoseek",
    "hf": "transformers",
    "hf-eager": "transformers (eager experts)",
}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MiB = 1024 * 1024


# ---- memory ------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; ru_maxrss elsewhere, which is a peak)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


class RSSSampler(threading.Thread):
    """Background thread: peak RSS seen while running, sampled every `interval` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self.samples = 0
        self._stop_evt = threading.Event()
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def _read(self) -> int:
        if self._fd is None:
            return _ru_maxrss_bytes()
        return int(os.pread(self._fd, 128, 0).split()[1]) * PAGE

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, self._read())
            self.samples += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        self.peak = max(self.peak, self._read())
        if self._fd is not None:
            os.close(self._fd)
        return self.peak


# ---- machine -----------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    simd = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        tf_version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        tf_version = None
    return {
        "cpu": cpu,
        "cpu_simd": simd,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "mem_total_gib": round(mem_total / 2**30, 1) if mem_total else None,
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---- worker (one implementation, in its own process) ------------------------------------------------
def build_config(args):
    from nanoseek.model import preset

    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)
    if args.loss == "main":
        cfg = cfg.replace(aux_loss_alpha=0.0)  # the balance loss is skipped (returns zeros) when alpha == 0
    return cfg


def make_model(impl: str, cfg, weights: str):
    import torch

    sd = torch.load(weights, mmap=True, weights_only=True)
    info: dict = {}
    if impl == "ours":
        from nanoseek.model import Transformer

        model = Transformer(cfg)
        model.load_state_dict(sd, strict=True)
    else:
        import transformers

        d = cfg.to_hf_dict()
        d.pop("architectures", None)
        hf_cfg = transformers.DeepseekV3Config(**d)
        kwargs = {}
        if impl == "hf-eager":
            kwargs["experts_implementation"] = "eager"
        model = transformers.DeepseekV3ForCausalLM._from_config(hf_cfg, **kwargs)
        model.load_state_dict(sd, strict=True)
        info["attn_implementation"] = model.config._attn_implementation
        info["experts_implementation"] = model.config._experts_implementation
    del sd
    model.train()
    return model, info


def step_fn(impl: str, model, x, y):
    """Returns a closure doing one forward + loss + backward + zero_grad and returning the losses."""
    if impl == "ours":
        def step():
            out = model(x, labels=y)
            out.loss.backward()
            return out
    else:
        def step():
            out = model(input_ids=x, labels=y, shift_labels=y, use_cache=False)
            out.loss.backward()
            return out
    return step


def grad_norm(model) -> float:
    import torch

    gs = [p.grad.detach().reshape(-1) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(gs))) if gs else 0.0


def run_worker(args) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    impl = args.worker
    rss_start = rss_bytes()
    torch.manual_seed(args.seed)
    cfg = build_config(args)
    t0 = time.perf_counter()
    model, info = make_model(impl, cfg, args.weights)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(args.seed + 1)
    tok = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    step = step_fn(impl, model, x, y)

    gc.collect()
    rss_base = rss_bytes()
    sampler = RSSSampler(args.sample_ms / 1000)
    sampler.start()
    times, first = [], {}
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t
        if i == 0:  # the sanity-check numbers, outside the measured time
            first = {"loss": float(out.loss)}
            if impl == "ours":
                first["main_loss"] = float(out.main_loss)
                first["balance_loss"] = float(out.balance_loss) if out.balance_loss is not None else 0.0
            else:
                first["main_loss"] = float(out.loss)
            first["grad_norm"] = grad_norm(model)
        t = time.perf_counter()
        del out
        model.zero_grad(set_to_none=True)
        dt += time.perf_counter() - t
        if i >= args.warmup:
            times.append(dt)
    peak = sampler.stop()

    res = {
        "impl": impl,
        "name": IMPLS[impl],
        "threads": torch.get_num_threads(),
        "params": n_params,
        "build_s": build_s,
        "step_s": times,
        "rss_start_mib": rss_start / MiB,
        "rss_base_mib": rss_base / MiB,
        "rss_peak_mib": peak / MiB,
        "rss_delta_mib": (peak - rss_base) / MiB,
        "ru_maxrss_mib": _ru_maxrss_bytes() / MiB,
        "rss_samples": sampler.samples,
        **first,
        **info,
    }
    if args.profile:
        res["profile"] = profile_steps(step, model, args)
    return res


def profile_steps(step, model, args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, profile_memory=False) as prof:
        for _ in range(args.profile_steps):
            out = step()
            del out
            model.zero_grad(set_to_none=True)
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka) or 1.0
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {
            "op": e.key,
            "calls": e.count // args.profile_steps,
            "self_ms": e.self_cpu_time_total / 1000 / args.profile_steps,
            "self_pct": 100 * e.self_cpu_time_total / total,
            "total_ms": e.cpu_time_total / 1000 / args.profile_steps,
        }
        for e in rows[: args.profile_top]
    ]
    n_ops = sum(e.count for e in ka) // args.profile_steps
    return {"per_step_self_ms": total / 1000 / args.profile_steps, "ops_per_step": n_ops, "top": top}


# ---- parent ------------------------------------------------------------------------------------
def spawn(impl: str, args, weights: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", impl, "--weights", weights, "--result", result_path,
        "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--seed", str(args.seed), "--loss", args.loss,
        "--sample-ms", str(args.sample_ms),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd += ["--profile", "--profile-steps", str(args.profile_steps), "--profile-top", str(args.profile_top)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"worker {impl} failed with exit status {proc.returncode}")
        with open(result_path) as f:
            return json.load(f)
    finally:
        os.unlink(result_path)


def save_weights(args, path: str) -> int:
    import torch

    from nanoseek.model import Transformer

    torch.manual_seed(args.seed)
    model = Transformer(build_config(args))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    torch.save(sd, path)
    return sum(v.numel() for v in sd.values())


def summarise(runs: list[dict], args) -> dict[str, dict]:
    tokens = args.batch * args.seq
    out: dict[str, dict] = {}
    for impl in dict.fromkeys(r["impl"] for r in runs):
        rs = [r for r in runs if r["impl"] == impl]
        per_round = [tokens * len(r["step_s"]) / sum(r["step_s"]) for r in rs]
        all_steps = [s for r in rs for s in r["step_s"]]
        out[impl] = {
            "name": rs[0]["name"],
            "tokens_per_s": statistics.median(per_round),
            "tokens_per_s_rounds": per_round,
            "ms_per_step_mean": 1000 * statistics.mean(all_steps),
            "ms_per_step_median": 1000 * statistics.median(all_steps),
            "ms_per_step_min": 1000 * min(all_steps),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in rs),
            "rss_delta_mib": max(r["rss_delta_mib"] for r in rs),
            "rss_base_mib": max(r["rss_base_mib"] for r in rs),
            "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in rs),
            "threads": rs[0]["threads"],
            **{k: rs[0][k] for k in ("attn_implementation", "experts_implementation") if k in rs[0]},
        }
    return out


def print_report(machine: dict, args, summary: dict, runs: list[dict]) -> None:
    print()
    print("## Machine")
    print(f"- CPU: {machine['cpu']} ({', '.join(machine['cpu_simd']) or 'no AVX2'}); "
          f"{machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs; "
          f"{machine['mem_total_gib']} GiB RAM")
    print(f"- torch {machine['torch']} (threads used: {summary['ours']['threads']}), "
          f"transformers {machine['transformers']}, Python {machine['python']}")
    hf = summary.get("hf")
    if hf:
        print(f"- transformers ran with attn_implementation={hf.get('attn_implementation')}, "
              f"experts_implementation={hf.get('experts_implementation')}")
    print(f"- preset {args.preset} (MTP off), {runs[0]['params'] / 1e6:.1f}M params, fp32, "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, "
          f"{args.warmup} warmup + {args.steps} timed steps, {args.rounds} round(s), loss={args.loss}")
    print()
    print("## Training step (forward + loss + backward + zero_grad)")
    print()
    print("| implementation | tokens/s | ms/step (median) | ms/step (min) | peak RSS MiB | peak - base MiB "
          "| ru_maxrss MiB | tokens/s vs transformers | peak delta vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = summary.get("hf")
    for impl, s in summary.items():
        ratio = f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem_ratio = f"{s['rss_delta_mib'] / ref['rss_delta_mib']:.2f}x" if ref else "-"
        print(f"| {s['name']} | {s['tokens_per_s']:.0f} | {s['ms_per_step_median']:.0f} | {s['ms_per_step_min']:.0f} "
              f"| {s['rss_peak_mib']:.0f} | {s['rss_delta_mib']:.0f} | {s['ru_maxrss_mib']:.0f} | {ratio} "
              f"| {mem_ratio} |")
    print()
    print("## Sanity check (first step, same weights and batch)")
    first = {}
    for r in runs:
        first.setdefault(r["impl"], r)
    for impl, r in first.items():
        extra = f", balance loss {r['balance_loss']:.3e}" if "balance_loss" in r else ""
        print(f"- {IMPLS[impl]}: CE loss {r['main_loss']:.6f}{extra}, backprop loss {r['loss']:.6f}, "
              f"grad norm {r['grad_norm']:.6f}")
    if "ours" in first and "hf" in first:
        d = abs(first["ours"]["main_loss"] - first["hf"]["main_loss"])
        verdict = "OK" if d < 1e-4 else "MISMATCH"
        print(f"- |CE(ours) - CE(transformers)| = {d:.2e} ({verdict}, tolerance 1e-4)")
    if args.profile:
        for impl, r in first.items():
            p = r.get("profile")
            if not p:
                continue
            print()
            print(f"## Profile: {IMPLS[impl]} (torch.profiler, per step, {args.profile_steps} steps; "
                  f"{p['per_step_self_ms']:.0f} ms self CPU, {p['ops_per_step']} ops)")
            print()
            print("| op | calls | self ms | self % | total ms |")
            print("|---|---:|---:|---:|---:|")
            for row in p["top"]:
                print(f"| {row['op']} | {row['calls']} | {row['self_ms']:.1f} | {row['self_pct']:.1f} "
                      f"| {row['total_ms']:.1f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--rounds", type=int, default=1, help="run ours, transformers, ... this many times (alternating)")
    p.add_argument("--no-hf-eager", action="store_true", help="skip transformers with experts_implementation=eager")
    p.add_argument("--loss", choices=("total", "main"), default="total",
                   help="ours: backprop main CE + balance loss (total, as in training) or the CE alone (main)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling interval")
    p.add_argument("--profile", action="store_true", help="also profile each implementation with torch.profiler")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-top", type=int, default=25)
    # internal: worker mode
    p.add_argument("--worker", choices=tuple(IMPLS), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        res = run_worker(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return

    machine = machine_info()
    impls = ["ours", "hf"] + ([] if args.no_hf_eager else ["hf-eager"])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        weights = os.path.join(tmp, "weights.pt")
        save_weights(args, weights)
        runs = []
        for rnd in range(args.rounds):
            for impl in impls:
                print(f"[round {rnd + 1}/{args.rounds}] {IMPLS[impl]} ...", file=sys.stderr, flush=True)
                r = spawn(impl, args, weights)
                r["round"] = rnd
                print(f"    {1000 * statistics.median(r['step_s']):.0f} ms/step, peak RSS {r['rss_peak_mib']:.0f} MiB "
                      f"(+{r['rss_delta_mib']:.0f})", file=sys.stderr, flush=True)
                runs.append(r)
    summary = summarise(runs, args)
    print_report(machine, args, summary, runs)
    print(f"\n(wall time {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "summary": summary, "runs": runs}, f, indent=2)
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
