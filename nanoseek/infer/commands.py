"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`: load a checkpoint + tokenizer, build an Engine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ..data import Tokenizer
from ..io.paths import load_tokenizer, resolve_checkpoint
from ..model import Transformer
from .chat import encode_prompt
from .engine import Engine, Request, SamplingParams
from .runner import EngineRunner


def load_for_inference(args: argparse.Namespace) -> tuple[Transformer, Tokenizer, Path]:
    """The model, tokenizer and checkpoint path of `args.checkpoint` (a checkpoint, a run whose newest valid
    checkpoint is taken, or a GGUF file with its embedded tokenizer). The checkpoint is checked against its manifest
    unless `args.verify` is False; a broken checkpoint, or weights holding NaN / infinity, end the program with one
    line naming the file or tensor. `--fp8-weights` / `--int8-weights` pick the weight format."""
    from .. import load
    from ..io import CheckpointError

    fp8, int8 = getattr(args, "fp8_weights", False), getattr(args, "int8_weights", False)
    if fp8 and int8:
        raise SystemExit("nanoseek: --fp8-weights and --int8-weights are two weight formats: choose one")
    verify = getattr(args, "verify", True)
    if Path(args.checkpoint).suffix == ".gguf" and Path(args.checkpoint).is_file():
        from ..io.gguf import read_gguf_tokenizer

        ckpt = Path(args.checkpoint)
        try:
            tok = load_tokenizer(ckpt.parent, args.tokenizer) if args.tokenizer else read_gguf_tokenizer(ckpt)
        except CheckpointError as e:
            raise SystemExit(f"nanoseek: {e}") from None
    else:
        ckpt = resolve_checkpoint(args.checkpoint, verify=verify)  # verified here: not again by load
        tok = load_tokenizer(ckpt, args.tokenizer)
    kwargs = {"keep_fp8": fp8, "int8": int8}
    try:
        model = load(ckpt, dtype=torch.float32, device=args.device, verify=False, **kwargs)
    except CheckpointError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"nanoseek: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    return model, tok, ckpt


def build_engine(model: Transformer, tok: Tokenizer, args: argparse.Namespace) -> Engine:
    return Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len, cache=args.cache,
                  prefill_chunk=args.prefill_chunk, speculative=args.speculative, compile=args.compile,
                  prefix_cache=getattr(args, "prefix_cache", False))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop or ())
    except ValueError as e:
        raise SystemExit(f"nanoseek: {e}") from None


def stream_text(runner: EngineRunner, prompt_ids: list[int], params: SamplingParams, out=None) -> Request:
    """Run one request on the engine thread, writing its text to `out` (stdout) as it becomes stable (stop strings
    never leak). ValueError for a prompt the engine refuses, RuntimeError if an engine step failed (the runner
    logged it). If this is interrupted (Ctrl-C), the request is cancelled and its slot freed before the exception
    goes on."""
    out = out or sys.stdout
    req = runner.submit(prompt_ids, params)
    try:
        for piece in runner.stream(req):
            out.write(piece)
            out.flush()
    except BaseException:
        runner.cancel(req)
        try:
            runner.result(req, timeout=30)  # the engine thread releases it at its next step
        except (TimeoutError, RuntimeError):
            pass
        raise
    if req.finish_reason == "error":
        raise RuntimeError("generation failed (the engine step raised; see the log above)")
    return req


def chat_messages(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation: the system prompt (if any) and the turns so far."""
    return ([{"role": "system", "content": system}] if system else []) + history


def summary(req: Request, engine: Engine, t0: float) -> str:
    dt = time.time() - t0
    n = len(req.output_ids)
    ttft = (req.first_token_time or time.time()) - req.created
    decode = dt - ttft
    line = (f"[{len(req.prompt_ids)} prompt + {n} generated tokens, {req.finish_reason}; time to first token "
            f"{ttft * 1e3:.0f} ms, decode {max(n - 1, 0) / decode if decode > 0 else 0:.1f} tok/s")
    if engine.speculative:
        line += f"; MTP drafts accepted {req.accepted}/{req.drafted}"
    return line + "]"


def cmd_generate(args: argparse.Namespace) -> int:
    model, tok, _ = load_for_inference(args)
    engine = build_engine(model, tok, args)
    if args.chat:  # only the template's markers become special tokens, whatever the prompt spells
        ids = encode_prompt(chat_messages(args.system, [{"role": "user", "content": args.prompt}]), tok,
                            think=args.think)
    else:  # a raw prompt: special-token strings in it are plain text too
        ids = tok.encode(args.prompt, allow_special=False)
        if not args.no_bos:
            ids = [tok.bos_id] + ids
    t0 = time.time()
    with EngineRunner(engine) as runner:
        try:
            req = stream_text(runner, ids, sampling_params(args))
        except (ValueError, RuntimeError) as e:
            raise SystemExit(f"nanoseek: {e}") from None
    print(flush=True)
    print(summary(req, engine, t0), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tok, ckpt = load_for_inference(args)
    engine = build_engine(model, tok, args)
    params = sampling_params(args)
    history: list[dict[str, str]] = []
    print(f"nanoseek chat: {ckpt} ({engine.max_len}-token context). /reset clears the history, /exit quits.")
    with EngineRunner(engine) as runner:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                history.clear()
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            # the line and the earlier answers are plain text: typing <｜Assistant｜> cannot forge a turn
            ids = encode_prompt(chat_messages(args.system, history), tok, think=args.think)
            if len(ids) + 1 >= engine.max_len:
                print("[the conversation no longer fits the context: /reset]")
                history.pop()
                continue
            t0 = time.time()
            try:
                req = stream_text(runner, ids, params)  # Ctrl-C: cancelled, its slot freed
            except KeyboardInterrupt:
                print("\n[interrupted]")
                history.pop()
                continue
            except RuntimeError as e:
                print(f"\n[{e}]")
                history.pop()
                continue
            print(flush=True)
            if args.verbose:
                print(summary(req, engine, t0), file=sys.stderr)
            history.append({"role": "assistant", "content": req.text})


API_KEY_ENV = "NANOSEEK_API_KEY"


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key `nanoseek serve` requires: --api-key, else the first line of --api-key-file, else $NANOSEEK_API_KEY,
    else None (no authentication). A key that is given but empty or blank is an error, never "no key": an unset
    variable or an empty file must not open the server to anyone."""
    if args.api_key is not None and args.api_key_file is not None:
        raise SystemExit("nanoseek: give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
        print("nanoseek: note: a key on the command line is visible to other users (ps); prefer --api-key-file "
              f"or ${API_KEY_ENV}", file=sys.stderr)
    elif args.api_key_file is not None:
        where = f"--api-key-file {args.api_key_file}"
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"nanoseek: cannot read the API key file: {e}") from None
        key = lines[0] if lines else ""
    elif API_KEY_ENV in os.environ:
        key, where = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    key = key.strip()
    if not key:
        raise SystemExit(f"nanoseek: the API key from {where} is empty; refusing to serve without one "
                         f"(unset {API_KEY_ENV} and give no key to serve without authentication)")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    from .eplb import EPLBConfig
    from .server import serve

    api_key = resolve_api_key(args)  # before the (slow) load: a bad key fails at once
    eplb = EPLBConfig.parse(args.eplb) if args.eplb else None
    model, tok, ckpt = load_for_inference(args)
    engine = build_engine(model, tok, args)
    name = args.model_name or ckpt.name
    serve(engine, tok, name, host=args.host, port=args.port, api_key=api_key,
          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
          max_prompt_chars=args.max_prompt_chars, eplb=eplb)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", metavar="CKPT",
                       help="checkpoint dir (HF layout), a training output dir, or a llama.cpp GGUF file")
        p.add_argument("--tokenizer", help="tokenizer.json (default: the one in CKPT)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--cache", choices=["latent", "naive"], default="latent",
                       help="latent: weight-absorbed MLA caching c_kv + k_pe; naive: per-head K/V")
        p.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
        p.add_argument("--max-batch", type=int, default=8, help="concurrent sequences (cache slots)")
        p.add_argument("--prefill-chunk", type=int, default=512)
        p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (greedy requests)")
        p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first steps)")
        p.add_argument("--fp8-weights", action="store_true",
                       help="keep an FP8 checkpoint's weights in FP8, dequantised per block on the fly")
        p.add_argument("--int8-weights", action="store_true",
                       help="hold every matrix as int8 codes with per-row scales, read by an int8 GEMV "
                            "(nanoseek.fp8.int8; ~1 byte per weight per decode step, as a Q8_0 GGUF)")

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--system", help="system prompt")
        p.add_argument("--think", action="store_true", help="open a <think> section (R1 style)")

    p = sub.add_parser("generate", help="complete a prompt with a checkpoint (streams to stdout)")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the begin-of-sentence token")
    sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal (streaming)")
    common(p)
    sampling(p)
    p.add_argument("--verbose", action="store_true", help="print timing after each answer")
    p.set_defaults(func=cmd_chat, max_batch=1)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (visible in "
                   f"ps: prefer --api-key-file or ${API_KEY_ENV}, the default)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the key from the first line of FILE")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--max-prompt-chars", type=int,
                   help="longer prompts get 400 before tokenising (default 64 per token of the context)")
    p.add_argument("--model-name", help="the model id clients use (default: the checkpoint dir name)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="reuse the keys of a shared prompt prefix (system prompt, few-shot examples) held by a slot")
    p.add_argument("--eplb", metavar="SPEC", help="redundant experts re-planned from the served load, e.g. "
                   "gpus=8,redundant=8,interval=30 (nanoseek.infer.eplb.EPLBConfig); GET /eplb shows the plan")
    p.set_defaults(func=cmd_serve)
