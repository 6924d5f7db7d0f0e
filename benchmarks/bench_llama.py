"""Batch-1 decode: nanoseek vs llama.cpp (llama-cpp-python) on the same GGUF file, on the CPU.

    python benchmarks/bench_llama.py --preset tiny [--type f32] [--new-tokens 128] [--rounds 5] [--json out.json]
    python benchmarks/bench_llama.py --checkpoint runs/speedrun --type q8_0

The model (a preset with random weights and a tokenizer trained on the standard library, or a checkpoint with its
tokenizer) is exported with nanoseek.io.gguf; llama.cpp runs the file as it is, nanoseek loads it back
(`nanoseek.load(file)`, dequantised to fp32) and decodes with its Engine (latent MLA cache, optionally
torch.compile'd). Both decode greedily from the same prompt, EOS ignored; decode tokens/s counts the tokens after
the first over the time from the first to the last (median over rounds after a warm-up round). The greedy tokens
of both sides are compared (equal for f32 up to near-ties). Needs `make test-llama` (builds llama-cpp-python).
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
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.io.gguf import write_gguf


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="random weights of this preset (default tiny)")
    ap.add_argument("--checkpoint", help="a trained checkpoint (with its tokenizer.json) instead of --preset")
    ap.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="also nanoseek's torch.compile'd decode step")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import llama_cpp

    torch.set_num_threads(args.threads)
    path, tok = export(args)
    model = nanoseek.load(path).eval()
    n_ctx = args.prompt_len + args.new_tokens + 8
    prompt = torch.randint(10, tok.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    sides = {"nanoseek": Engine(model, max_batch=1, max_len=n_ctx)}
    if args.compile:
        sides["nanoseek+compile"] = Engine(model, max_batch=1, max_len=n_ctx, compile=True)
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
    res = {
        "model": args.checkpoint or args.preset, "type": args.type, "gguf_bytes": path.stat().st_size,
        "params": sum(p.numel() for p in model.parameters()), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
        "decode_tok_s": {k: statistics.median(v) for k, v in speeds.items()},
        "same_greedy_tokens": {k: tokens[k] == tokens["llama.cpp"] for k in sides},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                     "llama-cpp-python": metadata.version("llama-cpp-python")},
    }
    for k in sides:
        res[f"{k}_vs_llama.cpp"] = res["decode_tok_s"][k] / res["decode_tok_s"]["llama.cpp"]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
