"""Distillation by rejection sampling (R1 -> V3 style): a teacher answers every problem k times, the rule-based
verifier keeps the correct, well-formatted answers, and they become chat SFT data for a student.

Teachers: a nanoseek checkpoint (run in-process through the Engine) or any OpenAI-compatible endpoint
(`nanoseek serve`, vLLM, a hosted DeepSeek-R1, ...) through the `openai` client. Every kept trace is written as
{"messages": [user, assistant], "source": teacher, "problem_id", "sample", "reward"} (its provenance).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from ..io.atomic import atomic_open
from .grpo import score
from .tasks import Problem


class Teacher(Protocol):
    name: str

    def answer(self, questions: list[str], k: int, temperature: float, max_tokens: int, seed: int) -> list[list[str]]:
        """k completions for each question (chat: the question is the user turn)."""
        ...


class EngineTeacher:
    """A nanoseek model answering through the inference engine (batched, KV cache)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "nanoseek", max_batch: int = 32) -> None:
        from ..infer.engine import Engine

        self.name, self.tok = name, tokenizer
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_len=1024)

    def answer(self, questions: list[str], k: int, temperature: float, max_tokens: int, seed: int) -> list[list[str]]:
        from ..infer.chat import encode_chat
        from ..infer.engine import SamplingParams

        prompts = [encode_chat([{"role": "user", "content": q}], self.tok) for q in questions]
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
        return [[r.text for r in group] for group in self.engine.generate_groups(prompts, k, params, seed)]


class EndpointTeacher:
    """Any OpenAI-compatible chat endpoint (k requests per question, in a thread pool)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8) -> None:
        from openai import OpenAI

        self.name = f"{model}@{base_url}"
        self.model, self.concurrency = model, concurrency
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "-")

    def answer(self, questions: list[str], k: int, temperature: float, max_tokens: int, seed: int) -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        def ask(job: tuple[int, int]) -> str:
            i, j = job
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": questions[i]}], max_tokens=max_tokens,
                temperature=temperature, seed=seed * 1_000_003 + i * k + j)
            return r.choices[0].message.content or ""

        jobs = [(i, j) for i in range(len(questions)) for j in range(k)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(pool.map(ask, jobs))
        return [texts[i * k : (i + 1) * k] for i in range(len(questions))]


@dataclass
class DistillStats:
    problems: int = 0
    samples: int = 0
    kept: int = 0
    solved: int = 0  # problems with at least one kept answer

    @property
    def acceptance(self) -> float:
        return self.kept / self.samples if self.samples else 0.0


def distill(problems: Iterable[Problem], teacher: Teacher, out_jsonl: str | Path, k: int = 4,
            temperature: float = 0.7, max_tokens: int = 256, seed: int = 0, batch: int = 32,
            keep_per_problem: int = 1, progress: bool = True) -> DistillStats:
    """Rejection sampling: keep up to `keep_per_problem` distinct answers per problem that are correct and well
    formatted (accuracy 1 and format 1, see nanoseek.rl.grpo.score); verification runs in this (main) thread."""
    probs = list(problems)
    stats = DistillStats()
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        bar = tqdm(total=len(probs), disable=not progress, desc="distill")
        for a in range(0, len(probs), batch):
            chunk = probs[a : a + batch]
            answers = teacher.answer([p.question for p in chunk], k, temperature, max_tokens, seed + a)
            for p, texts in zip(chunk, answers, strict=True):
                kept: list[str] = []
                for j, text in enumerate(texts):
                    reward, acc, fmt = score(p, text, 0.0)
                    if acc == 1.0 and fmt == 1.0 and text not in kept and len(kept) < keep_per_problem:
                        kept.append(text)
                        f.write(json.dumps({
                            "messages": [{"role": "user", "content": p.question},
                                         {"role": "assistant", "content": text}],
                            "source": teacher.name, "problem_id": p.id, "sample": j, "reward": reward,
                        }) + "\n")
                stats.problems += 1
                stats.samples += len(texts)
                stats.kept += len(kept)
                stats.solved += bool(kept)
            bar.update(len(chunk))
            bar.set_postfix(kept=stats.kept, acceptance=f"{stats.acceptance:.2f}")
        bar.close()
    return stats
