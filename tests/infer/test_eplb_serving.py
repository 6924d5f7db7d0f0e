"""Redundant experts re-planned from the served load (`serve --eplb`): plans appear on GET /eplb, never balance worse
than no replicas, and change no answer -- not even of requests streaming while a plan is installed."""

from __future__ import annotations

import json
import urllib.request

import pytest
from infer_helpers import run_threads, running_server, tiny_model_and_tokenizer, wait_until

from nanoseek.config import ConfigError
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.eplb import EPLBConfig, Rebalancer
from nanoseek.infer.metrics import ExpertLoad
from nanoseek.infer.server import build_app

KEY = "k"


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _eplb(port: int) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/eplb", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_server_replans_from_live_load_without_changing_answers():
    model, tok = tiny_model_and_tokenizer()
    prompts = ["def heap", "import random\n", "class Queue:", "x = [1, 2"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [r.text for r in Engine(model, tok, max_batch=4, max_len=128).generate(
        [[tok.bos_id, *tok.encode(p, allow_special=True)] for p in prompts], params)]  # the reference answers
    engine = Engine(model, tok, max_batch=4, max_len=128)
    app = build_app(engine, tok, "m", api_key=KEY, eplb=EPLBConfig(gpus=4, redundant=4, interval=0.05,
                                                                     min_tokens=8))
    with running_server(app) as (_, port):
        assert _eplb(port)["plans"] == 0
        answers: dict[int, list[int]] = {}

        def client(i: int) -> None:  # requests in flight while plans are installed every 50 ms
            for _ in range(2):
                out = _post(port, {"model": "m", "prompt": prompts[i], "max_tokens": 12, "temperature": 0,
                                   "ignore_eos": True})
                answers.setdefault(i, []).append(out["choices"][0]["text"])

        assert not run_threads(client, len(prompts), timeout=120)
        assert wait_until(lambda: _eplb(port)["plans"] >= 2, timeout=20)
        status = _eplb(port)
    for i, p in enumerate(prompts):  # every answer is the unreplicated model's
        assert answers[i] == [plain[i]] * 2, p
    last = status["last"]
    assert status["slots"] == 12 and len(last["phy2log"]) == model.config.n_moe_layers
    for plain_imb, repl_imb in zip(last["imbalance_plain"], last["imbalance_replicated"], strict=True):
        assert 1.0 <= repl_imb <= plain_imb + 1e-9
    assert all(sum(r) == 12 and min(r) >= 1 for r in last["replicas"])
    assert len(status["since_last"]["pairs"]) == model.config.n_moe_layers  # the installed plan's slot counts


def test_bad_eplb_settings_are_one_line_errors():
    model, tok = tiny_model_and_tokenizer()
    with pytest.raises(ConfigError, match=r"8 experts \+ redundant=1 = 9 slots do not split over gpus=4"):
        Rebalancer(model, ExpertLoad(model, attach=False), EPLBConfig(gpus=4, redundant=1))
    with pytest.raises(ConfigError, match="gpus"):
        EPLBConfig.parse("gpus=0")
    with pytest.raises(ConfigError, match="--eplb expects KEY=VALUE"):
        EPLBConfig.parse("gpus")
