"""Problem generators, held-out splits and JSONL loaders."""

import json
import random
from pathlib import Path

import pytest

from nanoseek.config import ConfigError
from nanoseek.rl.rewards import accuracy_reward, countdown_reward, evaluate_countdown
from nanoseek.rl.tasks import (
    HELDOUT_FRACTION,
    arithmetic_problem,
    check_knobs,
    countdown_problem,
    generate,
    heldout_set,
    is_heldout,
    load_gsm8k,
    load_jsonl,
    load_math,
    r1_zero_prompt,
    task_knobs,
)

DATA = Path(__file__).parents[3] / "shared" / "data"


def test_r1_zero_prompt():
    p = r1_zero_prompt("What is 2 + 3?")
    assert p.startswith("A conversation between User and Assistant. The user asks a question")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in p
    assert p.endswith("User: What is 2 + 3?. Assistant:")


@pytest.mark.parametrize("task, knobs", [
    ("arithmetic", {"digits": (1, 3), "n_operands": (2, 4), "ops": "+-*/"}),
    ("countdown", {"n_numbers": (3, 4)}),
])
def test_generation_is_deterministic_by_seed(task, knobs):
    a = [p.to_dict() for p in generate(task, 30, seed=7, **knobs)]
    b = [p.to_dict() for p in generate(task, 30, seed=7, **knobs)]
    c = [p.to_dict() for p in generate(task, 30, seed=8, **knobs)]
    assert a == b and a != c
    assert len({p["id"] for p in a}) > 25


def test_heldout_split_is_disjoint_from_training_stream():
    # a tiny problem space (81 sums "a + b" of one-digit numbers) so an unfiltered stream would surely hit it
    knobs = {"digits": 1, "n_operands": 2, "ops": "+"}
    test = heldout_set("arithmetic", 3, **knobs)
    assert len({p.id for p in test}) == 3 and all(is_heldout(p.id) for p in test)
    train_ids = {p.id for p in generate("arithmetic", 600, seed=0, **knobs)}
    assert not train_ids & {p.id for p in test}
    assert not any(is_heldout(i) for i in train_ids)
    unfiltered = {arithmetic_problem(random.Random(s), **knobs).id for s in range(600)}
    assert unfiltered & {p.id for p in test}  # the filter is what keeps them apart
    assert len(train_ids) >= 81 * (1 - HELDOUT_FRACTION) - 10  # and training still covers the rest
    with pytest.raises(ValueError):  # fewer than 50 held-out problems exist in that space
        heldout_set("arithmetic", 50, **knobs)
    # same for Countdown, by id, on a larger space
    cd_test = {p.id for p in heldout_set("countdown", 40, max_number=20, target_range=(1, 30))}
    cd_train = {p.id for p in generate("countdown", 2000, seed=1, max_number=20, target_range=(1, 30))}
    assert len(cd_test) == 40 and not cd_test & cd_train


@pytest.mark.parametrize("knobs", [
    {"n_numbers": 3}, {"n_numbers": 4}, {"n_numbers": (3, 4), "ops": "*/"}, {"n_numbers": 4, "ops": "+-"},
    {"n_numbers": 3, "max_number": 20, "target_range": (10, 50)},
])
def test_countdown_problems_are_solved_by_their_own_solution(knobs):
    n_lo, n_hi = (knobs["n_numbers"],) * 2 if isinstance(knobs["n_numbers"], int) else knobs["n_numbers"]
    lo, hi = knobs.get("target_range", (1, 100))
    for p in generate("countdown", 60, seed=3, **knobs):
        assert n_lo <= len(p.numbers) <= n_hi and lo <= p.target <= hi
        assert all(1 <= x <= knobs.get("max_number", 99) for x in p.numbers)
        assert str(p.numbers[0]) in p.prompt and str(p.target) in p.prompt
        assert countdown_reward(p.prompt, p.solution, **p.reward_fields()) == 1.0, p


def test_arithmetic_answers_are_correct():
    for p in generate("arithmetic", 100, seed=5, digits=(1, 3), n_operands=(2, 5), ops="+-*/"):
        expr = p.question.removeprefix("Compute ")
        value, operands = evaluate_countdown(expr)  # exact rational evaluation with usual precedence
        assert value.denominator == 1 and str(value.numerator) == p.answer, p
        assert 2 <= len(operands) <= 5
        assert accuracy_reward(p.prompt, p.solution, **p.reward_fields()) == 1.0
    p = arithmetic_problem(random.Random(0), digits=4, n_operands=3, ops="+")
    nums = [int(x) for x in p.question.removeprefix("Compute ").split(" + ")]
    assert all(1000 <= x <= 9999 for x in nums) and int(p.answer) == sum(nums)
    with pytest.raises(ValueError):
        arithmetic_problem(random.Random(0), ops="^")
    with pytest.raises(ValueError):
        countdown_problem(random.Random(0), max_number=2, target_range=(1000, 2000), max_tries=50)


def test_knobs_are_checked_by_name_type_and_value():
    assert list(task_knobs("arithmetic")) == ["digits", "n_operands", "ops"]
    # text (from --knob) is parsed by the knob's annotation; Python values are checked and lists become tuples
    assert check_knobs("arithmetic", {"digits": "1,2", "n_operands": "3", "ops": "+-"}) == {
        "digits": (1, 2), "n_operands": 3, "ops": "+-"}
    assert check_knobs("countdown", {"target_range": [1, 50]}) == {"target_range": (1, 50)}
    for task, knobs, message in [
        ("foo", {}, "task must be one of arithmetic, countdown, got 'foo'"),
        ("arithmetic", {"digit": 1}, "unknown arithmetic knob 'digit'; did you mean 'digits'\? valid: digits, "
                                     "n_operands, ops"),
        ("arithmetic", {"digits": "two"}, "digits must be an integer or 2 comma-separated values, each an integer, "
                                          "got 'two'"),
        ("arithmetic", {"digits": 0}, "digits must be an integer >= 1 or a range"),
        ("countdown", {"max_number": 0}, "max_number must be a positive integer, got 0"),
        ("countdown", {"target_range": "50,1"}, "target_range must be lo,hi with lo <= hi"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_knobs(task, knobs)
        with pytest.raises(ConfigError, match=message):  # the generators' own entry point checks them too
            next(generate(task, **knobs))


@pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").exists(), reason="shared GSM8K data not available")
def test_gsm8k_loader_on_real_rows_and_cot_solution_verifies():
    rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").open().readlines()[:20]]
    problems = load_gsm8k(DATA / "gsm8k_test.jsonl", limit=20)
    assert len(problems) == 20
    for row, p in zip(rows, problems, strict=True):
        assert p.task == "gsm8k" and p.id == row["id"] and p.answer == row["answer"].replace(",", "")
        assert row["question"].strip() in p.prompt and "<<" not in p.solution
        assert accuracy_reward(p.prompt, p.solution, **p.reward_fields()) == 1.0
        wrong = p.solution.replace(f"<answer>{p.answer}</answer>", f"<answer>{p.answer}1</answer>")
        assert accuracy_reward(p.prompt, wrong, **p.reward_fields()) == 0.0


def test_gsm8k_original_layout_and_math_layout(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "Big?", "answer": "It is 1000+234 = <<1000+234=1234>>1,234.\n#### 1,234"},
    ]) + "\n")
    probs = load_jsonl(gsm)
    assert [p.answer for p in probs] == ["72", "1234"] and [p.id for p in probs] == ["gsm8k-0", "gsm8k-1"]
    assert probs[0].solution.startswith("<think>\nIn May she sold 48/2 = 24 clips.")
    assert all(accuracy_reward(p.prompt, p.solution, **p.reward_fields()) == 1.0 for p in probs)

    math = tmp_path / "math.jsonl"
    math.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "Compute $\\frac{2}{4}$.", "solution": "Reduce: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
        {"problem": "Root?", "solution": "It is $\\boxed{\\frac{\\sqrt{2}}{2}}$.", "unique_id": "u1"},
        {"problem": "Given answer", "solution": "Work \\boxed{3}", "answer": "3"},
        {"problem": "No answer at all", "solution": "no box here"},
    ]) + "\n")
    probs = load_math(math)
    assert [p.answer for p in probs] == ["\\frac{1}{2}", "\\frac{\\sqrt{2}}{2}", "3"]
    assert [p.id for p in probs] == ["math-0", "u1", "math-2"] and probs[0].task == "math"
    assert all(accuracy_reward(p.prompt, p.solution, **p.reward_fields()) == 1.0 for p in probs)
    assert accuracy_reward(probs[0].prompt, "<think>t</think> <answer>0.5</answer>", **probs[0].reward_fields()) == 1
    assert [p.answer for p in load_jsonl(math, limit=2)] == ["\\frac{1}{2}", "\\frac{\\sqrt{2}}{2}"]
