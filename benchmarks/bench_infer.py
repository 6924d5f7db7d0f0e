"""Inference: nanoseek's engine vs transformers' `generate` on the same weights, side by side in one process.

    python benchmarks/bench_infer.py --preset tiny --preset small [--new-tokens 64] [--rounds 5] [--json out.json]

For each preset: random weights (std 0.006 init) saved in the HF layout and loaded by both sides. Measured, in
alternating rounds (median reported): decode tokens/s at batch 1 and 8 (greedy, prompt of 64 tokens, EOS ignored,
time of the whole generate minus time to first token), time to first token (prefill + 1 token), and KV-cache bytes
per token (ours: the preallocated buffers; transformers: the tensors in its DynamicCache after generation).
Greedy outputs of both sides are compared. MTP speculative decoding is measured separately by
`benchmarks/bench_spec.py` (it needs trained weights: random MTP heads accept nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from importlib import metadata

import torch

import nanoseek
from nanoseek.infer.cache import kv_values_per_token
from nanoseek.infer.engine import Engine, SamplingParams


def hf_model(path: str):
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


def hf_generate(model, prompt: torch.Tensor, n: int) -> tuple[float, float, list[int], int]:
    """(ttft s, total s, tokens of row 0, cache bytes)."""
    attn = torch.ones_like(prompt)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=attn)
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True, **kw)
        total = time.perf_counter() - t
    cache = out.past_key_values
    nbytes = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t_ = getattr(layer, name, None)
            if isinstance(t_, torch.Tensor):
                nbytes += t_.numel() * t_.element_size()
    return ttft, total, out.sequences[0, prompt.shape[1]:].tolist(), nbytes


def ours_generate(engine: Engine, prompt: torch.Tensor, n: int) -> tuple[float, float, list[int]]:
    rows = prompt.tolist()
    t = time.perf_counter()
    engine.generate([rows[0]] * len(rows), SamplingParams(max_new_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    reqs = engine.generate(rows, SamplingParams(max_new_tokens=n, ignore_eos=True))
    total = time.perf_counter() - t
    return ttft, total, reqs[0].output_ids


def bench_preset(name: str, args) -> dict:
    torch.manual_seed(0)
    model = nanoseek.load(name).eval()
    cfg = model.config
    tmp = tempfile.mkdtemp()
    nanoseek.save(model, tmp)
    hf = hf_model(tmp)
    res: dict = {"preset": name, "params": sum(p.numel() for p in model.parameters())}
    max_len = args.prompt_len + args.new_tokens + 8
    engines = {mode: Engine(model, max_batch=max(args.batch), max_len=max_len, cache=mode) for mode in args.cache}
    for bs in args.batch:
        prompt = torch.randint(10, cfg.vocab_size, (bs, args.prompt_len), generator=torch.Generator().manual_seed(1))
        rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in ["hf", *engines]}
        same = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            ttft, total, hf_tok, hf_bytes = hf_generate(hf, prompt, args.new_tokens)
            if r:
                rounds["hf"].append((ttft, total))
            for mode, eng in engines.items():
                ttft, total, toks = ours_generate(eng, prompt, args.new_tokens)
                same[mode] = toks == hf_tok
                if r:
                    rounds[mode].append((ttft, total))
        entry: dict = {}
        for k, rs in rounds.items():
            ttft = statistics.median(x[0] for x in rs)
            dec = statistics.median(bs * (args.new_tokens - 1) / max(x[1] - x[0], 1e-9) for x in rs)
            entry[k] = {"decode_tok_s": dec, "ttft_ms": ttft * 1e3}
        for mode in engines:
            entry[mode]["speedup_vs_hf"] = entry[mode]["decode_tok_s"] / entry["hf"]["decode_tok_s"]
            entry[mode]["same_greedy_tokens_as_hf"] = same[mode]
        entry["hf"]["kv_bytes_per_token"] = hf_bytes / (bs * (args.prompt_len + args.new_tokens - 1))
        res[f"batch{bs}"] = entry
    L = cfg.num_hidden_layers
    for mode in args.cache:
        res[f"kv_bytes_per_token_{mode}"] = kv_values_per_token(cfg, mode == "latent") * 4 * L
    v3 = nanoseek.preset("v3")
    res["v3_values_per_token_per_layer"] = {"latent": kv_values_per_token(v3, True),
                                            "naive": kv_values_per_token(v3, False)}
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="tiny, small (repeatable; default both)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--cache", action="append", choices=["latent", "naive"], help="default both")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.preset = args.preset or ["tiny", "small"]
    args.batch = args.batch or [1, 8]
    args.cache = args.cache or ["latent", "naive"]
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": metadata.version("transformers"),
               "python": sys.version.split()[0]}
    results = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "json"},
               "presets": [bench_preset(p, args) for p in args.preset]}
    print(f"machine: {machine}")
    for r in results["presets"]:
        print(f"\n## {r['preset']} ({r['params'] / 1e6:.1f}M parameters)")
        print("| batch | impl | decode tok/s | vs transformers | TTFT ms | same greedy tokens |")
        print("|---|---|---|---|---|---|")
        for bs in args.batch:
            e = r[f"batch{bs}"]
            for k, v in e.items():
                sp = f"{v['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in v else "1.00x"
                same = v.get("same_greedy_tokens_as_hf", "")
                label = "transformers" if k == "hf" else f"nanoseek ({k} cache)"
                print(f"| {bs} | {label} | {v['decode_tok_s']:.1f} | {sp} | {v['ttft_ms']:.1f} | {same} |")
        kv = {m: r[f"kv_bytes_per_token_{m}"] for m in args.cache}
        hf_kv = r[f"batch{args.batch[0]}"]["hf"]["kv_bytes_per_token"]
        print(f"KV bytes/token (all layers, fp32): {kv} ; transformers DynamicCache: {hf_kv:.0f}")
        v3 = r["v3_values_per_token_per_layer"]
        print(f"V3 head dims: latent {v3['latent']} vs naive {v3['naive']} values/token/layer "
              f"= {v3['naive'] / v3['latent']:.1f}x smaller")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
