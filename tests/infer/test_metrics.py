"""GET /metrics: the Prometheus text format (checked by a strict parser), counters that move by what the responses'
`usage` says, live gauges under load, a client that leaves counted as cancelled, and the expert load: every
layer's counts sum to top_K * the tokens the model read, padding rows excluded, the same as requests run alone."""

from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.request
from types import SimpleNamespace

import openai
import pytest
import torch
from infer_helpers import running_server, small_tokenizer, tiny_model_and_tokenizer, wait_until

from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.metrics import CONTENT_TYPE, THROUGHPUT_WINDOW_S, Counter, ExpertLoad, Histogram, ServerMetrics
from nanoseek.infer.runner import EngineRunner
from nanoseek.infer.server import build_app

KEY = "metrics-key"
MODEL = "nanoseek-tiny"
MAX_LEN = 512

# ---- a strict parser of the text format (version 0.0.4) -------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """(type of every family, value of every sample keyed by (name, labels)); raises on anything malformed: a
    sample outside a declared family, a family declared twice, a repeated sample, a bad value, histogram buckets
    that are not cumulative or do not end in +Inf = _count."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    family = None
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name), line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("counter", "gauge", "histogram"), line
            types[name], family = kind, name
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample: {line!r}"
        name, raw_labels, raw_value = m.groups()
        suffixes = ("_bucket", "_sum", "_count") if types[family] == "histogram" else ("",)
        assert any(name == family + s for s in suffixes), f"{name} outside its family {family}"
        labels: dict[str, str] = {}
        rest = raw_labels or ""
        while rest:
            lm = _LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            assert lm.group(1) not in labels
            labels[lm.group(1)] = _unescape(lm.group(2))
            rest = rest[lm.end():]
        value = float(raw_value)  # accepts +Inf / NaN as the format does
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"repeated sample {line!r}"
        samples[key] = value
    for name, kind in types.items():
        if kind == "histogram":
            buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == name + "_bucket"))
            counts = [v for _, v in buckets]
            assert buckets[-1][0] == math.inf and counts == sorted(counts), name
            assert counts[-1] == samples[(name + "_count", frozenset())], name
    return types, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_text_format_primitives():
    c = Counter("x_total", 'help with "quotes" \\ and\nnewline', ("path",))
    c.inc(2, 'a"b\\c\nd')
    c.inc(1.5, "plain")
    h = Histogram("lat_seconds", "latency", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    h.observe(0.2, times=3)
    types, samples = parse(c.render() + h.render())
    assert types == {"x_total": "counter", "lat_seconds": "histogram"}
    assert value(samples, "x_total", path='a"b\\c\nd') == 2 and value(samples, "x_total", path="plain") == 1.5
    # le is inclusive (0.1 falls in the 0.1 bucket); buckets are cumulative
    assert [value(samples, "lat_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 6, 7]
    assert value(samples, "lat_seconds_count") == 7
    assert value(samples, "lat_seconds_sum") == pytest.approx(0.05 + 0.1 + 0.5 + 3.0 + 0.6)
    with pytest.raises(AssertionError):  # the parser is strict: a sample outside its family
        parse("# TYPE a counter\nb 1\n")


# ---- expert load, no HTTP -------------------------------------------------------------------------------------
def test_expert_load_counts_real_tokens_only():
    """Three prompts of different lengths prefill together in chunks (padded rows) and decode together: each
    layer's counts sum to K * the tokens read, and equal the sum of the counts of each prompt run alone; the
    hooks change no output."""
    tok = small_tokenizer()
    torch.manual_seed(0)
    model, _ = tiny_model_and_tokenizer()
    K = model.config.num_experts_per_tok
    texts = ("def f(x):", "import heapq\nheapq.heappush(", "class Heap(list):\n    pass")
    prompts = [tok.encode(text) for text in texts]
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    plain = [r.output_ids for r in Engine(model, tok, max_batch=3, max_len=128, prefill_chunk=5).generate(
        prompts, params)]
    eng = Engine(model, tok, max_batch=3, max_len=128, prefill_chunk=5)
    load = ExpertLoad(model, eng.max_len)
    reqs = eng.generate(prompts, params)
    batched = load.snapshot()
    load.remove()
    assert [r.output_ids for r in reqs] == plain  # counting leaves the model's computation alone
    read = sum(len(p) + len(r.output_ids) - 1 for p, r in zip(prompts, reqs, strict=True))  # last token: not fed
    assert load.layers == [i for i in range(model.config.num_hidden_layers) if i >= model.config.first_k_dense_replace]
    assert batched.sum(1).tolist() == [K * read] * len(load.layers)
    alone = torch.zeros_like(batched)
    for p in prompts:
        one = ExpertLoad(model, 128)
        Engine(model, tok, max_batch=1, max_len=128, prefill_chunk=5).generate([p], params)
        alone += one.snapshot()
        one.remove()
    assert torch.equal(batched, alone)
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed


def test_tracking_with_speculative_decoding_no_http():
    """An engine with MTP drafts (V3 §2.2): steps that accept a draft give two tokens, each counted once and each an
    observation of the time per output token; the draft counters are the engine's. With the head zeroed, every
    logit ties, so the model and its draft both choose token 0: every draft is accepted."""
    model, tok = tiny_model_and_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = Engine(model, tok, max_batch=1, max_len=128, speculative=True)
    metrics = ServerMetrics(engine, expert_load=False)
    with EngineRunner(engine) as runner:
        req = runner.result(runner.submit(tok.encode("def f(x):"), SamplingParams(max_new_tokens=12, ignore_eos=True),
                                          metrics.track()), timeout=60)
        _, samples = parse(metrics.render(runner))
    assert req.finish_reason == "length" and engine.stats.accepted == engine.stats.drafted > 3
    assert value(samples, "nanoseek_spec_decode_draft_tokens_total") == engine.stats.drafted
    assert value(samples, "nanoseek_spec_decode_accepted_tokens_total") == engine.stats.accepted
    assert value(samples, "nanoseek_generation_tokens_total") == 12
    assert value(samples, "nanoseek_time_per_output_token_seconds_count") == 11
    assert value(samples, "nanoseek_time_to_first_token_seconds_count") == 1
    assert value(samples, "nanoseek_request_finished_total", finish_reason="length") == 1
    assert not any(name == "nanoseek_expert_load_total" for name, _ in samples)


# ---- the server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv():
    model, tok = tiny_model_and_tokenizer()
    engine = Engine(model, tok, max_batch=2, max_len=MAX_LEN)
    app = build_app(engine, tok, MODEL, api_key=KEY)
    with running_server(app) as (_, port):
        yield SimpleNamespace(model=model, engine=engine, app=app, port=port,
                              client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                                   max_retries=0, timeout=60))
    assert not model._forward_hooks and not model._forward_pre_hooks, "the expert-load hooks outlived the server"


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:  # no key needed
        assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
        return parse(resp.read().decode())[1]


def test_counters_follow_usage(srv):
    cfg = srv.model.config
    start = time.time()
    before = scrape(srv.port)
    msgs = [{"role": "user", "content": "Write a heap."}]
    extra = {"ignore_eos": True}
    full = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, extra_body=extra)
    streamed = list(srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, n=2, stream=True,
                                                       stream_options={"include_usage": True}, extra_body=extra))
    text = srv.client.completions.create(model=MODEL, prompt="def heap", max_tokens=4, extra_body=extra)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=1)
    after = scrape(srv.port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    usages = [(full.usage, 1), (streamed[-1].usage, 2), (text.usage, 1)]  # (usage, choices)
    assert delta("nanoseek_prompt_tokens_total") == sum(u.prompt_tokens for u, _ in usages)
    assert delta("nanoseek_generation_tokens_total") == sum(u.completion_tokens for u, _ in usages) == 5 + 14 + 4
    assert delta("nanoseek_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert delta("nanoseek_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("nanoseek_requests_total", endpoint="/v1/completions", status="401") == 1
    assert delta("nanoseek_request_finished_total", finish_reason="length") == 4  # one per choice
    assert delta("nanoseek_time_to_first_token_seconds_count") == 4
    assert 0 < delta("nanoseek_time_to_first_token_seconds_sum") < 4 * (time.time() - start)
    assert 0 < delta("nanoseek_e2e_request_latency_seconds_sum") < 4 * (time.time() - start)
    assert delta("nanoseek_e2e_request_latency_seconds_count") == 4
    assert delta("nanoseek_time_per_output_token_seconds_count") == (5 - 1) + 2 * (7 - 1) + (4 - 1)
    if time.time() - start < THROUGHPUT_WINDOW_S - 1:  # the server's first tokens, all within the window
        assert value(after, "nanoseek_generation_tokens_per_second") == pytest.approx(23 / THROUGHPUT_WINDOW_S)
    assert srv.app.state.metrics.tokens_per_second(now=time.time() + THROUGHPUT_WINDOW_S + 1) == 0  # forgotten
    assert value(after, "nanoseek_requests_running") == value(after, "nanoseek_requests_waiting") == 0
    assert value(after, "nanoseek_kv_cache_usage_ratio") == 0
    # every choice read its prompt and all its tokens but the last: K routed experts per token and MoE layer
    read = sum(n * u.prompt_tokens + u.completion_tokens - n for u, n in usages)
    moe_layers = range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    for layer in moe_layers:
        routed = [delta("nanoseek_expert_load_total", layer=str(layer), expert=str(e))
                  for e in range(cfg.n_routed_experts)]
        assert sum(routed) == cfg.num_experts_per_tok * read and min(routed) >= 0
    assert not any(k[0] == "nanoseek_expert_load_total" and dict(k[1])["layer"] == "0" for k in after)  # dense


def test_gauges_under_load_and_cancelled_clients(srv):
    """Three long streams on two slots: two run, one waits, every slot in use; the clients leave and their
    requests end as cancelled."""
    before = scrape(srv.port)
    body = json.dumps({"model": MODEL, "prompt": "def queue", "max_tokens": 450, "ignore_eos": True,
                       "stream": True}).encode()
    conns = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                        "Content-Type": "application/json"})
        conns.append(conn)
    try:
        for conn in conns:
            assert conn.getresponse().status == 200
        seen = {}

        def busy() -> bool:
            seen.update(scrape(srv.port))
            # (and the running ones have written their prompts: a slot is taken before its first prefill chunk)
            return ((value(seen, "nanoseek_requests_running"), value(seen, "nanoseek_requests_waiting")) == (2, 1)
                    and value(seen, "nanoseek_kv_cache_tokens_usage_ratio") > 0)

        assert wait_until(busy, timeout=20, every=0.01), seen
        assert value(seen, "nanoseek_kv_cache_usage_ratio") == 1.0
        assert 0 < value(seen, "nanoseek_kv_cache_tokens_usage_ratio") <= 1
    finally:
        for conn in conns:
            conn.close()
    assert wait_until(lambda: not srv.engine.has_work(), timeout=20)

    def cancelled() -> float:
        after = scrape(srv.port)
        return (value(after, "nanoseek_request_finished_total", finish_reason="cancelled")
                - value(before, "nanoseek_request_finished_total", finish_reason="cancelled"))

    assert wait_until(lambda: cancelled() == 3, timeout=10)


def test_public_routes_with_a_key(srv):
    """With an API key set, /metrics, /health and the chat page need none (as vLLM); the API still does."""
    base = f"http://127.0.0.1:{srv.port}"
    with urllib.request.urlopen(base + "/", timeout=10) as resp:
        page = resp.read().decode()
        assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        with urllib.request.urlopen(base + asset, timeout=10) as resp:
            assert resp.status == 200 and resp.read()
    assert len(re.findall(r'(?:src|href)="(/static/[^"]+)"', page)) == 2  # chat.css, chat.js
    assert not re.search(r'(?:src|href)="(?!/|data:)', page)  # nothing from elsewhere
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/v1/models", timeout=10)
    assert e.value.code == 401
