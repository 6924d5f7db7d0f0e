#!/usr/bin/env python
"""Training-step throughput and peak memory: nanoseek `Transformer` vs transformers' `DeepseekV3ForCausalLM`.

Both models get the same config (our preset with MTP off, since transformers has no MTP) and the same weights
(ours are copied into the transformers model with `load_state_dict`), so they compute the same function; the
first-step losses are printed side by side as a sanity check.

One step = forward + loss (mean cross-entropy on the next tokens) + backward + zero grads.
  ours:         out = model(x, labels=y, return_logits=False); out.loss.backward()  (as nanoseek.train calls it:
                chunked linear CE, main CE + the MoE balance loss; `--loss main` backprops the CE alone)
  ours-logits:  the same with model(x, labels=y): full [tokens, vocab] logits, like transformers (`--impls`)
  transformers: model(input_ids=x, labels=y, shift_labels=y).loss.backward()  (CE over the same S positions)

Each implementation runs in its own subprocess (so the peak RSS of one is not polluted by the other), in the
order ours, transformers[, transformers with eager experts (--hf-eager)], repeated `--rounds` times, every other
round in reverse order so that neither side always runs first. Peak memory is sampled by a background thread
reading /proc/self/statm every `--sample-ms` milliseconds during all steps (warmup included: the first step
allocates the gradients); the delta is over the RSS right after model construction.
"saved activations" is what autograd keeps for backward in one forward (deterministic, unlike RSS).

Timings on a shared VM drift by +-20% over minutes: the "same-round speed-up" compares neighbours in time, runs
during which other processes used CPU (`--max-foreign`) are left out of the timings, and the report prints the
matmul FLOPs of a step next to the best fp32 GEMM rate measured here (a floor no fp32 implementation can beat).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py                 # small preset, batch 4 x seq 256
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --profile       # + top ops by self CPU time
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --hf-eager      # + transformers' eager experts
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --out runs/bench_train.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --worker-env MALLOC_MMAP_MAX_=0   # allocator A/B
"""

from __future__ import annotations

import argparse
import gc
import inspect
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
    "ours": "nanoseek",  # the trainer's call: chunked linear CE (return_logits=False) where the model has it
    "ours-logits": "nanoseek (full logits)",  # model(x, labels=y): logits materialised, as transformers does
    "ours-fp8": "nanoseek FP8",  # the trainer's call with convert_to_fp8: FP8 GEMMs (emulated on the CPU)
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


def cpu_busy_s() -> float | None:
    """Seconds of busy CPU time of the whole machine (all processes), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


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


def train_flops(cfg, batch: int, seq: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward x 3: backward = 2 x forward), by part; causal attention
    counted as half of the S x S products. Elementwise work, the router top-k and the loss are not counted."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    qk, dv = cfg.qk_head_dim, cfg.v_head_dim
    q = h * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk if cfg.q_lora_rank else h * nh * qk
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + dv)
    attn_proj = q + kv + nh * dv * h
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    routed = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * 3 * h * cfg.moe_intermediate_size
    tokens = batch * seq
    per_token = {  # forward multiply-adds per token
        "attention projections": cfg.num_hidden_layers * attn_proj,
        "attention scores (causal)": cfg.num_hidden_layers * nh * (qk + dv) * (seq + 1) / 2,
        "dense MLP": n_dense * 3 * h * cfg.intermediate_size,
        "routed experts": n_moe * routed,
        "shared experts + router": n_moe * (shared + h * cfg.n_routed_experts),
        "lm_head": h * cfg.vocab_size,
    }
    return {k: 3 * 2 * v * tokens for k, v in per_token.items()}


def gemm_peak_gflops() -> float:
    """Best fp32 GEMM rate of a few shapes like the model's (square, lm_head), for a roofline."""
    import torch

    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 512, 32000), (4096, 512, 512)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        ts = []
        for _ in range(6):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * m * k * n / min(ts) / 1e9)
    return best


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
    if impl.startswith("ours"):
        from nanoseek.model import Transformer

        model = Transformer(cfg)
        model.load_state_dict(sd, strict=True)
        if impl == "ours-fp8":
            from nanoseek.fp8 import convert_to_fp8

            convert_to_fp8(model)
        info["return_logits"] = not (impl in ("ours", "ours-fp8") and _has_return_logits(model))
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


def _has_return_logits(model) -> bool:
    return "return_logits" in inspect.signature(model.forward).parameters


def forward_fn(impl: str, model, x, y, autocast: str = "none"):
    """A closure doing one forward with the loss and returning the model output; `autocast` bf16 runs it under
    torch.autocast (bf16 GEMMs, fp32 master weights), as training on a GPU does."""
    import contextlib

    import torch

    def ctx():
        if autocast == "bf16":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if impl in ("ours", "ours-fp8") and _has_return_logits(model):
        call = lambda: model(x, labels=y, return_logits=False)  # noqa: E731  (as nanoseek.train does)
    elif impl.startswith("ours"):
        call = lambda: model(x, labels=y)  # noqa: E731
    else:
        call = lambda: model(input_ids=x, labels=y, shift_labels=y, use_cache=False)  # noqa: E731

    def forward():
        with ctx():
            return call()

    return forward


def step_fn(forward):
    """One forward + loss + backward, returning the model output (zero_grad is the caller's)."""

    def step():
        out = forward()
        out.loss.backward()
        return out

    return step


def saved_activation_mib(step_forward, model) -> float:
    """MiB of tensors autograd keeps for backward in one forward (unique storages, parameters excluded).
    Deterministic, unlike RSS; the transient buffers of the backward are not in it."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    del out
    return sum(seen.values()) / MiB


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
    forward = forward_fn(impl, model, x, y, args.autocast)
    step = step_fn(forward)

    gc.collect()
    rss_base = rss_bytes()
    sampler = RSSSampler(args.sample_ms / 1000)
    sampler.start()
    times, first = [], {}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            ru0, busy0, wall0 = resource.getrusage(resource.RUSAGE_SELF), cpu_busy_s(), time.perf_counter()
        t = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t
        if i == 0:  # the sanity-check numbers, outside the measured time
            first = {"loss": float(out.loss)}
            if impl.startswith("ours"):
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
    ru1, busy1, wall = resource.getrusage(resource.RUSAGE_SELF), cpu_busy_s(), time.perf_counter() - wall0
    peak = sampler.stop()
    ru_maxrss = _ru_maxrss_bytes()  # before the measurements below allocate their own buffers
    saved = saved_activation_mib(forward, model)
    ru_g, busy_g, wall_g = resource.getrusage(resource.RUSAGE_SELF), cpu_busy_s(), time.perf_counter()
    gemm = gemm_peak_gflops()
    ru_g2, busy_g2 = resource.getrusage(resource.RUSAGE_SELF), cpu_busy_s()
    gemm_foreign = None
    if busy_g is not None and busy_g2 is not None:
        mine = (ru_g2.ru_utime - ru_g.ru_utime) + (ru_g2.ru_stime - ru_g.ru_stime)
        gemm_foreign = max(0.0, (busy_g2 - busy_g) - mine) / (time.perf_counter() - wall_g)
    n = max(1, args.steps)
    usage = {
        "user_s_per_step": (ru1.ru_utime - ru0.ru_utime) / n,
        "sys_s_per_step": (ru1.ru_stime - ru0.ru_stime) / n,
        "minor_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) / n,
    }
    if busy0 is not None and busy1 is not None:
        # CPU used by other processes during the timed steps, in cores; > ~0.2 means the timings are polluted
        mine = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        usage["foreign_cpu_cores"] = max(0.0, (busy1 - busy0) - mine) / wall

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
        "ru_maxrss_mib": ru_maxrss / MiB,
        "rss_samples": sampler.samples,
        "saved_activations_mib": saved,
        "fp32_gemm_gflops": gemm,
        "fp32_gemm_foreign_cpu_cores": gemm_foreign,
        **usage,
        **first,
        **info,
    }
    if args.profile:
        res["profile"] = profile_steps(step, model, args)
    return res


def profile_steps(step, model, args) -> dict:
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
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--weights",
        weights,
        "--result",
        result_path,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--loss",
        args.loss,
        "--autocast",
        args.autocast,
        "--sample-ms",
        str(args.sample_ms),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd += ["--profile", "--profile-steps", str(args.profile_steps), "--profile-top", str(args.profile_top)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for kv in args.worker_env:
        k, _, v = kv.partition("=")
        env[k] = v
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
    """Per implementation: tokens/s from the median step over its clean runs (other processes' CPU below
    `--max-foreign`; all runs when none is clean) and from the fastest step; the largest memory numbers."""
    tokens = args.batch * args.seq

    def clean(r: dict) -> bool:
        return (r.get("foreign_cpu_cores") or 0.0) <= args.max_foreign

    out: dict[str, dict] = {}
    for impl in dict.fromkeys(r["impl"] for r in runs):
        every = [r for r in runs if r["impl"] == impl]
        rs = [r for r in every if clean(r)] or every
        steps = [s for r in rs for s in r["step_s"]]

        def avg(key: str, rs: list[dict] = rs) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return statistics.mean(vals) if vals else None

        out[impl] = {
            "name": rs[0]["name"],
            "runs_used": len(rs),
            "runs_total": len(every),
            "tokens_per_s": tokens / statistics.median(steps),
            "tokens_per_s_best": tokens / min(steps),
            "tokens_per_s_mean": tokens * len(steps) / sum(steps),
            "ms_per_step_median": 1000 * statistics.median(steps),
            "ms_per_step_min": 1000 * min(steps),
            "ms_per_step_mean": 1000 * statistics.mean(steps),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in every),
            "rss_delta_mib": max(r["rss_delta_mib"] for r in every),
            "rss_base_mib": max(r["rss_base_mib"] for r in every),
            "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in every),
            "user_s_per_step": avg("user_s_per_step"),
            "sys_s_per_step": avg("sys_s_per_step"),
            "minor_faults_per_step": avg("minor_faults_per_step"),
            "foreign_cpu_cores": max((r.get("foreign_cpu_cores") or 0.0) for r in rs),
            "saved_activations_mib": rs[0]["saved_activations_mib"],
            "ms_per_step_rounds": {r["round"]: 1000 * statistics.median(r["step_s"]) for r in every},
            "clean_rounds": [r["round"] for r in every if clean(r)],
            "threads": rs[0]["threads"],
            **{k: rs[0][k] for k in ("attn_implementation", "experts_implementation") if k in rs[0]},
        }
    ref = out.get("hf")
    for s in out.values():  # speed-up within each round where both ran clean (neighbours in time), median
        if ref:
            both = [r for r in s["clean_rounds"] if r in ref["clean_rounds"]]
            if both:
                s["speedup_paired"] = statistics.median(
                    ref["ms_per_step_rounds"][r] / s["ms_per_step_rounds"][r] for r in both
                )
                s["paired_rounds"] = len(both)
    return out


def print_report(machine: dict, args, summary: dict, runs: list[dict], flops: dict[str, float]) -> None:
    print()
    print("## Machine")
    print(
        f"- CPU: {machine['cpu']} (flags: {', '.join(machine['cpu_simd']) or 'no AVX2'}); "
        f"{machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs; "
        f"{machine['mem_total_gib']} GiB RAM"
    )
    print(
        f"- torch {machine['torch']} (intra-op threads used: {next(iter(summary.values()))['threads']}), "
        f"transformers {machine['transformers']}, Python {machine['python']}"
    )
    if "ours" in summary:
        fused = not next(r for r in runs if r["impl"] == "ours")["return_logits"]
        print(
            "- nanoseek called as the trainer does: "
            + ("model(x, labels=y, return_logits=False) (chunked linear CE)" if fused else "model(x, labels=y)")
        )
    hf = summary.get("hf")
    if hf:
        print(
            f"- transformers defaults used: attn_implementation={hf.get('attn_implementation')}, "
            f"experts_implementation={hf.get('experts_implementation')}"
        )
    print(
        f"- preset {args.preset} (MTP off), {runs[0]['params'] / 1e6:.1f}M params, "
        f"{'bf16 autocast' if args.autocast == 'bf16' else 'fp32'}, "
        f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, "
        f"{args.warmup} warmup + {args.steps} timed steps x {args.rounds} round(s), loss={args.loss}"
    )
    if args.worker_env:
        print(f"- worker environment: {' '.join(args.worker_env)}")
    total = sum(flops.values())
    peak = machine["fp32_gemm_peak_gflops"]
    print(
        f"- matmul work: {total / 1e9:.0f} GFLOP/step ("
        + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in flops.items())
        + f"); best fp32 GEMM rate measured here (in the workers) {peak:.0f} GFLOP/s, so no fp32 step can beat "
        f"~{1000 * total / 1e9 / peak:.0f} ms "
        f"(~{args.batch * args.seq / (total / 1e9 / peak):.0f} tokens/s)"
    )
    print()
    print("## Training step (forward + loss + backward + zero_grad)")
    print()
    print(
        "tokens/s from the median step over the clean runs (best = fastest step); peak RSS sampled every "
        f"{args.sample_ms:g} ms, base = RSS after model construction"
    )
    print()
    print(
        "| implementation | clean runs | tokens/s | best tokens/s | ms/step (median) | tokens/s vs transformers "
        "| same-round speed-up | peak RSS MiB | peak - base MiB | (peak - base) vs transformers "
        "| saved activations MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = summary.get("hf")
    for s in summary.values():
        ratio = f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        paired = f"{s['speedup_paired']:.2f}x" if "speedup_paired" in s else "-"
        mem_ratio = f"{s['rss_delta_mib'] / ref['rss_delta_mib']:.2f}x" if ref else "-"
        print(
            f"| {s['name']} | {len(s['clean_rounds'])}/{s['runs_total']} | {s['tokens_per_s']:.0f} "
            f"| {s['tokens_per_s_best']:.0f} | {s['ms_per_step_median']:.0f} "
            f"| {ratio} | {paired} | {s['rss_peak_mib']:.0f} | {s['rss_delta_mib']:.0f} | {mem_ratio} "
            f"| {s['saved_activations_mib']:.0f} |"
        )
    print()
    print(
        "same-round speed-up = median over rounds of transformers' median step / this one's, each pair run back "
        "to back, over the rounds where both ran clean (less exposed to the host's speed drifting than the pooled "
        "numbers); per-round ms/step (* = polluted by other processes, left out): "
        + "; ".join(
            f"{s['name']} "
            + ", ".join(f"{v:.0f}{'' if r in s['clean_rounds'] else '*'}" for r, v in s["ms_per_step_rounds"].items())
            for s in summary.values()
        )
    )
    print()
    print(
        "| implementation | matmul GFLOP/s achieved | user CPU s/step | sys CPU s/step | minor page faults/step "
        "| ru_maxrss MiB | other processes' CPU (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in summary.values():
        print(
            f"| {s['name']} | {s['achieved_gflops']:.0f} | {s['user_s_per_step']:.2f} | {s['sys_s_per_step']:.2f} "
            f"| {s['minor_faults_per_step']:.0f} | {s['ru_maxrss_mib']:.0f} | {s['foreign_cpu_cores']:.2f} |"
        )
    noisy = [s["name"] for s in summary.values() if s["runs_used"] < s["runs_total"] or not s["clean_rounds"]]
    if noisy:
        print(
            f"\nWARNING: other processes used more than {args.max_foreign} cores during some timed steps of "
            f"{', '.join(noisy)}; those runs are left out of the timings (all are kept if none is clean): "
            "rerun on an idle machine or with more --rounds."
        )
    print()
    print("## Sanity check (first step, same weights and batch)")
    first = {}
    for r in runs:
        first.setdefault(r["impl"], r)
    for impl, r in first.items():
        extra = f", balance loss {r['balance_loss']:.3e}" if "balance_loss" in r else ""
        print(
            f"- {IMPLS[impl]}: CE loss {r['main_loss']:.6f}{extra}, backprop loss {r['loss']:.6f}, "
            f"grad norm {r['grad_norm']:.6f}"
        )
    for ours in ("ours", "ours-logits"):
        if ours in first and "hf" in first:
            d = abs(first[ours]["main_loss"] - first["hf"]["main_loss"])
            verdict = "OK" if d < 1e-4 else "MISMATCH"
            print(f"- |CE({IMPLS[ours]}) - CE(transformers)| = {d:.2e} ({verdict}, tolerance 1e-4)")
    if args.profile:
        for impl, r in first.items():
            p = r.get("profile")
            if not p:
                continue
            print()
            print(
                f"## Profile: {IMPLS[impl]} (torch.profiler, per step over {args.profile_steps} steps; "
                f"{p['per_step_self_ms']:.0f} ms self CPU, {p['ops_per_step']} ops/step)"
            )
            print()
            print("| op | calls/step | self ms | self % | total ms |")
            print("|---|---:|---:|---:|---:|")
            for row in p["top"]:
                print(
                    f"| {row['op']} | {row['calls']} | {row['self_ms']:.1f} | {row['self_pct']:.1f} "
                    f"| {row['total_ms']:.1f} |"
                )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run every implementation this many times, each in a fresh process, alternating; every other round "
        "in reverse order",
    )
    p.add_argument("--fixed-order", action="store_true", help="do not reverse the order on odd rounds")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.2,
        help="a run during which other processes used more CPU cores than this is left out of the timings",
    )
    p.add_argument(
        "--impls",
        default="ours,hf",
        help="comma-separated, run in this order each round: ours (as the trainer calls it: chunked CE), "
        "ours-logits (full logits like transformers), hf (transformers defaults), "
        "hf-eager (transformers with experts_implementation='eager')",
    )
    p.add_argument("--hf-eager", action="store_true", help="shorthand: add hf-eager to --impls")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for every worker (repeatable), e.g. MALLOC_MMAP_MAX_=0 to try glibc tuning",
    )
    p.add_argument(
        "--loss",
        choices=("total", "main"),
        default="total",
        help="ours: backprop main CE + balance loss (total, as in training) or the CE alone (main)",
    )
    p.add_argument(
        "--autocast",
        choices=("none", "bf16"),
        default="none",
        help="bf16: every implementation's forward under torch.autocast(bfloat16) (fast on CPUs with AVX512-BF16)",
    )
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
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("need --steps >= 1, --warmup >= 0, --rounds >= 1")
    if args.worker:
        res = run_worker(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return

    machine = machine_info()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.hf_eager and "hf-eager" not in impls:
        impls.append("hf-eager")
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise SystemExit(f"--impls: unknown {bad}; choose from {', '.join(IMPLS)}")
    from nanoseek.model import preset

    flops = train_flops(preset(args.preset), args.batch, args.seq)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        weights = os.path.join(tmp, "weights.pt")
        save_weights(args, weights)
        runs = []
        for rnd in range(args.rounds):
            # odd rounds run in reverse order (ours, hf, hf, ours, ...) so that neither side is always first
            order = impls if (rnd % 2 == 0 or args.fixed_order) else impls[::-1]
            for pos, impl in enumerate(order):
                print(f"[round {rnd + 1}/{args.rounds}] {IMPLS[impl]} ...", file=sys.stderr, flush=True)
                r = spawn(impl, args, weights)
                r["round"], r["position"] = rnd, pos
                print(
                    f"    {1000 * statistics.median(r['step_s']):.0f} ms/step (median), peak RSS "
                    f"{r['rss_peak_mib']:.0f} MiB (+{r['rss_delta_mib']:.0f}), other processes' CPU "
                    f"{r.get('foreign_cpu_cores') or 0:.2f} cores",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(r)
    summary = summarise(runs, args)
    # GEMM peak: measured in every worker after its steps; the best clean measurement (the host's speed drifts)
    gemms = [r["fp32_gemm_gflops"] for r in runs if (r.get("fp32_gemm_foreign_cpu_cores") or 0.0) <= args.max_foreign]
    machine["fp32_gemm_peak_gflops"] = max(gemms or [r["fp32_gemm_gflops"] for r in runs])
    total = sum(flops.values())
    for sm in summary.values():
        sm["gflops_per_step"] = total / 1e9
        sm["achieved_gflops"] = total / 1e9 / (sm["ms_per_step_median"] / 1000)
    print_report(machine, args, summary, runs, flops)
    print(f"\n(wall time {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine, "flops_per_step": flops, "summary": summary, "runs": runs},
                f,
                indent=2,
            )
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
