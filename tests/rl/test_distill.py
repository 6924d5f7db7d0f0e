"""Distillation: a teacher served by `nanoseek serve` (loopback) answers k times, verified answers are kept with
provenance, then a student is fine-tuned on them (`nanoseek distill`)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.cli import main
from nanoseek.infer.engine import Engine
from nanoseek.infer.server import build_app
from nanoseek.recipes.posttrain import teacher_trace
from nanoseek.rl.distill import EndpointTeacher, EngineTeacher, distill
from nanoseek.rl.rewards import accuracy_reward
from nanoseek.rl.tasks import generate
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, prepare_sft
from nanoseek.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from infer_helpers import running_server, small_tokenizer  # noqa: E402

KNOBS = {"digits": 1, "n_operands": 2, "ops": "+-"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny model taught the task by SFT on teacher-program traces: it solves part of the problems."""
    tmp = tmp_path_factory.mktemp("teacher")
    tok = small_tokenizer()
    torch.manual_seed(0)
    init = tmp / "init"
    nanoseek.save(nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.02)), init)
    traces = tmp / "traces.jsonl"
    rows = [{"messages": [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": teacher_trace(p)}]}
            for p in generate("arithmetic", 600, seed=0, **KNOBS)]
    traces.write_text("\n".join(json.dumps(r) for r in rows))
    prepare_sft([traces], tok, tmp / "data")
    cfg = TrainConfig(**{**SFT_DEFAULTS, "steps": 200, "lr": 3e-3, "seq_len": 64, "init_from": str(init),
                         "eval_every": 200, "ckpt_every": 200})
    t = Trainer(nanoseek.load(init).config, cfg, tmp / "data", tmp / "sft", progress=False)
    t.run()
    return t.model.eval(), tok, tmp / "sft" / "checkpoints" / "step_00000200"


def test_distill_keeps_only_verified_answers(teacher, tmp_path):
    model, tok, _ = teacher
    problems = list(generate("arithmetic", 24, seed=5, **KNOBS))
    out = tmp_path / "local.jsonl"
    st = distill(problems, EngineTeacher(model, tok, name="local"), out, k=3, temperature=1.0, max_tokens=40,
                 progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    by_id = {p.id: p for p in problems}
    assert st.samples == 72 and st.kept == len(rows) > 0 and st.kept < st.samples  # some rejected
    for r in rows:
        p = by_id[r["problem_id"]]
        assert r["source"] == "local" and r["messages"][0]["content"] == p.question
        assert accuracy_reward("", r["messages"][1]["content"], answer=p.answer) == 1.0


def test_distill_from_our_server_then_sft(teacher, tmp_path, capsys):
    model, tok, ckpt = teacher
    app = build_app(Engine(model, tok, max_batch=8, max_len=128), tok, "teacher")
    with running_server(app) as (_, port):
        url = f"http://127.0.0.1:{port}/v1"
        problems = list(generate("arithmetic", 12, seed=5, **KNOBS))
        st = distill(problems, EndpointTeacher(url, "teacher"), tmp_path / "e.jsonl", k=2, temperature=1.0,
                     max_tokens=40, progress=False)
        assert st.samples == 24 and st.kept > 0
        assert json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])["source"] == f"teacher@{url}"
        out = tmp_path / "run"
        assert main(["distill", "--teacher", url, "--teacher-model", "teacher", "--out", str(out), "--n", "24",
                     "--k", "4", "--seed", "5", "--temperature", "1.0", "--max-tokens", "40", "--knob", "digits=1",
                     "--knob", "n_operands=2", "--knob", "ops=+-", "--student", str(ckpt), "--sft-steps", "3",
                     "--set", "seq_len=64", "--set", "eval_every=3"]) == 0
    text = capsys.readouterr().out
    assert "answers kept" in text and "done: 3/3" in text
    assert (out / "sft" / "checkpoints" / "step_00000003" / "tokenizer.json").is_file()
