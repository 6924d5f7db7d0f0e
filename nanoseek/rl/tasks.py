"""Verifiable problems for RL: our own arithmetic and Countdown generators, GSM8K / MATH JSONL loaders.

Every problem is a :class:`Problem` with the R1-Zero ``prompt`` (:func:`r1_zero_prompt`), the fields its reward needs
(``answer``, or ``numbers`` / ``target``: :meth:`Problem.reward_fields`) and a ``solution`` the project's teacher
program emits (``<think>...</think> <answer>...</answer>``).

Splits: a generated problem's id hashes its canonical content (the expression; the sorted numbers and the target, so
permutations are one problem), and the problem is held out when a salted hash of the id falls below
:data:`HELDOUT_FRACTION`. The training stream skips those problems and the test split keeps
only them, so the two never overlap whatever the seeds or difficulty knobs. Generation is deterministic given the seed
and the knobs.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, check_value, parse_value, type_hints, unknown_key
from ..data import iter_jsonl
from .rewards import find_boxed

HELDOUT_FRACTION = 1 / 16
"""Share of each generator's problem space reserved for the held-out split."""
HELDOUT_SEED = 20250120
"""Default seed of :func:`heldout_set`: a fixed test set for given knobs."""

_R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(question: str) -> str:
    """The DeepSeek-R1-Zero template (R1 §2.2.3, Table 1) around ``question``; the completion is expected to start with
    ``<think>``."""
    return _R1_ZERO.format(prompt=question.strip())


@dataclass(frozen=True)
class Problem:
    """One verifiable problem. ``task``: arithmetic | countdown | gsm8k | math; ``question``: the bare question;
    ``prompt``: the R1-Zero prompt; ``solution``: a worked ``<think>...</think> <answer>...</answer>`` (None when the
    source has no worked solution)."""

    id: str
    task: str
    question: str
    prompt: str
    solution: str | None
    answer: str | None = None
    numbers: tuple[int, ...] | None = None
    target: int | None = None

    def reward_fields(self) -> dict[str, Any]:
        """Keyword fields for a reward: ``reward(p.prompt, completion, **p.reward_fields())``."""
        if self.numbers is not None:
            return {"numbers": self.numbers, "target": self.target}
        return {"answer": self.answer}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_heldout(problem_id: str) -> bool:
    """Whether the generated problem with this id belongs to the held-out split (a salted hash of the id)."""
    h = int.from_bytes(hashlib.sha256(("nanoseek-rl-split:" + problem_id).encode()).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2**64


def _make(task: str, key: str, question: str, solution: str | None, **fields: Any) -> Problem:
    pid = f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return Problem(id=pid, task=task, question=question, prompt=r1_zero_prompt(question), solution=solution, **fields)


def _think_answer(think: str, answer: str) -> str:
    return f"<think>\n{think.strip()}\n</think> <answer>{answer}</answer>"


def _span(x: int | tuple[int, int], name: str) -> tuple[int, int]:
    lo, hi = (x, x) if isinstance(x, int) else x
    if not 1 <= lo <= hi:
        raise ConfigError(f"{name} must be an integer >= 1 or a range lo,hi with 1 <= lo <= hi, got {x!r}")
    return lo, hi


# ---------------------------------------------------------------------------------------------------- arithmetic
def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _reduce_steps(tokens: list) -> tuple[int, list[str]]:
    """Evaluate ``[n, op, n, op, n ...]`` with * and / first then + and -, left to right; the worked steps."""
    steps = []
    for group in ("*/", "+-"):
        i = 1
        while i < len(tokens):
            op = tokens[i]
            if op not in group:
                i += 2
                continue
            a, b = tokens[i - 1], tokens[i + 1]
            v = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op]
            assert v == int(v), "generator produced an inexact division"
            tokens[i - 1 : i + 2] = [int(v)]
            rest = " ".join(map(str, tokens))
            steps.append(f"{a} {op} {b} = {int(v)}" + (f", leaving {rest}." if len(tokens) > 1 else "."))
    return tokens[0], steps


def arithmetic_problem(
    rng: random.Random, digits: int | tuple[int, int] = 2, n_operands: int | tuple[int, int] = 2, ops: str = "+-*",
) -> Problem:
    """An integer expression like ``47 + 18 * 3``. Knobs: ``digits`` per operand (int or inclusive range),
    ``n_operands`` (int or range), ``ops`` (subset of ``+-*/``). Usual precedence; divisions are exact (a dividend
    is a multiple of its divisors, so it may have more digits than ``digits``); the answer can be negative."""
    if not ops or set(ops) - set("+-*/"):
        raise ConfigError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
    dg, n = _span(digits, "digits"), rng.randint(*_span(n_operands, "n_operands"))
    nums = [_operand(rng, dg) for _ in range(n)]
    opers = [rng.choice(ops) for _ in range(n - 1)]
    start = 0  # first operand of the current * / run: multiply it by each divisor of the run
    for i, op in enumerate(opers):
        if op in "+-":
            start = i + 1
        elif op == "/":
            nums[start] *= nums[i + 1]
    tokens: list = [nums[0]]
    for op, x in zip(opers, nums[1:], strict=True):
        tokens += [op, x]
    expr = " ".join(map(str, tokens))
    value, steps = _reduce_steps(list(tokens))
    think = (f"We need {expr}. Multiplication and division come before addition and subtraction, "
             "and operations of the same level go left to right.\n" + "\n".join(steps) + f"\nSo {expr} = {value}.")
    return _make("arithmetic", expr, f"Compute {expr}", _think_answer(think, str(value)), answer=str(value))


# ----------------------------------------------------------------------------------------------------- countdown
def countdown_problem(
    rng: random.Random, n_numbers: int | tuple[int, int] = (3, 4), max_number: int = 99,
    target_range: tuple[int, int] = (1, 100), ops: str = "+-*/", max_tries: int = 1000,
) -> Problem:
    """A TinyZero Countdown problem: reach the target from 3-4 numbers with + - * /, each number used exactly once.
    Solvable by construction: the target is the value of a random expression over the numbers whose intermediate
    results are positive integers (the worked solution). Knobs: ``n_numbers``, ``max_number`` (numbers in
    1..max_number), ``target_range``, ``ops``."""
    if not ops or set(ops) - set("+-*/"):
        raise ConfigError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
    lo_n, hi_n = _span(n_numbers, "n_numbers")
    if max_number < 1:
        raise ConfigError(f"max_number must be a positive integer, got {max_number!r}")
    if not target_range[0] <= target_range[1]:
        raise ConfigError(f"target_range must be lo,hi with lo <= hi, got {target_range!r}")
    for _ in range(max_tries):
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(lo_n, hi_n))]
        pool = [(x, str(x), True) for x in numbers]  # (value, expression, is a bare number)
        steps = []
        while len(pool) > 1:
            (a, ea, la), (b, eb, lb) = [pool.pop(rng.randrange(len(pool))) for _ in range(2)]
            choices = [op for op in ops
                       if op in "+*" or (op == "-" and a != b) or (op == "/" and (a % b == 0 or b % a == 0))]
            if not choices:
                break
            op = rng.choice(choices)
            if (op == "-" and a < b) or (op == "/" and a % b != 0):
                (a, ea, la), (b, eb, lb) = (b, eb, lb), (a, ea, la)
            v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            steps.append(f"{a} {op} {b} = {v}")
            pool.append((v, f"{ea if la else f'({ea})'} {op} {eb if lb else f'({eb})'}", False))
        if len(pool) != 1 or not target_range[0] <= pool[0][0] <= target_range[1]:
            continue
        target, expr = pool[0][0], pool[0][1]
        question = (f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
                    "arithmetic operations (+, -, *, /) and each number must be used exactly once. Put only the "
                    "expression in the answer, for example <answer> (1 + 2) / 3 </answer>")
        think = (f"We must reach {target} using each of {numbers} once.\n" + "\n".join(steps)
                 + f"\nThat uses every number exactly once: {expr} = {target}.")
        key = f"{sorted(numbers)}->{target}"
        return _make("countdown", key, question, _think_answer(think, expr), numbers=tuple(numbers), target=target)
    raise ConfigError("could not build a Countdown problem with these knobs; widen target_range or max_number")


GENERATORS: dict[str, Callable[..., Problem]] = {"arithmetic": arithmetic_problem, "countdown": countdown_problem}


def task_knobs(task: str) -> dict[str, Any]:
    """The difficulty knobs of generator ``task`` and their annotations (its keyword parameters after ``rng``)."""
    if task not in GENERATORS:
        raise ConfigError(f"task must be one of {', '.join(GENERATORS)}, got {task!r}")
    hints = type_hints(GENERATORS[task])
    return {name: hints[name] for name in list(inspect.signature(GENERATORS[task]).parameters)[1:]}


def check_knobs(task: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """``knobs`` checked against generator ``task``: a known task, known knob names, values of the knob's type (text,
    as from ``--knob digits=1,2``, is parsed by it), and values the generator accepts (one problem is built).
    Raises a one-line ConfigError naming the task or the knob."""
    allowed = task_knobs(task)
    out = {}
    for name, value in knobs.items():
        if name not in allowed:
            raise unknown_key(name, allowed, f"{task} knob")
        tp = allowed[name]
        out[name] = parse_value(name, tp, value) if isinstance(value, str) and tp is not str else (
            check_value(name, tp, value))
    GENERATORS[task](random.Random(0), **out)
    return out


def generate(
    task: str, n: int | None = None, *, seed: int = 0, split: Literal["train", "test"] = "train", **knobs: Any,
) -> Iterator[Problem]:
    """Deterministic stream of ``task`` problems (``GENERATORS`` name) for ``seed`` and difficulty ``knobs``;
    endless when ``n`` is None. ``split="train"`` skips held-out problems; ``split="test"`` keeps only them, without
    repeats (raises ValueError when the knobs' problem space is too small to give ``n``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    knobs = check_knobs(task, knobs)
    make = GENERATORS[task]
    rng = random.Random(seed)
    seen: set[str] = set()
    count = misses = 0
    while n is None or count < n:
        p = make(rng, **knobs)
        keep = is_heldout(p.id) == (split == "test") and (split == "train" or p.id not in seen)
        if not keep:
            misses += 1
            if split == "test" and misses > 2000 + 200 * (n or 0):
                raise ValueError(f"only {count} distinct held-out {task} problems found with {knobs}")
            continue
        seen.add(p.id)
        count += 1
        yield p


def heldout_set(task: str, n: int, seed: int = HELDOUT_SEED, **knobs: Any) -> list[Problem]:
    """A fixed held-out test set: the first ``n`` problems of the test split for ``seed`` and ``knobs``."""
    return list(generate(task, n, seed=seed, split="test", **knobs))


# ------------------------------------------------------------------------------------------------------- loaders
def _read_jsonl(path: str | Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    """(row index, row) of the first `limit` rows (all when None)."""
    return itertools.islice(enumerate(row for _, row in iter_jsonl(path)), limit)


def _clean_number(s: str) -> str:
    return s.strip().replace(",", "").removeprefix("$").rstrip(".").strip()


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a GSM8K-layout JSONL: ``question`` plus either ``answer`` = the final number (optional ``cot``
    worked solution, the DeepSeek-Math layout of ../shared/data) or the original ``answer`` = worked solution ending
    in ``#### <number>``. Calculator annotations ``<<...>>`` are removed from the solution."""
    out = []
    for i, row in _read_jsonl(path, limit):
        raw = str(row["answer"])
        cot = row.get("cot")
        if "####" in raw:
            cot, _, raw = raw.rpartition("####")
        answer = _clean_number(raw)
        solution = _think_answer(re.sub(r"<<[^>]*>>", "", cot), answer) if cot and cot.strip() else None
        question = row["question"].strip()
        pid = str(row.get("id", f"gsm8k-{i}"))
        out.append(Problem(pid, "gsm8k", question, r1_zero_prompt(question), solution, answer=answer))
    return out


def load_math(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a MATH-layout JSONL: ``problem`` and ``solution`` whose last ``\\boxed{}`` is the answer (an
    ``answer`` field, as in MATH-500, takes precedence). Rows with no answer are skipped."""
    out = []
    for i, row in _read_jsonl(path, limit):
        sol = row.get("solution")
        boxes = find_boxed(sol) if sol else []
        answer = str(row["answer"]).strip() if row.get("answer") is not None else (boxes[-1].strip() if boxes else None)
        if not answer:
            continue
        question = row["problem"].strip()
        pid = str(row.get("id", row.get("unique_id", f"math-{i}")))
        solution = _think_answer(sol, answer) if sol else None
        out.append(Problem(pid, "math", question, r1_zero_prompt(question), solution, answer=answer))
    return out


def load_jsonl(path: str | Path, limit: int | None = None) -> list[Problem]:
    """:func:`load_gsm8k` or :func:`load_math` depending on the first row's keys (``question`` / ``problem``)."""
    first = next((row for _, row in _read_jsonl(path, 1)), None)
    if first is None:
        return []
    if "question" in first:
        return load_gsm8k(path, limit)
    if "problem" in first:
        return load_math(path, limit)
    raise ValueError(f"{path}: neither GSM8K (question, answer) nor MATH (problem, solution) layout")


def sample_problems(problems: Sequence[Problem], n: int, seed: int = 0) -> list[Problem]:
    """A seeded sample of ``n`` problems (all of them when n >= len)."""
    return random.Random(seed).sample(list(problems), min(n, len(problems)))
