"""The server under load: 64 clients at once -- mixed prompt and output lengths, streaming and not, a quarter of them
leaving mid-stream, an eighth sending bad requests -- for two rounds: no crash, every good request answered in full,
every departed client's request cancelled, no cache slot left behind, and memory flat from one round to the next."""

from __future__ import annotations

import http.client
import json
import random
import re
import resource
import time

from infer_helpers import run_threads, running_server, tiny_model_and_tokenizer, wait_until

from nanoseek.infer.engine import Engine
from nanoseek.infer.server import build_app

KEY, MODEL, CLIENTS = "k", "m", 64
WORDS = "def class return import heap queue random string yield lambda".split()


def _request(port: int, body: bytes | dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/completions", data, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    return conn.getresponse()


def _client(port: int, i: int, rnd: random.Random, outcome: dict[int, str]) -> None:
    prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 60)))
    n = rnd.randint(1, 24)
    kind = ("bad" if i % 8 == 1 else "leave" if i % 4 == 0 else "stream" if i % 2 else "plain")
    if kind == "bad":  # malformed JSON, or a value no request may use
        r = _request(port, b"{not json" if i % 16 == 1 else {"model": MODEL, "prompt": prompt, "temperature": -1})
        assert r.status == 400, r.status
        assert "error" in json.loads(r.read())
    elif kind == "leave":  # reads one event of a long stream, then hangs up
        r = _request(port, {"model": MODEL, "prompt": prompt, "max_tokens": 200, "ignore_eos": True,
                            "stream": True})
        assert r.status == 200, r.read()
        r.readline()
        r.close()
    else:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "ignore_eos": True, "stream": kind == "stream",
                "temperature": rnd.choice([0.0, 0.8]), "seed": i}
        r = _request(port, body)
        assert r.status == 200, r.read()
        if kind == "stream":
            events = [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        else:
            out = json.loads(r.read())
            assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == n
    outcome[i] = kind


def _cancelled(port: int) -> float:
    """Requests the server ended as cancelled so far (its /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    m = re.search(r'^nanoseek_request_finished_total\{finish_reason="cancelled"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_64_clients_two_rounds():
    model, tok = tiny_model_and_tokenizer()
    engine = Engine(model, tok, max_batch=8, max_len=512)
    app = build_app(engine, tok, MODEL, api_key=KEY)
    rss = []
    with running_server(app) as (_, port):
        for rnd_seed in (1, 2):
            outcome: dict[int, str] = {}
            rnd = [random.Random(rnd_seed * 1000 + i) for i in range(CLIENTS)]
            start = time.monotonic()
            errors = run_threads(lambda i, rnd=rnd, outcome=outcome: _client(port, i, rnd[i], outcome), CLIENTS,
                                 timeout=240)
            assert not errors, errors[:3]
            assert len(outcome) == CLIENTS, "a client did not finish"
            # the departed clients' requests end (cancelled), and every slot and queue entry is released
            assert wait_until(lambda: not engine.has_work(), timeout=60)
            assert all(s is None for s in engine.slots) and not engine.waiting
            assert app.state.runner.load() == (0, 0) and app.state.runner.running
            want = sum(k == "leave" for k in outcome.values()) * rnd_seed  # both rounds have as many
            assert wait_until(lambda want=want: _cancelled(port) == want, timeout=30), (_cancelled(port), want)
            rss.append(_rss_mib())
            print(f"round {rnd_seed}: {CLIENTS} clients in {time.monotonic() - start:.1f} s, RSS {rss[-1]:.0f} MiB, "
                  f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    assert rss[1] - rss[0] < 40, rss  # memory flat: the second round holds nothing more than the first
