"""Rule-based rewards for R1-style RL (R1 §2.2.2): accuracy, format, Countdown, language consistency, weighted sums.

A reward is a plain function ``(prompt: str, completion: str, **fields) -> float``; ``fields`` are the problem's
reward fields (``answer``, or ``numbers`` / ``target``, or ``tests``) and every reward ignores the fields it does not
use, so rewards can be mixed freely with :func:`combine`. Write your own with the same signature and add it to
:data:`REWARDS` to make it available by name.

Anti-reward-hacking rules shared by the accuracy, Countdown and format rewards (see :func:`strict_answer`):
the completion must open with one non-empty ``<think>...</think>`` block (when ``require_think``), followed by
exactly one answer in the required format -- one ``<answer>...</answer>`` (the whole rest of the completion) or
one ``\\boxed{...}``. Several answers, several boxes, an answer outside the required format, stray or repeated
think tags, or an empty think block earn no reward.

Threads: math-verify enforces its timeouts with ``signal.alarm``, which works only in the main thread (the alarm also
replaces any SIGALRM handler of the caller for its duration). Called from the main thread, the accuracy reward runs
math-verify in place with that timeout. Called from any other thread, it sends the comparison to a worker process
(started on first use, shared by all threads, one comparison at a time) that runs math-verify in its own main thread
with the same timeout, and kills and replaces that process when a comparison overruns a hard deadline: a
pathological answer such as ``9^{9^{9^{9}}}`` (whose evaluation holds the interpreter lock inside C code, so no
other thread of the process could run) scores 0 within the deadline instead of freezing the caller's process.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import IO, Literal

from math_verify import LatexExtractionConfig, parse, verify

RewardFn = Callable[..., float]
AnswerFormat = Literal["answer", "boxed", "any"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_STRICT_ANSWER_RE = re.compile(r"<answer>(.*)</answer>", re.S)


# ---------------------------------------------------------------------------------------------------- extraction
def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order, nested braces kept (unbalanced ones skipped)."""
    out = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth, start = 0, i + 1
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[start:j])
                    break
    return out


def _unbox(content: str) -> str:
    boxes = find_boxed(content)
    return boxes[-1] if boxes else content


def extract_answer(completion: str) -> str | None:
    """Lenient extraction (for logging / eval, not for rewards): the last ``<answer>...</answer>`` content (its last
    ``\\boxed{}`` if it holds one), else the last ``\\boxed{...}``; stripped; None when there is neither."""
    answers = _ANSWER_RE.findall(completion)
    if answers:
        return _unbox(answers[-1]).strip()
    boxes = find_boxed(completion)
    return boxes[-1].strip() if boxes else None


def strict_answer(completion: str, answer_format: AnswerFormat = "answer", require_think: bool = True) -> str | None:
    """The single final answer of a well-formed completion, or None when any anti-hacking rule is broken.

    Think: either no think tags at all (allowed only when ``require_think`` is False) or exactly one ``<think>``
    opening the completion and one ``</think>`` closing a non-empty block; the answer is looked for after it.
    ``answer_format``: ``"answer"`` -- the rest is exactly one ``<answer>...</answer>`` (surrounding whitespace only),
    whose content may hold at most one ``\\boxed{}`` (then its content is the answer); ``"boxed"`` -- exactly one
    ``\\boxed{...}`` in the rest, any text around it; ``"any"`` -- ``"answer"`` when answer tags appear, else
    ``"boxed"``. An empty answer is None.
    """
    text = completion.strip()
    n_open, n_close = text.count("<think>"), text.count("</think>")
    if n_open == n_close == 0:
        if require_think:
            return None
        rest = text
    elif n_open == n_close == 1 and text.startswith("<think>"):
        think, _, rest = text[len("<think>") :].partition("</think>")
        if not think.strip():
            return None
    else:
        return None
    if answer_format == "any":
        answer_format = "answer" if "<answer>" in rest or "</answer>" in rest else "boxed"
    n_boxes = len(_BOX_RE.findall(rest))
    boxes = find_boxed(rest)
    if answer_format == "answer":
        m = _STRICT_ANSWER_RE.fullmatch(rest.strip())
        if m is None or rest.count("<answer>") != 1 or rest.count("</answer>") != 1 or n_boxes > 1:
            return None
        content = m.group(1)
        if n_boxes == 1:
            if len(boxes) != 1:
                return None
            content = boxes[0]
    elif answer_format == "boxed":
        if n_boxes != 1 or len(boxes) != 1:
            return None
        content = boxes[0]
    else:
        raise ValueError(f"answer_format must be 'answer', 'boxed' or 'any', not {answer_format!r}")
    content = content.strip()
    return content or None


# ------------------------------------------------------------------------------------------------------ accuracy
def _parse_math(s: str, timeout: int | None) -> list:
    s = s.strip().rstrip(".").strip()
    if not s:
        return []
    return parse("\\boxed{" + s + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)


def _equivalent_here(pred: str, gold: str, timeout: int | None) -> bool:
    """math-verify in this thread (its timeout works in the main thread only)."""
    gold_p, pred_p = _parse_math(gold, timeout), _parse_math(pred, timeout)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=timeout))


# The worker process loads this file on its own (not the nanoseek package, which would import torch) and serves.
_WORKER_BOOT = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("nanoseek_math_worker", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not mix with the replies
module._serve_math(sys.stdin, replies)
"""
WORKER_START_SECONDS = 120.0  # for the worker to start (importing math-verify and sympy; slow on a busy machine)


def _serve_math(requests: IO[str], replies: IO[str]) -> None:
    """The worker's loop, in its main thread: one JSON request ``[pred, gold, timeout]`` per line in, ``1`` or ``0``
    per line out; ``ready`` first. Ends when the requests end (the parent closed the pipe or died)."""
    replies.write("ready\n")
    replies.flush()
    for line in requests:
        pred, gold, timeout = json.loads(line)
        try:
            ok = _equivalent_here(pred, gold, timeout)
        except Exception:  # an expression math-verify cannot handle is not equivalent
            ok = False
        replies.write("1\n" if ok else "0\n")
        replies.flush()


class _MathWorker:
    """A math-verify worker process for calls from threads other than the main one (module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    def _reply(self, proc: subprocess.Popen[bytes], deadline: float | None) -> str | None:
        """The worker's next line, or None if it ends (or the deadline passes) first."""
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            ready, _, _ = select.select([proc.stdout], [], [], wait)
            if not ready:
                return None
            chunk = proc.stdout.read(1)  # unbuffered: exactly what is there, never past the reply
            if not chunk:
                return None
            line += chunk
        return line.decode().strip()

    def _started(self) -> subprocess.Popen[bytes] | None:
        if self._proc is None or self._proc.poll() is not None:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, __file__], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, bufsize=0, start_new_session=True)  # no Ctrl-C
            if self._reply(proc, time.monotonic() + WORKER_START_SECONDS) != "ready":
                self._kill(proc)
                warnings.warn("the math-verify worker process did not start; answers score 0", stacklevel=4)
                return None
            self._proc = proc
        return self._proc

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()

    def equivalent(self, pred: str, gold: str, timeout: int | None) -> bool:
        """math-verify in the worker with `timeout` (seconds; None or <= 0: none, as math-verify); False past the
        hard deadline (three times the timeout, for two parses and the comparison, plus 2 s), after which the worker
        is replaced."""
        with self._lock:
            proc = self._started()
            if proc is None:
                return False
            assert proc.stdin is not None
            deadline = None if timeout is None or timeout <= 0 else time.monotonic() + 3 * timeout + 2
            try:
                proc.stdin.write((json.dumps([pred, gold, timeout]) + "\n").encode())
                proc.stdin.flush()
            except OSError:
                reply = None
            else:
                reply = self._reply(proc, deadline)
            if reply not in ("0", "1"):  # overran the deadline, or died
                self._kill(proc)
                self._proc = None
                return False
            return reply == "1"

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


_WORKER = _MathWorker()


def is_equivalent(pred: str, gold: str, timeout: int | None = 5) -> bool:
    """Whether the answer string ``pred`` equals ``gold`` mathematically (math-verify parse + verify; plain or LaTeX,
    e.g. ``\\frac{1}{2}`` == ``0.5``, ``1,000`` == ``1000``). Strict: the string must be just the answer
    (``18 dollars`` is not 18). ``timeout`` (seconds) bounds each parse and the comparison; off the main thread the
    comparison runs in a worker process, killed past a hard deadline (module docstring)."""
    if threading.current_thread() is threading.main_thread():
        return _equivalent_here(pred, str(gold), timeout)
    return _WORKER.equivalent(pred, str(gold), timeout)


def accuracy_reward(
    prompt: str, completion: str, answer: str | int | float | None = None, *, answer_format: AnswerFormat = "answer",
    require_think: bool = True, timeout: int | None = 5, **_: object,
) -> float:
    """1.0 when the completion's single well-formed answer (:func:`strict_answer`) equals ``answer`` by math-verify,
    else 0.0."""
    if answer is None:
        raise ValueError("accuracy_reward needs the gold answer (answer=...)")
    pred = strict_answer(completion, answer_format, require_think)
    return float(pred is not None and is_equivalent(pred, str(answer), timeout))


def format_reward(prompt: str, completion: str, *, answer_format: AnswerFormat = "answer", **_: object) -> float:
    """1.0 for a non-empty ``<think>...</think>`` followed by exactly one answer in ``answer_format``, else 0.0."""
    return float(strict_answer(completion, answer_format, require_think=True) is not None)


# ----------------------------------------------------------------------------------------------------- countdown
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def evaluate_countdown(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value (a Fraction) of an arithmetic expression over non-negative integer literals with + - * /,
    parentheses and unary minus, and the literals it uses. No ``eval``: the expression is parsed with ``ast`` and any
    other node (names, calls, floats, powers, ...) raises ValueError; division by zero raises ZeroDivisionError."""
    if len(expr) > 500:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not allowed in a Countdown equation: {type(node).__name__}")

    try:
        value = ev(tree)
    except RecursionError as e:
        raise ValueError("expression nested too deeply") from e
    return value, used


def _as_integer(value: object, field: str) -> int:
    """An integer given as an int, an integral float or Fraction, or a string of one ("22", " 22 ", "22.0")."""
    v: object = value
    if isinstance(v, str):
        try:
            v = Fraction(v.strip())
        except (ValueError, ZeroDivisionError):
            pass
    if isinstance(v, float) and math.isfinite(v):
        v = Fraction(v)
    if isinstance(v, Fraction) and v.denominator == 1:
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise ValueError(f"countdown_reward: {field} must be an integer, got {value!r}")


def _as_integers(values: Iterable[object] | str, field: str) -> list[int]:
    """Integers given as an iterable (of any form `_as_integer` takes) or as one string: "[3, 4, 84]", "3 4 84"."""
    if isinstance(values, str):
        values = [v for v in re.split(r"[\s,\[\]()]+", values) if v]
    return [_as_integer(v, field) for v in values]


def countdown_reward(
    prompt: str, completion: str, numbers: Iterable[int | str] | str | None = None, target: int | str | None = None,
    *, require_think: bool = True, format_score: float = 0.1, **_: object,
) -> float:
    """TinyZero Countdown reward. 1.0: the single ``<answer>`` (:func:`strict_answer`) holds an arithmetic
    expression using each of ``numbers`` exactly once (as a multiset) whose exact value is ``target`` (an optional
    ``= target`` suffix is accepted). ``format_score`` (0.1): a well-formed arithmetic expression that is wrong --
    other numbers, wrong value, division by zero. 0.0: no valid answer block (missing, several, empty think) or
    content that is not an arithmetic expression (text, code, unbalanced parentheses).

    ``numbers`` and ``target`` may come as strings (as read from a JSONL file): ``"22"``, ``"[3, 4, 84]"`` or
    ``"3 4 84"``; ValueError naming the field for one that is not integers."""
    if numbers is None or target is None:
        raise ValueError("countdown_reward needs numbers=... and target=...")
    given = sorted(_as_integers(numbers, "numbers"))
    goal = _as_integer(target, "target")
    expr = strict_answer(completion, "answer", require_think)
    if expr is None:
        return 0.0
    claimed = None
    if expr.count("=") == 1:
        expr, rhs = expr.split("=")
        try:
            claimed = Fraction(int(rhs.strip()))
        except ValueError:
            return 0.0
    try:
        value, used = evaluate_countdown(expr)
    except ValueError:
        return 0.0
    except ZeroDivisionError:
        return format_score
    ok = sorted(used) == given and value == goal and claimed in (None, value)
    return 1.0 if ok else format_score


# ---------------------------------------------------------------------------------------------------- language
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_WORD_RE = re.compile(r"[^\W\d_]+")


def _in_script(ch: str, script: str) -> bool:
    if script == "ASCII":
        return ch.isascii()
    return unicodedata.name(ch, "").startswith(script)


def language_reward(prompt: str, completion: str, *, script: str = "latin", **_: object) -> float:
    """R1's language-consistency reward: the fraction of words (runs of letters; tags, digits and symbols ignored)
    whose letters all belong to ``script`` -- ``"latin"`` (English and other Latin-script languages), ``"ascii"``, or
    any Unicode script-name prefix such as ``"cjk"`` or ``"cyrillic"``. 0.0 when the completion has no words."""
    words = _WORD_RE.findall(_TAG_RE.sub(" ", completion))
    if not words:
        return 0.0
    s = script.upper()
    return sum(all(_in_script(c, s) for c in w) for w in words) / len(words)


# ----------------------------------------------------------------------------------------------------- combining
def combine(rewards_with_weights: Mapping[RewardFn, float] | Iterable[tuple[RewardFn, float]]) -> RewardFn:
    """A reward that is the weighted sum of others: ``combine([(accuracy_reward, 1.0), (format_reward, 0.2)])``.
    Every part receives the same prompt, completion and fields."""
    items = list(rewards_with_weights.items() if isinstance(rewards_with_weights, Mapping) else rewards_with_weights)
    if not items:
        raise ValueError("combine needs at least one (reward, weight) pair")

    def combined(prompt: str, completion: str, **fields: object) -> float:
        return float(sum(w * fn(prompt, completion, **fields) for fn, w in items))

    combined.__name__ = "+".join(f"{w:g}*{getattr(fn, '__name__', 'reward')}" for fn, w in items)
    return combined


def _code_reward(prompt: str, completion: str, **fields: object) -> float:
    from .sandbox import code_reward  # lazy: the sandbox is only needed for code tasks

    return code_reward(prompt, completion, **fields)


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward, "format": format_reward, "countdown": countdown_reward,
    "language": language_reward, "code": _code_reward,
}
"""Rewards by name; add your own (same signature) to make them available by name."""
