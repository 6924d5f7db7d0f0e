"""Hostile input against the server and the engine: every test here performs its attack (bounded, loopback only)
and checks that it costs the attacker alone: sampling values that break a step, huge bodies and prompts, floods of
stop strings, text that is not Unicode, a shutdown in the middle of requests, an empty API key."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from infer_helpers import running_server, tiny_model_and_tokenizer, wait_until

import nanoseek.infer.server
from nanoseek.cli import main
from nanoseek.infer import commands
from nanoseek.infer.api import MAX_STOP_CHARS, MAX_STOP_STRINGS
from nanoseek.infer.engine import Engine, Request, SamplingParams, stop_holdback
from nanoseek.infer.runner import EngineRunner
from nanoseek.infer.server import build_app

KEY = "hostile-test-key"
MODEL = "nanoseek-tiny"
MAX_LEN = 512
MAX_BODY = 2**20  # the fixture server's body limit (the default is 4 MiB)
SLOW = "[slow]"  # a prompt starting with this takes TOKENISE_S to tokenise


class SlowTokenizer:
    """The test tokenizer, except that encoding a text that starts with SLOW takes TOKENISE_S seconds (a stand-in
    for a big prompt); `encoded` counts the characters it was asked to encode."""

    TOKENISE_S = 2.5

    def __init__(self, tok) -> None:
        self.tok = tok
        self.started = threading.Event()
        self.encoded = 0

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        self.encoded += len(text)
        if text.startswith(SLOW):
            self.started.set()
            time.sleep(self.TOKENISE_S)
        return self.tok.encode(text, allow_special=allow_special)

    def __getattr__(self, name: str):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def srv():
    model, tok = tiny_model_and_tokenizer()
    engine = Engine(model, tok, max_batch=4, max_len=MAX_LEN)
    slow = SlowTokenizer(tok)
    app = build_app(engine, slow, MODEL, api_key=KEY, max_body_bytes=MAX_BODY)
    with running_server(app) as (_, port):
        yield SimpleNamespace(tok=tok, slow=slow, model=model, engine=engine, app=app, port=port)


def request(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
            timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def error_of(raw: bytes) -> dict:
    """The `error` object of an OpenAI-shaped error body."""
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def assert_serving(srv) -> None:
    status, raw = request(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "x = ", "max_tokens": 2})
    assert status == 200, raw
    assert wait_until(lambda: not srv.engine.has_work())


# ---- 5: sampling values that break a step -----------------------------------------------------------------------
BAD_SAMPLING = [
    (b'"temperature": 1e-300', "temperature"),
    (b'"temperature": NaN', "temperature"),
    (b'"temperature": Infinity', "temperature"),
    (b'"seed": 9223372036854775808', "seed"),  # 2**63
    (b'"seed": -9223372036854775809', "seed"),
    (b'"seed": 100000000000000000000000000000', "seed"),
]


@pytest.mark.parametrize("field, param", BAD_SAMPLING, ids=[f.decode() for f, _ in BAD_SAMPLING])
def test_unusable_sampling_values_get_400_naming_them(srv, field, param):
    body = b'{"model": "%s", "prompt": "x = ", "max_tokens": 2, %s}' % (MODEL.encode(), field)
    status, raw = request(srv.port, "POST", "/v1/completions", body)
    assert status == 400, raw
    err = error_of(raw)
    assert err["param"] == param and err["code"] == "invalid_value", err


def test_tiny_top_p_keeps_the_most_likely_token(srv):
    """top_p 1e-300 is valid (0 < p <= 1) but rounds to 0 in float32: it must mean 'only the top token'."""
    status, raw = request(srv.port, "POST", "/v1/completions",
                          {"model": MODEL, "prompt": "x = ", "max_tokens": 4, "temperature": 1, "top_p": 1e-300,
                           "ignore_eos": True})
    assert status == 200, raw
    greedy = Engine(srv.model, srv.tok, max_batch=1, max_len=MAX_LEN).generate(
        [[srv.tok.bos_id, *srv.tok.encode("x = ")]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert json.loads(raw)["choices"][0]["text"] == greedy.text


def test_a_request_whose_sampling_raises_fails_alone(srv):
    """Requests that got past validation (mutated afterwards) and raise in the engine: one at admission (a seed
    torch refuses), one in its first sampling, one in its fourth. Each fails alone; the good requests batched with
    them finish with exactly the output they have alone (greedy and seeded sampling)."""
    tok, model = srv.tok, srv.model
    prompts = [[tok.bos_id] + tok.encode(f"def {w}(x):\n    return", allow_special=False)
               for w in ("queue", "heap", "bisect", "shlex", "random", "string")]
    good = [SamplingParams(max_new_tokens=10, ignore_eos=True),
            SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
            SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, seed=12, ignore_eos=True)]
    alone = [Engine(model, tok, max_batch=1, max_len=MAX_LEN).generate([p], sp)[0]
             for p, sp in zip(prompts[:3], good, strict=True)]

    bad_seed = SamplingParams(max_new_tokens=10, temperature=0.8, seed=1)
    bad_seed.seed = 2**70  # past validation: torch's manual_seed raises
    bad_first = SamplingParams(max_new_tokens=10, temperature=0.8, seed=2)
    bad_first.top_k = "many"  # type: ignore[assignment]  # sample_tokens raises comparing it
    bad_later = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, ignore_eos=True)

    def break_after_three(req: Request) -> None:
        if len(req.output_ids) == 3:
            req.params.top_k = "many"  # type: ignore[assignment]  # a decode step's sampling raises

    engine = Engine(model, tok, max_batch=6, max_len=MAX_LEN)
    gate = threading.Event()
    real_step = engine.step

    def gated_step() -> None:  # hold the first step until every request is queued: they share one batch
        gate.wait(10)
        real_step()

    engine.step = gated_step  # type: ignore[method-assign]
    with EngineRunner(engine) as runner:
        reqs = [runner.submit(p, sp) for p, sp in zip(prompts[:3], good, strict=True)]
        bad = [runner.submit(prompts[3], bad_seed), runner.submit(prompts[4], bad_first),
               runner.submit(prompts[5], bad_later, on_update=break_after_three)]
        gate.set()
        for r in reqs + bad:
            runner.result(r, timeout=60)
        assert not runner.live() and not engine.has_work()
    assert [r.finish_reason for r in bad] == ["error"] * 3
    assert len(bad[2].output_ids) == 3
    for r, a in zip(reqs, alone, strict=True):
        assert (r.output_ids, r.text, r.finish_reason) == (a.output_ids, a.text, a.finish_reason)


# ---- 6: huge bodies and prompts ------------------------------------------------------------------------------
def _raw_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_oversized_body_gets_413_at_once(srv):
    """A 20 MB body: answered 413 from its Content-Length, after 64 KB of it; a chunked body with no length: 413
    as soon as it passes the limit. Nothing of either is parsed or tokenised."""
    encoded = srv.slow.encoded
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode())
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head + f"Content-Length: {20 * 2**20}\r\n\r\n".encode() + b'{"prompt": "' + b"x" * 65536)
        status, body = _raw_response(s)
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    assert time.monotonic() - t0 < 3
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        try:
            for _ in range(MAX_BODY // len(piece) + 2):
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        except OSError:  # the server answered and closed while we were still sending
            pass
        status, body = _raw_response(s)
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    assert srv.slow.encoded == encoded
    assert_serving(srv)


def test_prompt_over_the_char_limit_is_refused_before_tokenising(srv):
    limit = 64 * MAX_LEN  # the default: PROMPT_CHARS_PER_TOKEN per context token
    encoded = srv.slow.encoded
    for path, body, param in [("/v1/completions", {"model": MODEL, "prompt": "x" * (limit + 1)}, "prompt"),
                              ("/v1/chat/completions", chat("y" * (limit // 2 + 1), messages=[
                                  {"role": "system", "content": "y" * (limit // 2)},
                                  {"role": "user", "content": "y" * (limit // 2 + 1)}]), "messages")]:
        status, raw = request(srv.port, "POST", path, body)
        assert status == 400, raw
        err = error_of(raw)
        assert err["param"] == param and err["code"] == "context_length_exceeded" and str(limit) in err["message"]
    assert srv.slow.encoded == encoded  # refused on the length alone


def test_health_answers_while_a_prompt_is_tokenised(srv):
    """Tokenising runs off the event loop: while one request's prompt takes 2.5 s to tokenise, /health answers at
    once, and a short request is served before it."""
    srv.slow.started.clear()
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(request(srv.port, "POST", "/v1/completions", {
        "model": MODEL, "prompt": SLOW + " big prompt", "max_tokens": 2})[0]))
    t.start()
    assert srv.slow.started.wait(10)
    t0 = time.monotonic()
    status, raw = request(srv.port, "GET", "/health", timeout=10)
    assert status == 200 and json.loads(raw)["status"] == "ok"
    assert time.monotonic() - t0 < 1.0, "the event loop waited for the tokeniser"
    status, _ = request(srv.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200 and not done  # served while the slow request is still being tokenised
    t.join(30)
    assert done == [200]


# ---- 7: floods of stop strings --------------------------------------------------------------------------------
def test_too_many_or_too_long_stop_strings_get_400(srv):
    for stop in (["a"] * 100_000, ["s"] * (MAX_STOP_STRINGS + 1), ["z" * (MAX_STOP_CHARS + 1)]):
        t0 = time.monotonic()
        status, raw = request(srv.port, "POST", "/v1/chat/completions", chat("hi", stop=stop))
        assert status == 400, raw
        assert error_of(raw)["param"] == "stop"
        assert time.monotonic() - t0 < 5
    # the limits themselves are fine
    stops = [f"{i}" + "q" * (MAX_STOP_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
    status, raw = request(srv.port, "POST", "/v1/chat/completions", chat("hi", stop=stops, stream=True))
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")


def _holdback_reference(text: str, stops: list[str]) -> int:
    """The longest suffix of text that is a proper prefix of a stop, by brute force."""
    return max([k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])],
               default=0)


def test_stop_holdback_is_exact_and_does_not_grow_with_the_text():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 4))]
        assert stop_holdback(text, stops) == _holdback_reference(text, stops), (text, stops)
    # the most stop strings a request may have, each as long as allowed, none of which can match: every update of
    # a long output holds back nothing, at a cost that does not depend on the output's length
    req = Request([1], SamplingParams())
    req.text = "ab" * 50_000
    stops = [chr(0x4E00 + i) + "z" * (MAX_STOP_CHARS - 1) for i in range(MAX_STOP_STRINGS)]
    t0 = time.perf_counter()
    for _ in range(2000):
        assert req.stable_text(stops) == req.text
    assert time.perf_counter() - t0 < 1.0
    stops[3] = "b" + "z" * (MAX_STOP_CHARS - 1)  # the last character could start a stop: held back
    assert req.stable_text(stops) == req.text[:-1]


# ---- 8: text that is not Unicode, shutdown, the API key -------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat("caf\ud800e"), "messages"),
    ("/v1/chat/completions", chat("ok", messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
     "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x\ud800"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["\ud83d"]}, "prompt"),
])
def test_lone_surrogates_get_400(srv, path, body, param):
    status, raw = request(srv.port, "POST", path, json.dumps(body).encode())  # json spells them "\ud800"
    assert status == 400, raw
    err = error_of(raw)
    assert err["param"] == param and err["code"] == "invalid_value" and "surrogate" in err["message"]
    status, raw = request(srv.port, "POST", path, {**body, "model": "\ud800"})  # quoted back in the error
    assert status == 404 and error_of(raw)["param"] == "model"


def test_shutdown_past_the_grace_period_answers_in_openai_shape(srv):
    """Requests still running when the grace period is over: the non-streaming one gets a JSON error, the stream
    an error event, then [DONE]."""
    engine = Engine(srv.model, srv.tok, max_batch=2, max_len=MAX_LEN)
    app = build_app(engine, srv.tok, MODEL)
    long = {"model": MODEL, "prompt": "import os", "max_tokens": 480, "ignore_eos": True}
    results: dict[str, tuple[int, bytes]] = {}

    def call(name: str, body: dict) -> None:
        results[name] = request(port, "POST", "/v1/completions", body, key=None)

    with running_server(app, timeout_graceful_shutdown=0.3) as (server, port):
        threads = [threading.Thread(target=call, args=("plain", long)),
                   threading.Thread(target=call, args=("stream", {**long, "stream": True}))]
        for t in threads:
            t.start()
        assert wait_until(lambda: sum(s is not None for s in engine.slots) == 2 and engine.stats.decode_forwards)
        server.should_exit = True
    for t in threads:
        t.join(30)
    status, raw = results["plain"]
    assert status == 503 and error_of(raw)["code"] == "cancelled"
    status, raw = results["stream"]
    events = [line[6:] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]" and error_of(events[-2])["code"] == "cancelled"
    assert engine.stats.generated_tokens < 2 * long["max_tokens"] and not engine.has_work()


def test_empty_api_key_is_refused_by_build_app(srv):
    for key in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            build_app(srv.engine, srv.tok, MODEL, api_key=key)


@pytest.fixture
def served(monkeypatch):
    """`nanoseek serve` up to the call of `server.serve`, which records its api_key instead of serving."""
    keys: list[str | None] = []
    monkeypatch.delenv(commands.API_KEY_ENV, raising=False)
    monkeypatch.setattr(commands, "load_for_inference",
                        lambda args: (None, None, argparse.Namespace(name="ckpt")))
    monkeypatch.setattr(commands, "build_engine", lambda model, tok, args: None)
    monkeypatch.setattr(nanoseek.infer.server, "serve", lambda *a, api_key=None, **kw: keys.append(api_key))
    return keys


def test_api_key_from_a_file_or_the_environment_and_never_empty(served, monkeypatch, tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert main(["serve", "ckpt", "--api-key-file", str(key_file)]) == 0
    monkeypatch.setenv(commands.API_KEY_ENV, "from-env")
    assert main(["serve", "ckpt"]) == 0
    assert main(["serve", "ckpt", "--api-key", "on-the-line"]) == 0
    assert "visible" in capsys.readouterr().err  # a warning about ps
    monkeypatch.delenv(commands.API_KEY_ENV)
    assert main(["serve", "ckpt"]) == 0
    assert served == ["s3cret", "from-env", "on-the-line", None]

    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv(commands.API_KEY_ENV, "")
    for argv in (["--api-key", ""], ["--api-key", "  "], ["--api-key-file", str(tmp_path / "empty")], [],
                 ["--api-key-file", str(tmp_path / "missing")], ["--api-key", "a", "--api-key-file", str(key_file)]):
        with pytest.raises(SystemExit, match="empty|cannot read|not both"):
            main(["serve", "ckpt", *argv])
    assert len(served) == 4


def test_max_tokens_beyond_the_context_is_400_not_a_silent_clamp(srv):
    """OpenAI and vLLM refuse a prompt + max_tokens that cannot fit; the error names max_tokens and the room left."""
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": MAX_LEN}
    status, raw = request(srv.port, "POST", "/v1/completions", body)
    err = error_of(raw)
    assert status == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_LEN}" in err["message"] and "at most" in err["message"]
    status, raw = request(srv.port, "POST", "/v1/chat/completions", chat("hi", max_completion_tokens=MAX_LEN))
    assert status == 400 and error_of(raw)["param"] == "max_completion_tokens"
    assert_serving(srv)
