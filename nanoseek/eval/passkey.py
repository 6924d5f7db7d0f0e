"""Passkey retrieval (needle in a haystack): a 5-digit key hidden at a given depth of filler text of a given
length, asked for at the end (the test of Mohtashami & Jaggi 2023; DeepSeek-V3 §4.3 shows the same kind of
heat-map up to 128K after its YaRN extension).

Two scores per (length, depth) cell: `accuracy` (the greedy continuation starts with the key) and `choice` (the
key's log-likelihood beats four random keys': chance 20%, so a model too small to generate the key still shows
whether it attends to it). `heatmap` draws the cells as V3's figure does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import TaskError

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n")
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    length: int  # target prompt length in tokens
    depth: float  # where the needle sits in the filler: 0 = start, 1 = end
    key: str
    distractors: tuple[str, ...]
    prompt: str
    n_tokens: int  # the prompt's actual length


def build_prompt(key: str, n_filler: int, depth: float) -> str:
    """The needle after round(depth * n_filler) of the n_filler filler sentences."""
    filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    at = round(depth * n_filler)
    sep = "" if at == 0 or filler[at - 1].endswith("\n") else "\n"
    return PREFIX + "".join(filler[:at]) + sep + NEEDLE.format(key=key) + "".join(filler[at:]) + QUESTION


def make_cases(count_tokens, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0
               ) -> list[PasskeyCase]:
    """`trials` cases per (length, depth): prompts of at most `length` tokens (as counted by `count_tokens`)."""
    rng = random.Random(seed)
    base = count_tokens(build_prompt("12345", 0, 0.0))
    per = max(1, count_tokens(build_prompt("12345", 50, 0.0)) - base) / 50  # tokens per filler sentence
    cases = []
    for length in lengths:
        if length <= base:
            raise TaskError(f"passkey length {length} is shorter than the prompt without filler ({base} tokens)")
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise TaskError(f"passkey depth must be in [0, 1], got {depth}")
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                distractors = tuple(str(rng.randint(10000, 99999)) for _ in range(4))
                n = max(0, int((length - base) / per))
                prompt = build_prompt(key, n, depth)
                n_tokens = count_tokens(prompt)
                while n > 0 and n_tokens > length:
                    n -= 1
                    prompt = build_prompt(key, n, depth)
                    n_tokens = count_tokens(prompt)
                cases.append(PasskeyCase(length, depth, key, distractors, prompt, n_tokens))
    return cases


def summarize(cases: Sequence[PasskeyCase], correct: Sequence[bool], choice_ok: Sequence[bool]) -> dict[str, Any]:
    """Accuracy (`correct`: the greedy answer starts with the key) and choice accuracy, overall and per (length,
    depth) cell."""
    cells: dict[tuple[int, float], list[tuple[bool, bool]]] = {}
    for c, ok, chosen in zip(cases, correct, choice_ok, strict=True):
        cells.setdefault((c.length, c.depth), []).append((ok, chosen))
    grid = [{"length": L, "depth": d, "accuracy": sum(a for a, _ in v) / len(v),
             "choice": sum(b for _, b in v) / len(v), "n": len(v)} for (L, d), v in sorted(cells.items())]
    n = len(cases)
    return {"accuracy": sum(correct) / n, "choice": sum(choice_ok) / n, "chance": 0.2, "n": n, "grid": grid}


def heatmap(grid: list[dict[str, Any]], path: str | Path, key: str = "accuracy", title: str = "") -> Path:
    """Context length (x) by needle depth (y), coloured by `key` (0 red .. 1 green), as V3 Figure 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({g["length"] for g in grid})
    depths = sorted({g["depth"] for g in grid})
    val = {(g["length"], g["depth"]): g[key] for g in grid}
    data = [[val.get((L, d), float("nan")) for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"passkey retrieval: {key}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
