"""The HTTP server under load: N concurrent clients vs the same N requests one at a time, and vs the engine alone.

    python benchmarks/bench_server.py [--model tiny | --model runs/ckpt] [--clients 8] [--new-tokens 64]
                                      [--prompt-tokens 64] [--rounds 3] [--compile] [--stream]
                                      [--threads N] [--json out.json]

The server (nanoseek.infer.server, uvicorn) runs in this process on a free loopback port; the clients are threads
posting /v1/completions requests (non-streaming, or SSE with --stream; greedy, EOS ignored, so every request
generates exactly --new-tokens tokens) over plain HTTP. The clients live in a second process (as real clients do),
so their JSON / SSE parsing does not share the server's interpreter lock. Default model: the `tiny` preset with
random weights and a BPE trained on a few standard-library files; a checkpoint directory brings its own
tokenizer.json (or pass --tokenizer).
The engine row runs the same N requests through a second `Engine` over the same weights (its own cache, same slots),
called directly with `engine.generate` (no HTTP, no engine thread): the throughput the server is measured against.
Rounds alternate engine / sequential / concurrent, so the three are taken side by side.
Reported per mode (median over rounds, after one warm-up round): total wall time, requests/s, generated tokens/s,
mean / max request latency and the CPU time of the server's process (or the engine's) and of the clients' process
(on a machine with few cores they share them); whether the concurrent answers equal the sequential ones and the
engine's; and the server's concurrent throughput as a fraction of the engine's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch
import uvicorn

import nanoseek
from nanoseek.data import Tokenizer, stdlib_sources, train_tokenizer
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.server import build_app

MODEL_NAME = "bench"
_TOKENIZER_FILES = {"abc.py", "bisect.py", "copy.py", "fnmatch.py", "heapq.py", "numbers.py", "queue.py",
                    "random.py", "shlex.py", "string.py", "textwrap.py"}


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer]:
    torch.manual_seed(0)
    model = nanoseek.load(args.model).eval()
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    elif os.path.isdir(args.model):
        tok = Tokenizer.load(args.model)
    else:  # random weights: any tokenizer that fits the vocabulary will do
        texts = [p.read_text(encoding="utf-8") for p in stdlib_sources() if p.name in _TOKENIZER_FILES]
        tok = train_tokenizer(texts, vocab_size=min(model.config.vocab_size, 4096), show_progress=False)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} tokens; the model only {model.config.vocab_size}")
    return model, tok


def prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of `length` tokens, cut from standard-library source."""
    ids = tok.encode("".join(p.read_text(encoding="utf-8") for p in sorted(stdlib_sources())[:40]),
                     allow_special=False)
    step = max(length, (len(ids) - length) // n)
    out = [ids[i * step : i * step + length] for i in range(n)]
    assert all(len(p) == length for p in out), "not enough text for the prompts"
    return out


def complete(port: int, prompt: list[int], new_tokens: int, stream: bool = False) -> tuple[float, str, int]:
    """(latency s, text, completion tokens) of one request; `stream`: read it as server-sent events (a chunk per
    token or so, as chat clients do) and count the tokens from the final usage chunk."""
    req = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        req |= {"stream": True, "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(req), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()!r}")
        if not stream:
            data = json.loads(resp.read())
            return time.perf_counter() - t, data["choices"][0]["text"], data["usage"]["completion_tokens"]
        text, n = [], 0
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            text += [c["text"] for c in chunk["choices"]]
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
        return time.perf_counter() - t, "".join(text), n
    finally:
        conn.close()


def run_sequential(port: int, ps: list[list[int]], new_tokens: int, stream: bool) -> tuple[float, list]:
    t = time.perf_counter()
    results = [complete(port, p, new_tokens, stream) for p in ps]
    return time.perf_counter() - t, results


def run_concurrent(port: int, ps: list[list[int]], new_tokens: int, stream: bool) -> tuple[float, list]:
    results: list = [None] * len(ps)
    barrier = threading.Barrier(len(ps) + 1)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = complete(port, ps[i], new_tokens, stream)
        except Exception as e:  # reported after the join
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
    for th in threads:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    return wall, results


def _client_process(conn: Connection) -> None:
    """The clients' process: runs (mode, port, prompts, new_tokens, stream) jobs sent over `conn` until None."""
    while (job := conn.recv()) is not None:
        mode, port, ps, new_tokens, stream = job
        try:
            cpu = time.process_time()
            wall, res = (run_sequential if mode == "sequential" else run_concurrent)(port, ps, new_tokens, stream)
            conn.send((wall, res, time.process_time() - cpu))
        except Exception as e:
            conn.send(RuntimeError(f"{mode} clients failed: {e!r}"))


def run_engine(engine: Engine, ps: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """The same requests straight into an engine: one batch, continuous batching, no server."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    reqs = engine.generate(ps, params)
    wall = time.perf_counter() - t
    return wall, [(wall, r.text, len(r.output_ids)) for r in reqs]


def summarize(walls: list[float], runs: list[list]) -> dict:
    wall = statistics.median(walls)
    n_req = len(runs[0])
    tokens = sum(r[2] for r in runs[0])
    lat = [statistics.mean(r[0] for r in run) for run in runs]
    return {"wall_s": wall, "requests_per_s": n_req / wall, "generated_tok_per_s": tokens / wall,
            "mean_latency_s": statistics.median(lat), "max_latency_s": statistics.median(max(r[0] for r in run)
                                                                                      for run in runs),
            "requests": n_req, "generated_tokens": tokens}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset name, config.json or checkpoint directory")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, or one trained for a preset)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=None, help="engine slots (default: --clients)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", action="store_true", help="clients stream the answers (SSE)")
    ap.add_argument("--compile", action="store_true", help="both engines with compiled decode steps")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load(args)
    ps = prompts(tok, args.clients, args.prompt_tokens)
    slots, max_len = args.max_batch or args.clients, args.prompt_tokens + args.new_tokens + 8
    engine = Engine(model, tok, max_batch=slots, max_len=max_len, compile=args.compile)
    # the engine alone (its own cache)
    reference = Engine(model, tok, max_batch=slots, max_len=max_len, compile=args.compile)
    app = build_app(engine, tok, MODEL_NAME)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)

    ours, theirs = mp.get_context("spawn").Pipe()
    clients = mp.get_context("spawn").Process(target=_client_process, args=(theirs,), daemon=True)
    clients.start()

    def run_clients(mode: str) -> tuple[float, list, float]:
        ours.send((mode, port, ps, args.new_tokens, args.stream))
        got = ours.recv()
        if isinstance(got, Exception):
            raise got
        return got

    modes = ("engine", "sequential", "concurrent")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    runs: dict[str, list[list]] = {m: [] for m in modes}
    cpus: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}  # (this process, the clients' process)
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for mode in modes:
                cpu = time.process_time()  # every thread of this process: engine, event loop, OpenMP workers
                if mode == "engine":
                    (wall, res), clients_cpu = run_engine(reference, ps, args.new_tokens), 0.0
                else:
                    wall, res, clients_cpu = run_clients(mode)
                if r:
                    walls[mode].append(wall)
                    runs[mode].append(res)
                    cpus[mode].append((time.process_time() - cpu, clients_cpu))
    finally:
        ours.send(None)
        clients.join(30)
        server.should_exit = True
        thread.join(30)

    same = all([x[1] for x in a] == [x[1] for x in b] == [x[1] for x in c]
               for a, b, c in zip(runs["sequential"], runs["concurrent"], runs["engine"], strict=True))
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "params": sum(p.numel() for p in model.parameters()),
        **{m: summarize(walls[m], runs[m]) | {"cpu_s": statistics.median(c[0] for c in cpus[m]),
                                               "clients_cpu_s": statistics.median(c[1] for c in cpus[m])}
           for m in modes},
        "same_answers": same,
    }
    results["speedup"] = results["sequential"]["wall_s"] / results["concurrent"]["wall_s"]
    results["server_vs_engine"] = (results["concurrent"]["generated_tok_per_s"]
                                   / results["engine"]["generated_tok_per_s"])

    print(f"model {args.model} ({results['params'] / 1e6:.1f}M parameters), {args.clients} requests of "
          f"{args.prompt_tokens} prompt + {args.new_tokens} generated tokens, median of {args.rounds} rounds, "
          f"{results['machine']}")
    print("| mode | wall s | requests/s | generated tok/s | mean latency s | max latency s | CPU s: server (engine) "
          "| CPU s: clients |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"engine": f"engine alone, {args.clients} requests", "sequential": "server, one at a time",
              "concurrent": f"server, {args.clients} concurrent clients"}
    for mode in modes:
        m = results[mode]
        label = labels[mode]
        print(f"| {label} | {m['wall_s']:.2f} | {m['requests_per_s']:.2f} | {m['generated_tok_per_s']:.1f} | "
              f"{m['mean_latency_s']:.2f} | {m['max_latency_s']:.2f} | {m['cpu_s']:.2f} | {m['clients_cpu_s']:.2f} |")
    print(f"concurrent vs one at a time: {results['speedup']:.2f}x wall time; server (concurrent) / engine "
          f"throughput: {results['server_vs_engine']:.1%}; same answers: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
