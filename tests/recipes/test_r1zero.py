"""R1-Zero in miniature: the pre-training arithmetic text, the base's pass@k and the completion study."""

import hashlib
import json
import re

import torch
from conftest import tiny_config

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.recipes import r1zero
from nanoseek.recipes.posttrain import TASK_KNOBS
from nanoseek.recipes.r1zero import (
    PLAIN_STYLES,
    STYLES,
    arithmetic_documents,
    completion_study,
    sampled_pass,
    write_arithmetic_corpus,
)
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.rewards import accuracy_reward, format_reward
from nanoseek.rl.tasks import heldout_set, is_heldout, r1_zero_prompt

_CHAIN = re.compile(r"(-?\d+(?: [+-] \d+)+) = (-?\d+)")


def _value(expr: str) -> int:
    toks = expr.split()
    acc = int(toks[0])
    for op, b in zip(toks[1::2], toks[2::2], strict=True):
        acc = acc + int(b) if op == "+" else acc - int(b)
    return acc


def test_arithmetic_documents_are_correct_styled_and_never_held_out(tmp_path):
    docs = arithmetic_documents(40, seed=0, styles=STYLES)
    assert docs == arithmetic_documents(40, seed=0, styles=STYLES) and docs != arithmetic_documents(40, seed=1)
    assert arithmetic_documents(30, seed=0) == arithmetic_documents(30, seed=0, styles=PLAIN_STYLES)
    three = {p.question.removeprefix("Compute ") for p in heldout_set("arithmetic", 100, **TASK_KNOBS)}
    seen = set()
    for i, doc in enumerate(docs):
        style = STYLES[i % 4]
        items = doc.split("\n" if style == "equation" else "\n\n")
        assert len(items) == 20
        for item in items:
            if style == "equation":
                expr, value = item.split(" = ")
            else:
                expr = re.search(r"(?:^|User: )Compute (.+?)\. ", item).group(1)
                value = re.search(r"The answer is (-?\d+)\.$|<answer>(-?\d+)</answer>$", item)
                value = value.group(1) or value.group(2)
            assert _value(expr) == int(value), item
            for e, v in _CHAIN.findall(item):  # every written step is right
                assert _value(e) == int(v), item
            assert not is_heldout("arithmetic-" + hashlib.sha256(expr.encode()).hexdigest()[:12])  # tasks' ids
            assert expr not in three
            seen.add(len(expr.split()) // 2 + 1)
            if style in ("transcript", "conversation"):
                answer = item.split("Assistant: ")[-1]
                assert accuracy_reward("", answer, answer=value) == 1.0
                assert format_reward("", answer) == 1.0
            if style == "conversation":  # the R1-Zero prompt of the question, then the worked answer
                assert item == f"{r1_zero_prompt('Compute ' + expr)} {answer}"
    assert seen == {2, 3}
    rows = write_arithmetic_corpus(tmp_path / "a.jsonl", 4).read_text().splitlines()
    assert [json.loads(r)["text"] for r in rows] == arithmetic_documents(4)


def test_a_fallible_writer_slips_only_in_worked_answers():
    """slip: transcripts and conversations drop a minus sign (and carry on) at some negative steps; equations and
    prose stay right."""
    docs = arithmetic_documents(40, seed=0, styles=STYLES, slip=0.5)
    wrong = {style: 0 for style in STYLES}
    for i, doc in enumerate(docs):
        style = STYLES[i % 4]
        for item in doc.split("\n" if style == "equation" else "\n\n"):
            wrong[style] += any(_value(e) != int(v) for e, v in _CHAIN.findall(item)) or (
                style == "equation" and _value(item.split(" = ")[0]) != int(item.split(" = ")[1]))
    assert wrong["equation"] == wrong["prose"] == 0
    assert 20 < wrong["transcript"] < 150 and 20 < wrong["conversation"] < 150  # of 200 each


def test_sampled_pass_counts_the_samples_it_draws(tmp_path, monkeypatch):
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    tok = train_tokenizer(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.05))
    cfg = GRPOConfig(task="arithmetic", task_knobs={"digits": 1}, template="r1-zero", eval_n=6, max_new_tokens=6,
                     format_weight=1.0)
    tr = GRPOTrainer(model, tok, cfg, tmp_path, progress=False)
    # a stand-in scorer a random model satisfies sometimes: "correct" = the completion has a digit

    def digit_score(p, text, fw):
        hit = float(any(c.isdigit() for c in text))
        return hit, hit, float("e" in text)

    monkeypatch.setattr(r1zero, "score", digit_score)
    got = sampled_pass(tr, 4, seed=7)
    rolls = tr.sample(tr.heldout, 4, nanoseek.infer.engine.SamplingParams(max_new_tokens=6, temperature=1.0), seed=7)
    hits = torch.tensor([any(c.isdigit() for c in r.text) for r in rolls], dtype=torch.float).view(6, 4)
    assert 0 < hits.mean() < 1 and hits.amax(1).mean() > hits.mean()  # the case where pass@4 and pass@1 differ
    assert got["pass@1"] == hits.mean().item() and got["pass@4"] == hits.amax(1).mean().item()
    assert got["format_rate"] == sum("e" in r.text for r in rolls) / 24 and got["k"] == 4


def test_completion_study_spans_and_reflective_words(tmp_path):
    rows = []
    for step in range(1, 11):
        for j in range(2):
            text = "<think>1 + 2 = 3.</think> <answer>3</answer>" if step > 5 else "1 + 2 = 4 wait, check: 3"
            rows.append({"step": step, "question": "Compute 1 + 2", "completion": text, "reward": 0.0,
                         "correct": float(step > 5 and j == 0), "format": float(step > 5)})
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = completion_study(path, windows=2, examples=1)
    first, second = s["spans"]
    assert first["steps"] == "1-5" and second["steps"] == "6-10" and first["n"] == second["n"] == 10
    assert first["reflective"] == 1.0 and first["words"] == ["check", "wait"] and first["format_rate"] == 0.0
    assert second["reflective"] == 0.0 and second["format_rate"] == 1.0 and second["accuracy"] == 0.5
    assert first["chars"] == len(rows[0]["completion"]) and s["last"] == [rows[-1]["completion"]]
