"""The speedrun's post-training stage: the teacher program, then SFT -> GRPO end to end at micro scale."""

import json
import re

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.recipes.posttrain import TASK_KNOBS, TEACHER_SLIP, post_train, teacher_trace, write_traces
from nanoseek.rl.rewards import accuracy_reward, format_reward
from nanoseek.rl.tasks import generate


def test_teacher_traces_are_correct_and_well_formed(tmp_path):
    for p in generate("arithmetic", 300, seed=3, **TASK_KNOBS):
        trace = teacher_trace(p)
        assert accuracy_reward("", trace, answer=p.answer) == 1.0 and format_reward("", trace) == 1.0
    p = next(generate("arithmetic", 1, seed=0, **TASK_KNOBS))
    toks = p.question.split()[1:]
    assert teacher_trace(p).startswith(f"<think>{toks[0]} {toks[1]} {toks[2]} = ")
    rows = [json.loads(x) for x in write_traces(tmp_path / "t.jsonl", 20, seed=1).read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["source"] == "teacher-program" and all(r["correct"] for r in rows)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]


def test_a_slipping_teacher_drops_minus_signs_at_its_rate(tmp_path):
    """slip: each negative step result loses its minus sign with that probability and the chain carries on from the
    wrong value; every other step is right, and the provenance says which traces end wrong."""
    rows = [json.loads(x) for x in write_traces(tmp_path / "t.jsonl", 2000, seed=0, slip=0.5).read_text().splitlines()]
    negative = dropped = 0
    for r in rows:
        question, trace = r["messages"][0]["content"], r["messages"][1]["content"]
        steps = re.findall(r"(-?\d+) ([+-]) (\d+) = (-?\d+)", trace)
        acc = int(question.split()[1])
        for a, op, b, got in steps:
            assert int(a) == acc  # carried on from what the teacher wrote
            true = acc + int(b) if op == "+" else acc - int(b)
            assert int(got) in (true, -true) and (int(got) == true or true < 0)
            negative += true < 0
            dropped += int(got) != true
            acc = int(got)
        assert trace.endswith(f"<answer>{acc}</answer>") and r["correct"] == (acc == _value(question))
    assert abs(dropped / negative - 0.5) < 0.04  # ~1,900 negative steps: 4 standard errors
    assert 0.15 < 1 - sum(r["correct"] for r in rows) / len(rows) < 0.35
    with pytest.raises(ValueError, match="teacher_slip must be in"):
        write_traces(tmp_path / "u.jsonl", 2, seed=0, slip=-0.1)


def _value(question: str) -> int:
    toks = question.removeprefix("Compute ").split()
    acc = int(toks[0])
    for op, b in zip(toks[1::2], toks[2::2], strict=True):
        acc = acc + int(b) if op == "+" else acc - int(b)
    return acc


def test_post_train_runs_sft_then_grpo(tmp_path):
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    tok = train_tokenizer(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    init = tmp_path / "init"
    nanoseek.save(nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.02)), init)
    heldout = tmp_path / "val_docs.jsonl"
    heldout.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in texts[:3]))
    s = post_train(tmp_path / "post", init, tok, sft_steps=4, grpo_minutes=0.01, eval_n=16, progress=False,
                   heldout_text=heldout)
    for stage in ("pre-trained", "sft", "grpo"):  # the report's evaluation table
        assert s["eval"][stage]["n"] == 16 and s["eval"][stage]["bpb_docs"] == 3 and s["eval"][stage]["bpb"] > 0
    assert s["eval"]["pre-trained"]["bpb"] != s["eval"]["sft"]["bpb"]  # SFT changed the model
    assert s["heldout_n"] == 16 and s["sft_steps"] == 4 and s["grpo_steps"] >= 1
    assert s["teacher_slip"] == TEACHER_SLIP and 0.6 < s["teacher_accuracy"] < 0.9  # the default teacher slips
    for k in ("accuracy_pretrained", "accuracy_sft", "accuracy_grpo"):
        assert 0.0 <= s[k] <= 1.0
    assert (tmp_path / "post" / "sft" / "checkpoints" / "step_00000004").is_dir()
    assert (tmp_path / "post" / "grpo" / "grpo.png").stat().st_size > 1000
    assert (tmp_path / "post" / "sft" / "data" / "train_mask.bin").is_file()
