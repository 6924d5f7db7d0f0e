"""Rule-based rewards on hand-written completions, including reward-hacking attempts."""

import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from nanoseek.rl import rewards
from nanoseek.rl.rewards import (
    REWARDS,
    accuracy_reward,
    combine,
    countdown_reward,
    evaluate_countdown,
    extract_answer,
    find_boxed,
    format_reward,
    language_reward,
    strict_answer,
)

P = "prompt"
THINK = "<think>Half of one is one half.</think> "


def acc(completion: str, answer: str, **kw) -> float:
    return accuracy_reward(P, completion, answer=answer, **kw)


def test_extraction():
    assert find_boxed(r"a \boxed{\frac{1}{\sqrt{2}}} b \boxed {3} \fbox{x} \boxed{open") == [
        r"\frac{1}{\sqrt{2}}", "3", "x"]
    assert extract_answer(r"<think>t</think> <answer>\boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"
    assert extract_answer("<answer> 5 </answer> <answer>7</answer>") == "7"
    assert extract_answer(r"so \boxed{1} then \boxed{x^{2}}") == "x^{2}"
    assert extract_answer("no answer here") is None
    assert strict_answer(THINK + "<answer> 42 </answer>\n") == "42"


def test_accuracy_correct_wrong_and_equivalent_forms():
    assert acc(THINK + "<answer>18</answer>", "18") == 1.0
    assert acc(THINK + "<answer>19</answer>", "18") == 0.0
    assert acc(THINK + r"<answer>\boxed{\frac{1}{2}}</answer>", "0.5") == 1.0
    assert acc(THINK + "<answer>0.5</answer>", r"\frac{1}{2}") == 1.0
    assert acc(THINK + "<answer>1,000</answer>", "1000") == 1.0
    assert acc(THINK + r"<answer>\$18</answer>", "18") == 1.0
    assert acc(THINK + r"So the answer is \boxed{\dfrac{1}{2}}.", "0.5", answer_format="boxed") == 1.0
    assert acc(THINK + r"<answer>\frac{\sqrt{2}}{2}</answer>", r"\frac{1}{\sqrt{2}}") == 1.0
    assert acc(THINK + "<answer>1 or 2</answer>", "2") == 0.0  # a hedge is not the answer
    with pytest.raises(ValueError):
        accuracy_reward(P, THINK + "<answer>1</answer>")


def test_accuracy_reward_hacking_cases_earn_nothing():
    # two boxed answers, inside or outside the answer tags
    assert acc(THINK + r"\boxed{18} or \boxed{19}", "18", answer_format="boxed") == 0.0
    assert acc(THINK + r"<answer>\boxed{18} \boxed{19}</answer>", "18") == 0.0
    assert acc(THINK + r"<answer>18</answer> \boxed{19}", "18") == 0.0
    # two answer blocks
    assert acc(THINK + "<answer>18</answer><answer>19</answer>", "18") == 0.0
    assert acc(THINK + "<answer>18</answer><answer>18</answer>", "18") == 0.0
    # the answer outside the required <answer> format (accepted when boxed is the required format)
    assert acc(THINK + r"The answer is \boxed{18}", "18") == 0.0
    assert acc(THINK + r"The answer is \boxed{18}", "18", answer_format="boxed") == 1.0
    assert acc(THINK + "<answer>18</answer> trailing text", "18") == 0.0
    assert acc(THINK + "The answer is 18", "18", answer_format="any") == 0.0
    # empty think, missing think, think not opening the completion, repeated think
    assert acc("<think>  </think> <answer>18</answer>", "18") == 0.0
    assert acc("<answer>18</answer>", "18") == 0.0
    assert acc("<answer>18</answer>", "18", require_think=False) == 1.0
    assert acc("Sure. <think>t</think> <answer>18</answer>", "18") == 0.0
    assert acc("<think>a</think><think>b</think> <answer>18</answer>", "18") == 0.0
    assert acc("<think>never closed <answer>18</answer>", "18") == 0.0
    assert acc(THINK + "<answer>  </answer>", "18") == 0.0


def test_format_reward():
    assert format_reward(P, THINK + "<answer>wrong but well formed</answer>") == 1.0
    assert format_reward(P, "<answer>7</answer>") == 0.0
    assert format_reward(P, "<think></think><answer>7</answer>") == 0.0
    assert format_reward(P, THINK + "<answer>7</answer><answer>8</answer>") == 0.0
    assert format_reward(P, THINK + "7") == 0.0
    assert format_reward(P, THINK + r"it is \boxed{7}", answer_format="boxed") == 1.0


def test_accuracy_works_off_the_main_thread():
    # math-verify's signal.alarm timeout raises in threads; the reward switches it off there
    out = []
    t = threading.Thread(target=lambda: out.append(acc(THINK + r"<answer>\frac{2}{4}</answer>", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


# A thread scoring this answer in a fresh interpreter (this file's module loaded on its own, without torch); run in
# a subprocess with a timeout, so that a regression (math-verify in the thread, without a timeout, evaluating
# 9^(9^(9^9)) in C while holding the interpreter lock) fails the test instead of freezing the whole run.
THREAD_SCRIPT = """
import importlib.util, sys, threading, time
spec = importlib.util.spec_from_file_location("rewards_under_test", sys.argv[1])
rewards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rewards)
out = []
t0 = time.monotonic()
score = lambda: out.append(rewards.accuracy_reward("", sys.argv[2], answer="5", timeout=1))
t = threading.Thread(target=score, daemon=True)
t.start()
t.join(120)
print(out, round(time.monotonic() - t0, 1))
"""


def test_pathological_answer_off_the_main_thread_returns_in_time():
    completion = THINK + r"<answer>9^{9^{9^{9}}}</answer>"
    p = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, rewards.__file__, completion], capture_output=True,
                       text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    scores, seconds = p.stdout.split()[0], float(p.stdout.split()[1])
    assert scores == "[0.0]" and seconds < 30  # worker start (math-verify import) + its 1 s timeout


def test_worker_past_its_deadline_is_killed_and_replaced(monkeypatch):
    """A worker that never answers (standing in for one stuck in C code): the call returns False at the deadline
    (3 x timeout + 2 s) and the process is killed; the next call starts a working one."""
    hung = "import sys, time\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\ntime.sleep(600)\n"
    monkeypatch.setattr(rewards, "_WORKER_BOOT", hung)
    worker = rewards._MathWorker()
    try:
        worker._started()
        proc = worker._proc
        t0 = time.monotonic()
        assert worker.equivalent("1", "1", timeout=1) is False
        assert time.monotonic() - t0 < 15 and proc.poll() is not None and worker._proc is None
        monkeypatch.undo()
        assert worker.equivalent(r"\frac{1}{2}", "0.5", timeout=5) is True
    finally:
        worker.close()


NUMS, TARGET = (3, 4, 84), 32


def cd(answer: str, numbers=NUMS, target=TARGET) -> float:
    return countdown_reward(P, f"<think>try things</think> <answer>{answer}</answer>", numbers=numbers, target=target)


def test_countdown_reward():
    assert cd("84 / 3 + 4") == 1.0
    assert cd("4 + (84 / 3)") == 1.0
    assert cd("84 / 3 + 4 = 32") == 1.0
    assert cd("84 / 3 + 4 = 33") == pytest.approx(0.1)  # claims a wrong value
    assert cd("84 / 3 + 4 + 3 - 3") == pytest.approx(0.1)  # uses 3 three times
    assert cd("84 / 4 + 11") == pytest.approx(0.1)  # value 32 but 11 is not given and 3 is unused
    assert cd("84 - 3 * 4") == pytest.approx(0.1)  # uses each once but equals 72
    assert cd("3 + 84 / (4 - 4)", numbers=(3, 4, 4, 84)) == pytest.approx(0.1)  # division by zero
    assert cd("84 / 3 +") == 0.0  # malformed
    assert cd("84 / 3 + 4.0") == 0.0  # floats are not the given numbers
    assert cd("__import__('os').getcwd()") == 0.0  # never evaluated
    assert cd("2 ** 5") == 0.0  # only + - * /
    # exact arithmetic: 8 / (3 - 8 / 3) is exactly 24 (floats give 23.99999999999999)
    assert cd("8 / (3 - 8 / 3)", numbers=(8, 8, 3, 3), target=24) == 1.0
    # missing / several answers / format hacks
    assert countdown_reward(P, "<think>t</think> 84 / 3 + 4", numbers=NUMS, target=TARGET) == 0.0
    assert countdown_reward(P, "<think>t</think> <answer>1</answer><answer>84/3+4</answer>", numbers=NUMS,
                            target=TARGET) == 0.0
    assert countdown_reward(P, "<think></think> <answer>84 / 3 + 4</answer>", numbers=NUMS, target=TARGET) == 0.0


def test_evaluate_countdown():
    assert evaluate_countdown("(1 + 2) * 3 - 4 / 8") == (Fraction(17, 2), [1, 2, 3, 4, 8])
    assert evaluate_countdown("-(2 - 5)") == (Fraction(3), [2, 5])
    for bad in ["x + 1", "f(1)", "1 if 1 else 2", "(1 + 2", "[1]", "1; 2", "(" * 300 + "1" + ")" * 300]:
        with pytest.raises(ValueError):
            evaluate_countdown(bad)
    with pytest.raises(ZeroDivisionError):
        evaluate_countdown("1 / (2 - 2)")


def test_language_reward():
    assert language_reward(P, "<think>The answer is four</think> <answer>4</answer>") == 1.0
    # words: The, 答案, is, four -> 3 of 4 Latin, 1 of 4 CJK
    mixed = "<think>The 答案 is four</think> <answer>4</answer>"
    assert language_reward(P, mixed) == pytest.approx(0.75)
    assert language_reward(P, mixed, script="cjk") == pytest.approx(0.25)
    assert language_reward(P, "café crème", script="latin") == 1.0
    assert language_reward(P, "café crème", script="ascii") == 0.0
    assert language_reward(P, "<answer>42</answer>") == 0.0  # no words


def test_combine_and_registry():
    good = THINK + "<answer>0.5</answer>"
    wrong = THINK + "<answer>0.7</answer>"
    r = combine([(accuracy_reward, 1.0), (format_reward, 0.5)])
    assert r(P, good, answer="1/2") == pytest.approx(1.5)
    assert r(P, wrong, answer="1/2") == pytest.approx(0.5)
    assert r(P, "0.5", answer="1/2") == 0.0
    r2 = combine({accuracy_reward: 2.0, language_reward: 1.0})
    assert r2(P, good, answer="1/2") == pytest.approx(2.0 + 1.0)
    assert set(REWARDS) >= {"accuracy", "format", "countdown", "language", "code"}
    assert REWARDS["countdown"](P, "<think>t</think> <answer>84/3+4</answer>", numbers=NUMS, target=TARGET) == 1.0


def test_countdown_fields_given_as_strings():
    """Problems read from JSONL may carry the target and numbers as text: compared as integers."""
    done = "<think>t</think> <answer>(10 + 1) * 2</answer>"
    assert countdown_reward(P, done, numbers=[10, 1, 2], target="22") == 1.0
    assert countdown_reward(P, done, numbers=["10", "1", " 2"], target=" 22 ") == 1.0
    assert countdown_reward(P, done, numbers="[10, 1, 2]", target=22.0) == 1.0
    assert countdown_reward(P, done, numbers="10 1 2", target="22") == 1.0
    assert countdown_reward(P, done, numbers=(10, 1, 2), target="23") == pytest.approx(0.1)
    for fields, name in [({"target": "twenty-two"}, "target"), ({"target": 22.5}, "target"),
                         ({"target": True}, "target"), ({"numbers": [10, 1.5, 2]}, "numbers"),
                         ({"numbers": "10, x, 2"}, "numbers")]:
        kw = {"numbers": [10, 1, 2], "target": 22, **fields}
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            countdown_reward(P, done, **kw)
