"""Fill-in-the-Middle exact match on held-out code: hide one line, ask for it in PSM form, compare."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..infer.sample import generate_simple
from ..model import Transformer


@dataclass
class FimResult:
    exact_match: float
    n: int
    examples: list[dict[str, str]]


def make_fim_cases(docs: list[str], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) with the middle one non-blank line (newline included) of a held-out document."""
    rng = random.Random(seed)
    cases = []
    for doc in docs:
        lines = doc.splitlines(keepends=True)
        cand = [i for i, line in enumerate(lines) if 1 <= i < len(lines) - 1 and 3 <= len(line.strip()) <= 60]
        if not cand:
            continue
        i = rng.choice(cand)
        cases.append(("".join(lines[:i]), lines[i], "".join(lines[i + 1 :])))
        if len(cases) >= n:
            break
    return cases


def fim_exact_match(
    model: Transformer, tok, docs: list[str], n: int = 100, seed: int = 0, prefix_tokens: int = 96,
    suffix_tokens: int = 48, max_new_tokens: int = 24,
) -> FimResult:
    """Share of cases whose greedy middle equals the hidden line (whitespace-stripped): single-line infilling,
    so the middle ends at eos or at the first newline, whichever comes first."""
    if tok.fim_begin_id is None or tok.fim_hole_id is None or tok.fim_end_id is None:
        raise ValueError("the tokenizer has no FIM tokens")
    cases = make_fim_cases(docs, n, seed)
    hits = 0
    examples = []
    for prefix, middle, suffix in cases:
        p = tok.encode(prefix)[-prefix_tokens:]
        s = tok.encode(suffix)[:suffix_tokens]
        prompt = [tok.fim_begin_id, *p, tok.fim_hole_id, *s, tok.fim_end_id]
        gen = generate_simple(model, prompt, max_new_tokens, stop_ids={tok.eos_id})
        text = tok.decode(gen).split("\n", 1)[0]
        ok = text.strip() == middle.strip()
        hits += ok
        if len(examples) < 5:
            examples.append({"middle": middle, "generated": text, "match": str(ok)})
    return FimResult(hits / max(len(cases), 1), len(cases), examples)
