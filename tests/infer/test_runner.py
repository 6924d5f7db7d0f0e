"""The engine thread alone (no HTTP): requests from several threads, results and streams, cancellation, a failing
step, shutdown."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from infer_helpers import run_threads, small_tokenizer, wait_until

import nanoseek.infer.api
import nanoseek.infer.runner
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.runner import EngineRunner, RunnerClosed
from nanoseek.model import Transformer

MAX_LEN = 256


@pytest.fixture(scope="module")
def model_tok():
    tok = small_tokenizer()
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tok.vocab_size)).eval(), tok


def prompts(tok, n: int) -> list[list[int]]:
    words = ["queue", "heap", "bisect", "shlex", "random", "string"]
    return [[tok.bos_id] + tok.encode(f"def {words[i % len(words)]}_{i}(x):\n    return", allow_special=False)
            for i in range(n)]


def reference(model, tok, ps: list[list[int]], params: SamplingParams) -> list[tuple[str, list[int], str]]:
    """(text, output ids, finish_reason) of each prompt run alone (one at a time through a 1-slot engine)."""
    reqs = Engine(model, tok, max_batch=1, max_len=MAX_LEN).generate(ps, params)
    return [(r.text, r.output_ids, r.finish_reason) for r in reqs]


def test_no_http_in_runner_and_api():
    for mod in (nanoseek.infer.runner, nanoseek.infer.api):
        tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m.split(".")[0] for m in names} & {"fastapi", "uvicorn", "starlette", "http"}, mod.__name__


def test_threads_submit_wait_and_stream(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=3, max_len=MAX_LEN)  # 6 requests, 3 slots: some queue
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ps = prompts(tok, 6)
    results: dict[int, tuple[str, list[int], str]] = {}
    streamed: dict[int, str] = {}
    barrier = threading.Barrier(len(ps))

    with EngineRunner(engine) as runner:
        def client(i: int) -> None:
            barrier.wait()
            req = runner.submit(ps[i], params)
            if i % 2:  # half stream, half wait for the result
                streamed[i] = "".join(runner.stream(req, timeout=60))
            else:
                runner.result(req, timeout=60)
            results[i] = req.text, req.output_ids, req.finish_reason

        errors = run_threads(client, len(ps), timeout=120)
        assert not errors, errors
        assert wait_until(lambda: not engine.has_work()) and not runner.live()
    assert not runner.running
    for i, ref in enumerate(reference(model, tok, ps, params)):
        assert results[i] == ref, i
        if i in streamed:
            assert streamed[i] == results[i][0]
    assert len({r[0] for r in results.values()}) > 1


def test_cancel_by_call_and_by_leaving_the_stream(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2, max_len=MAX_LEN)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    short = SamplingParams(max_new_tokens=6, ignore_eos=True)
    a, b, c = prompts(tok, 3)
    with EngineRunner(engine) as runner:
        doomed = runner.submit(a, long)
        kept = runner.submit(b, short)
        assert wait_until(lambda: len(doomed.output_ids) > 0, timeout=60)
        canceller = threading.Thread(target=runner.cancel, args=(doomed,))  # cancel from another thread
        canceller.start()
        canceller.join()
        assert runner.result(doomed, timeout=60).finish_reason == "cancelled"
        assert len(doomed.output_ids) < long.max_new_tokens
        assert runner.result(kept, timeout=60).finish_reason == "length"
        assert kept.text == reference(model, tok, [b], short)[0][0]  # its neighbour's cancellation did not disturb it

        left = runner.submit(c, long)
        for _ in runner.stream(left, timeout=60):
            break  # the consumer leaves after the first piece: the request is cancelled
        assert runner.result(left, timeout=60).finish_reason == "cancelled"
        assert len(left.output_ids) < long.max_new_tokens
        assert wait_until(lambda: not engine.has_work()) and not runner.live()
        with pytest.raises(TimeoutError):  # a wait that runs out
            runner.result(runner.submit(a, long), timeout=0.01)


def test_failing_step_fails_live_requests_and_keeps_running(model_tok, monkeypatch):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2, max_len=MAX_LEN)
    real_step = engine.step
    failed: list[bool] = []

    def step_that_fails_once() -> None:
        real_step()
        if not failed:
            failed.append(True)
            raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "step", step_that_fails_once)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    a, b = prompts(tok, 2)
    with EngineRunner(engine) as runner:
        req = runner.submit(a, params)
        assert runner.result(req, timeout=60).finish_reason == "error"
        assert not runner.live() and not engine.has_work()
        assert runner.generate(b, params, timeout=60).finish_reason == "length"  # still serving


def test_shutdown_cancels_in_flight_and_refuses_new_requests(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1, max_len=MAX_LEN)
    runner = EngineRunner(engine)
    a, b = prompts(tok, 2)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    with pytest.raises(RunnerClosed):  # not started
        runner.submit(a, params)
    runner.start()
    running, queued = runner.submit(a, params), runner.submit(b, params)
    assert wait_until(lambda: len(running.output_ids) > 0, timeout=60)
    assert sum(runner.load()) == 2  # one holds the slot, one waits for it
    pieces: list[str] = []
    reader = threading.Thread(target=lambda: pieces.extend(runner.stream(running, timeout=60)))
    reader.start()
    runner.stop()
    reader.join(60)
    assert not runner.running and not engine.has_work() and not runner.live()
    assert (running.finish_reason, queued.finish_reason) == ("cancelled", "cancelled")
    assert "".join(pieces) == running.text  # the stream ended with the request
    with pytest.raises(RunnerClosed):
        runner.submit(a, params)
    with pytest.raises(ValueError):  # a prompt the engine refuses, after a restart
        runner.start()
        try:
            runner.submit([], params)
        finally:
            runner.stop()
