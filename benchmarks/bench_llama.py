"""Batch-1 decode: nanoseek vs llama.cpp (llama-cpp-python) on the same GGUF file, on the CPU.

    python benchmarks/bench_llama.py --checkpoint runs/speedrun/pretrain --type q8_0 --compile
    python benchmarks/bench_llama.py --preset small --type q8_0 --compile [--weights fp32,int8] [--json out.json]

The model (a preset with random weights and a tokenizer trained on the standard library, or a checkpoint with its
tokenizer) is exported with nanoseek.io.gguf; llama.cpp runs the file as it is, nanoseek loads it back in each
weight format of --weights: `fp32` (`nanoseek.load(file)`: Q8_0 / F16 dequantised to fp32) and `int8`
(`nanoseek.load(file, int8=True)`: every matrix as int8 codes with per-row scales, read by an int8 GEMV; from a Q8_0
file the 32-weight blocks are re-quantised per row, nanoseek.fp8.int8), and decodes with its Engine (latent MLA
cache; with --compile also torch.compile'd). All sides decode greedily from the same prompt, EOS ignored; decode
tokens/s counts the tokens after the first over the time from the first to the last (median over rounds after a
warm-up round).

Each side's memory-bandwidth floor: the bytes one decode step reads (every weight a batch-1 step touches: all
matrices but the embedding, of which one row, and of the routed experts the K of E a token chose; MTP modules are
not run; plus the KV cache at the mean context) over the read bandwidth measured here (a sum over a 512 MB tensor
with the same threads): floor tok/s = bandwidth / bytes per token. Where the weights fit the caches (`tiny`) the
floor does not bind. The greedy tokens of every side are compared with llama.cpp's and with nanoseek fp32's (the
dequantised reference of the same file): `first_divergence` is the index of the first differing token (n = none).
Needs `make test-llama` (builds llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

import nanoseek
from nanoseek.data import Tokenizer, stdlib_sources, train_tokenizer
from nanoseek.infer.cache import kv_values_per_token
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.io.gguf import write_gguf
from nanoseek.model import ModelConfig, Transformer

WEIGHTS = ("fp32", "int8")


def export(args) -> tuple[Path, Tokenizer]:
    """The GGUF to race on and its tokenizer."""
    out = Path(tempfile.mkdtemp()) / "model.gguf"
    if args.checkpoint:
        from nanoseek.io.paths import load_tokenizer, resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint)
        tok = load_tokenizer(ckpt, None)
        model = nanoseek.load(ckpt)
    else:
        cfg = nanoseek.preset(args.preset)
        texts = [p.read_text(encoding="utf-8") for p in stdlib_sources()[:200]]
        tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, show_progress=False)
        torch.manual_seed(0)
        model = nanoseek.load(cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size)))
    return write_gguf(model.eval(), out, tok, args.type), tok


def read_bandwidth(threads: int, mbytes: int = 512, rounds: int = 5) -> float:
    """Bytes per second a sum over an fp32 tensor far larger than the caches reads (best of `rounds`)."""
    torch.set_num_threads(threads)
    x = torch.ones(mbytes * 2**20 // 4)
    best = float("inf")
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def _step_fraction(name: str, cfg: ModelConfig, embed: str, experts: str, mtp: bool) -> float:
    """The share of tensor `name` a batch-1 decode step reads: one row of the embedding, K of E routed experts,
    none of an MTP module, all of everything else."""
    if mtp:
        return 0.0
    if name.startswith(embed):
        return 1 / cfg.vocab_size
    if experts in name:
        return cfg.num_experts_per_tok / cfg.n_routed_experts
    return 1.0


def nanoseek_step_bytes(model: Transformer) -> float:
    """Weight bytes one batch-1 decode step of `model` reads (in the format it holds them: fp32 or int8 + scales)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return sum(t.numel() * t.element_size() * _step_fraction(n, model.config, "model.embed_tokens.", ".mlp.experts.",
                                                             n.startswith("mtp.")) for n, t in tensors.items())


def gguf_step_bytes(path: Path, cfg: ModelConfig) -> float:
    """The same for llama.cpp on the GGUF file (its tensors as stored: Q8_0 blocks, F16, F32; its nextn blocks are
    the MTP modules, numbered from num_hidden_layers on)."""
    import gguf

    def mtp(name: str) -> bool:
        return name.startswith("blk.") and int(name.split(".")[1]) >= cfg.num_hidden_layers

    return sum(int(t.n_bytes) * _step_fraction(t.name, cfg, "token_embd.", "_exps.", mtp(t.name))
               for t in gguf.GGUFReader(path).tensors)


def ours(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(decode tokens/s after the first token, tokens)."""
    stamps: list[float] = []
    req = engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True),
                        lambda r: stamps.append(time.perf_counter()))
    while not req.finished:
        engine.step()
    return (n - 1) / max(stamps[-1] - stamps[0], 1e-9), req.output_ids


def theirs(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """llama.cpp's greedy decode (its own sampler, temperature 0), timed the same way."""
    llm.reset()
    out, stamps = [], []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        out.append(int(t))
        if len(out) == n:
            break
    return (n - 1) / max(stamps[-1] - stamps[0], 1e-9), out


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="random weights of this preset (default tiny)")
    ap.add_argument("--checkpoint", help="a trained checkpoint (with its tokenizer.json) instead of --preset")
    ap.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--weights", default="fp32,int8", help=f"nanoseek's weight formats, of {', '.join(WEIGHTS)}")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="also nanoseek's torch.compile'd decode step")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    formats = args.weights.split(",")
    if not formats or any(f not in WEIGHTS for f in formats):
        ap.error(f"--weights: a comma-separated list of {', '.join(WEIGHTS)}, got {args.weights!r}")
    import llama_cpp

    bandwidth = read_bandwidth(args.threads)
    path, tok = export(args)
    n_ctx = args.prompt_len + args.new_tokens + 8
    prompt = torch.randint(10, tok.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    sides: dict[str, Engine] = {}
    step_bytes: dict[str, float] = {}
    for fmt in formats:
        model = nanoseek.load(path, int8=fmt == "int8").eval()
        cfg = model.config
        step_bytes[f"nanoseek-{fmt}"] = nanoseek_step_bytes(model)
        sides[f"nanoseek-{fmt}"] = Engine(model, max_batch=1, max_len=n_ctx)
        if args.compile:
            sides[f"nanoseek-{fmt}+compile"] = Engine(model, max_batch=1, max_len=n_ctx, compile=True)
            step_bytes[f"nanoseek-{fmt}+compile"] = step_bytes[f"nanoseek-{fmt}"]
    step_bytes["llama.cpp"] = gguf_step_bytes(path, cfg)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    kv_bytes = kv_values_per_token(cfg, latent=True) * 4 * cfg.num_hidden_layers * mean_ctx  # nanoseek's fp32 cache
    torch.set_num_threads(args.threads)
    speeds: dict[str, list[float]] = {"llama.cpp": [], **{k: [] for k in sides}}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        speed, tokens["llama.cpp"] = theirs(llm, prompt, args.new_tokens)
        if r:
            speeds["llama.cpp"].append(speed)
        for name, engine in sides.items():
            speed, tokens[name] = ours(engine, prompt, args.new_tokens)
            if r:
                speeds[name].append(speed)
    llm.close()
    tok_s = {k: statistics.median(v) for k, v in speeds.items()}
    res = {
        "model": args.checkpoint or args.preset, "type": args.type, "gguf_bytes": path.stat().st_size,
        "params": sum(p.numel() for p in nanoseek.load(cfg, device="meta").parameters()),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
        "read_bandwidth_GBps": bandwidth / 1e9,
        "decode_tok_s": tok_s,
        "vs_llama.cpp": {k: tok_s[k] / tok_s["llama.cpp"] for k in sides},
        "weight_MB_per_token": {k: b / 1e6 for k, b in step_bytes.items()},
        "kv_MB_per_token": kv_bytes / 1e6,
        "bandwidth_floor_tok_s": {k: bandwidth / (b + kv_bytes) for k, b in step_bytes.items()},
        "share_of_floor": {k: tok_s[k] * (step_bytes[k] + kv_bytes) / bandwidth for k in step_bytes},
        "first_divergence": {
            "vs_llama.cpp": {k: first_divergence(tokens[k], tokens["llama.cpp"]) for k in sides},
            **({"vs_nanoseek-fp32": {k: first_divergence(tokens[k], tokens["nanoseek-fp32"]) for k in sides
                                     if k != "nanoseek-fp32"}} if "fp32" in formats else {}),
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                     "llama-cpp-python": metadata.version("llama-cpp-python")},
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
