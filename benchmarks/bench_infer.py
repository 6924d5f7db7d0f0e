"""Inference: nanoseek's engine vs transformers' `generate` on the same weights, side by side in one process.

    python benchmarks/bench_infer.py --preset tiny --preset small [--new-tokens 64] [--rounds 5] [--json out.json]

For each preset: random weights (std 0.006 init) saved in the HF layout and loaded by both sides. Measured, in
alternating rounds (median reported): decode tokens/s at batch 1 and 8 (greedy, prompt of 64 tokens, EOS ignored;
the tokens after the first over the time from the first to the last, stamped per token in the same run: a
transformers streamer at batch 1; at batch 8, whole generate minus a separate 1-token generate), time to first
token (prefill + 1 token), and KV-cache bytes
per token (ours: the preallocated buffers; transformers: the tensors in its DynamicCache after generation).
Greedy outputs of both sides are compared.

`--spec-checkpoint DIR` (a trained checkpoint with MTP weights, e.g. the speedrun's; random MTP heads accept
nothing) adds MTP speculative decoding: plain vs speculative greedy decode on held-out text prompts, acceptance
rate, forwards per token and speed-up, and checks that both produce the same tokens.
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


def hf_model(path: str, dtype: torch.dtype = torch.float32):
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


class _Stamps:
    """A transformers streamer that only records when each batch of new tokens arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, prompt: torch.Tensor, n: int) -> tuple[float, float, list[int], int]:
    """(ttft s, decode s for the n - 1 tokens after the first, tokens of row 0, cache bytes)."""
    attn = torch.ones_like(prompt)
    stamps = _Stamps()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=attn)
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True,
                             streamer=stamps if prompt.shape[0] == 1 else None, **kw)
        total = time.perf_counter() - t
    if prompt.shape[0] == 1:  # put() is called with the prompt first, then once per new token
        first, last = stamps.times[1], stamps.times[-1]
        ttft, dec = first - t, last - first
    else:  # transformers' streamers take batch 1 only: time a 1-token generate for the TTFT
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t1
        dec = total - ttft
    cache = out.past_key_values
    nbytes = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t_ = getattr(layer, name, None)
            if isinstance(t_, torch.Tensor):
                nbytes += t_.numel() * t_.element_size()
    return ttft, dec, out.sequences[0, prompt.shape[1]:].tolist(), nbytes


def ours_generate(engine: Engine, prompt: torch.Tensor, n: int) -> tuple[float, float, list[int]]:
    """(ttft s, decode s for the tokens after the first, tokens of row 0): per-token timestamps of one run."""
    first: list[float] = []
    last: list[float] = []

    def on_update(req) -> None:
        now = time.perf_counter()
        if req.output_ids and not first:
            first.append(now)
        last[:] = [now]

    t = time.perf_counter()
    reqs = [engine.submit(row, SamplingParams(max_new_tokens=n, ignore_eos=True), on_update) for row in prompt.tolist()]
    while not all(r.finished for r in reqs):
        engine.step()
    return first[0] - t, last[0] - first[0], reqs[0].output_ids


def bench_preset(name: str, args) -> dict:
    torch.manual_seed(0)
    model = nanoseek.load(name).eval()
    cfg = model.config
    tmp = tempfile.mkdtemp()
    nanoseek.save(model, tmp)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    hf = hf_model(tmp, dtype)
    res: dict = {"preset": name, "params": sum(p.numel() for p in model.parameters())}
    max_len = args.prompt_len + args.new_tokens + 8
    for bs in args.batch:
        engines = {mode: Engine(model, max_batch=bs, max_len=max_len, cache=mode) for mode in args.cache}
        if args.compile:  # static shapes: one compiled decode step per batch size (compiled in the warm-up round)
            engines.update({f"{mode}+compile": Engine(model, max_batch=bs, max_len=max_len, cache=mode, compile=True)
                            for mode in args.cache})
        prompt = torch.randint(10, cfg.vocab_size, (bs, args.prompt_len), generator=torch.Generator().manual_seed(1))
        rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in ["hf", *engines]}
        same = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            ttft, dec, hf_tok, hf_bytes = hf_generate(hf, prompt, args.new_tokens)
            if r:
                rounds["hf"].append((ttft, dec))
            for mode, eng in engines.items():
                ttft, dec, toks = ours_generate(eng, prompt, args.new_tokens)
                same[mode] = toks == hf_tok
                if r:
                    rounds[mode].append((ttft, dec))
        entry: dict = {}
        for k, rs in rounds.items():
            ttft = statistics.median(x[0] for x in rs)
            dec = statistics.median(bs * (args.new_tokens - 1) / max(x[1], 1e-9) for x in rs)
            entry[k] = {"decode_tok_s": dec, "ttft_ms": ttft * 1e3}
        for mode in engines:
            entry[mode]["speedup_vs_hf"] = entry[mode]["decode_tok_s"] / entry["hf"]["decode_tok_s"]
            entry[mode]["same_greedy_tokens_as_hf"] = same[mode]
        entry["hf"]["kv_bytes_per_token"] = hf_bytes / (bs * (args.prompt_len + args.new_tokens - 1))
        res[f"batch{bs}"] = entry
    L = cfg.num_hidden_layers
    for mode in args.cache:
        res[f"kv_bytes_per_token_{mode}"] = kv_values_per_token(cfg, mode == "latent") * dtype.itemsize * L
    v3 = nanoseek.preset("v3")
    res["v3_values_per_token_per_layer"] = {"latent": kv_values_per_token(v3, True),
                                            "naive": kv_values_per_token(v3, False)}
    return res


def bench_speculative(args) -> dict:
    from nanoseek.data import Tokenizer
    from nanoseek.io.paths import resolve_checkpoint

    ckpt = resolve_checkpoint(args.spec_checkpoint)
    tok = Tokenizer.load(args.spec_tokenizer or ckpt / "tokenizer.json")
    model = nanoseek.load(ckpt).eval()
    docs = [json.loads(line) for line in open(args.spec_prompts)]
    texts = [d["text"] for d in docs if not d["source"].startswith("encodings/") and len(d["text"]) > 400]
    texts = texts[:: max(1, len(texts) // args.spec_n)][: args.spec_n]  # spread over the held-out documents
    prompts = [[tok.bos_id] + tok.encode(t, allow_special=False)[:48] for t in texts]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    out: dict = {"checkpoint": str(ckpt), "prompts": len(prompts)}
    modes = ["plain", "speculative"] + (["plain+compile", "speculative+compile"] if args.compile else [])
    engines = {m: Engine(model, tok, max_batch=1, max_len=48 + args.new_tokens + 8,
                         speculative=m.startswith("speculative"), compile=m.endswith("+compile")) for m in modes}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    toks: dict[str, list[list[int]]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for mode, eng in engines.items():
            eng.stats = type(eng.stats)()
            t = time.perf_counter()
            res = [eng.generate([p], params)[0] for p in prompts]
            if r:
                runs[mode].append(sum(len(x.output_ids) for x in res) / (time.perf_counter() - t))
            toks[mode] = [x.output_ids for x in res]
            out[f"{mode}_forwards_per_token"] = eng.stats.decode_forwards / max(eng.stats.generated_tokens, 1)
            if mode.startswith("speculative"):
                out[f"{mode}_acceptance_rate"] = eng.stats.acceptance_rate
    for mode, v in runs.items():
        out[f"{mode}_tok_s"] = statistics.median(v)
    out["speedup"] = out["speculative_tok_s"] / out["plain_tok_s"]
    if args.compile:
        out["speedup_compiled"] = out["speculative+compile_tok_s"] / out["plain+compile_tok_s"]
    out["same_tokens"] = all(toks[m] == toks["plain"] for m in modes)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="tiny, small (repeatable; default both)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--cache", action="append", choices=["latent", "naive"], help="default both")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and compute of both sides (bfloat16: half the bytes per decoded token)")
    ap.add_argument("--compile", action="store_true", help="also measure Engine(compile=True)")
    ap.add_argument("--spec-checkpoint", help="trained checkpoint for the speculative-decoding measurement")
    ap.add_argument("--spec-tokenizer", help="its tokenizer.json (default: inside the checkpoint)")
    ap.add_argument("--spec-prompts", default="runs/speedrun/data/val_docs.jsonl",
                    help="held-out documents (JSONL with source/text, as written by prepare_corpus)")
    ap.add_argument("--spec-n", type=int, default=8, help="number of prompts")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.preset = ["tiny", "small"] if args.preset is None else args.preset
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
        print(f"KV bytes/token (all layers, {args.dtype}): {kv} ; transformers DynamicCache: {hf_kv:.0f}")
        v3 = r["v3_values_per_token_per_layer"]
        print(f"V3 head dims: latent {v3['latent']} vs naive {v3['naive']} values/token/layer "
              f"= {v3['naive'] / v3['latent']:.1f}x smaller")
    if args.spec_checkpoint:
        sp = results["speculative"] = bench_speculative(args)
        print(f"\n## MTP speculative decoding ({sp['checkpoint']}, {sp['prompts']} prompts, batch 1, greedy)")
        print(f"plain {sp['plain_tok_s']:.1f} tok/s, speculative {sp['speculative_tok_s']:.1f} tok/s "
              f"({sp['speedup']:.2f}x); acceptance {sp['speculative_acceptance_rate']:.1%}; main-model forwards "
              f"per token {sp['plain_forwards_per_token']:.2f} -> {sp['speculative_forwards_per_token']:.2f}; "
              f"same tokens: {sp['same_tokens']}")
        if args.compile:
            print(f"compiled: plain {sp['plain+compile_tok_s']:.1f} tok/s, speculative "
                  f"{sp['speculative+compile_tok_s']:.1f} tok/s ({sp['speedup_compiled']:.2f}x); acceptance "
                  f"{sp['speculative+compile_acceptance_rate']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
