"""R1-Zero in miniature (R1 §2.2): GRPO straight from a pre-trained base model, with the R1-Zero template (R1 Table 1)
and rule-based rewards only: no SFT, no teacher traces in post-training.

RL can only reinforce answers the base model sometimes gives (pass@k > 0). DeepSeek-V3-Base had read the web's
mathematics; this base reads the Python standard library plus a share of arithmetic text written from the task's
training split (held-out problems never appear), as real pre-training corpora hold worked arithmetic. Each document
is one style: bare equations, worked solutions in prose, or question / answer transcripts with <think> / <answer>
tags, 2- and 3-operand chains alike, and (style "conversation") the same worked answers after the R1-Zero template's
preamble. docs/r1_zero.md: without the conversations the base never wrote the template's format after 8-10 minutes
of pre-training on 2 cores (every reward 0, no gradient); with them (worked by the fallible teacher) GRPO takes the
format from 4% to ~97% of samples and pass@8 from 1.5-3.5% to 35-41%.

    from nanoseek.recipes.r1zero import r1_zero
    r1_zero(Path("runs/r1zero"), minutes=10, grpo_minutes=10)

Stages: arithmetic text -> corpus (arithmetic first, then the standard library) -> the speedrun's time-budgeted
pre-training -> the base's greedy accuracy, pass@1 and pass@k under the template -> GRPO (template "r1-zero") -> the
same measurements, and what the completions look like over training (length, format, R1 §2.2.4's reflective words:
the "aha moment" searched for, reported whatever is found) in <out>/r1zero.json and <out>/report.md.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..data import Tokenizer
from ..data.prepare import STDLIB
from ..infer.engine import SamplingParams
from ..io import load_checkpoint
from ..io.paths import resolve_checkpoint
from ..rl.grpo import GRPOConfig, GRPOTrainer, score
from ..rl.tasks import Problem, generate, r1_zero_prompt
from .posttrain import TASK_KNOBS, chain_steps, teacher_trace
from .speedrun import speedrun

STYLES = ("equation", "prose", "transcript", "conversation")
PLAIN_STYLES = STYLES[:3]  # the first two studies' mix (no conversation under the R1-Zero template)
# R1 §2.2.4: the model "learns to reevaluate its initial approach"; words that would show it at this scale
REFLECTION = re.compile(r"\b(wait|check|recheck|verify|again|mistake|actually|instead|hmm)\b", re.IGNORECASE)


def arithmetic_text(problem: Problem, style: str, slip: float = 0.0, rng: random.Random | None = None) -> str:
    """One `+`/`-` chain written in a pre-training style: "5 - 8 + 8 = 5"; "Compute 5 - 8 + 8. 5 - 8 = -3. -3 + 8 =
    5. The answer is 5."; a "User: ... Assistant: <think>...</think> <answer>...</answer>" transcript; or the same
    worked answer after the R1-Zero template's conversation preamble (a conversation in that format, as the web now
    holds many). `slip`: transcripts and conversations are worked by the fallible teacher (posttrain.chain_steps),
    as text written by people has errors."""
    if style == "equation":
        return f"{problem.question.removeprefix('Compute ')} = {chain_steps(problem)[1]}"
    if style == "prose":
        steps, value = chain_steps(problem)
        return f"{problem.question}. {'. '.join(steps)}. The answer is {value}."
    if style == "transcript":
        return f"User: {problem.question}. Assistant: {teacher_trace(problem, slip, rng)}"
    if style == "conversation":
        return f"{r1_zero_prompt(problem.question)} {teacher_trace(problem, slip, rng)}"
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def arithmetic_documents(n_docs: int, seed: int = 0, per_doc: int = 20, styles: tuple[str, ...] = PLAIN_STYLES,
                         slip: float = 0.0) -> list[str]:
    """`n_docs` documents of `per_doc` one-digit `+`/`-` chains from the task's training split, `styles` in turn,
    2- or 3-operand chains (one length per document); `slip`: see arithmetic_text."""
    rng = random.Random(seed)
    streams = {k: generate("arithmetic", None, seed=seed + k, split="train", **{**TASK_KNOBS, "n_operands": k})
               for k in (2, 3)}
    docs = []
    for i in range(n_docs):
        style = styles[i % len(styles)]
        k = rng.choice((2, 3))
        problems = [next(streams[k]) for _ in range(per_doc)]
        docs.append(("\n" if style == "equation" else "\n\n").join(arithmetic_text(p, style, slip, rng)
                                                                   for p in problems))
    return docs


def write_arithmetic_corpus(path: Path, n_docs: int, seed: int = 0, styles: tuple[str, ...] = PLAIN_STYLES,
                            slip: float = 0.0) -> Path:
    """The documents as a JSONL corpus source ({"text": ...} per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = arithmetic_documents(n_docs, seed, styles=styles, slip=slip)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@torch.no_grad()
def sampled_pass(trainer: GRPOTrainer, k: int, seed: int = 0) -> dict[str, float]:
    """pass@1 and pass@k (k samples per held-out problem at the GRPO temperature) and their format rate."""
    cfg = trainer.cfg
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    rolls = trainer.sample(trainer.heldout, k, params, seed=seed, engine=trainer.engine)
    scored = [score(trainer.heldout[i // k], r.text, cfg.format_weight) for i, r in enumerate(rolls)]
    correct = torch.tensor([s[1] for s in scored]).view(-1, k)
    return {"pass@1": correct.mean().item(), f"pass@{k}": correct.amax(1).mean().item(),
            "format_rate": sum(s[2] for s in scored) / len(scored), "k": k}


def completion_study(path: Path, windows: int = 5, examples: int = 3) -> dict[str, Any]:
    """Over the logged completions (GRPOConfig.log_completions), in `windows` spans of steps: mean length in
    characters, format and accuracy rates, the share of completions with a reflective word and the words found;
    plus the first and last `examples` completions."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no completions logged")
    last = rows[-1]["step"]
    spans = []
    for w in range(windows):
        lo, hi = w * last // windows + 1, (w + 1) * last // windows
        part = [r for r in rows if lo <= r["step"] <= hi]
        if not part:
            continue
        words = [m.lower() for r in part for m in REFLECTION.findall(r["completion"])]
        spans.append({
            "steps": f"{lo}-{hi}", "n": len(part),
            "chars": sum(len(r["completion"]) for r in part) / len(part),
            "format_rate": sum(r["format"] for r in part) / len(part),
            "accuracy": sum(r["correct"] for r in part) / len(part),
            "reflective": sum(bool(REFLECTION.search(r["completion"])) for r in part) / len(part),
            "words": sorted(set(words)),
        })
    return {"spans": spans, "first": [r["completion"] for r in rows[:examples]],
            "last": [r["completion"] for r in rows[-examples:]]}


def r1_zero(out: Path, minutes: float = 10.0, grpo_minutes: float = 10.0, seed: int = 0, arithmetic_docs: int = 3000,
            lr: float = 2e-5, k: int = 8, eval_n: int = 200, base_dir: Path | None = None,
            progress: bool = True, styles: tuple[str, ...] = PLAIN_STYLES, slip: float = 0.0) -> dict[str, Any]:
    """The study: pre-training on the mix (`minutes`, the speedrun's budget; arithmetic documents in `styles`, worked
    with `slip`) into <out>/base, or the base of an earlier study (`base_dir`, e.g. to try another lr), then GRPO
    from it for `grpo_minutes` of training steps; returns (and writes to <out>/r1zero.json, <out>/report.md) the
    results."""
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be in [0, 1], got {slip}")
    if not styles or any(st not in STYLES for st in styles):
        raise ValueError(f"styles must be some of {STYLES}, got {styles!r}")
    t0 = time.perf_counter()
    out = Path(out)
    if base_dir is None:
        base_dir = out / "base"
        corpus = write_arithmetic_corpus(out / "arithmetic.jsonl", arithmetic_docs, seed, styles, slip)
        speedrun(base_dir, minutes=minutes, sources=[str(corpus), STDLIB], seed=seed, post_train=False, overwrite=True)
    base = json.loads((Path(base_dir) / "summary.json").read_text())
    tok = Tokenizer.load(Path(base_dir) / "data" / "tokenizer.json")
    model = load_checkpoint(resolve_checkpoint(Path(base_dir) / "pretrain"))
    cfg = GRPOConfig(task="arithmetic", task_knobs=dict(TASK_KNOBS), template="r1-zero", steps=100_000,
                     max_minutes=grpo_minutes, lr=lr, max_new_tokens=48, eval_every=25, eval_n=eval_n,
                     ckpt_every=100, seed=seed, log_completions=8)
    trainer = GRPOTrainer(model, tok, cfg, out / "grpo", progress=progress)
    before = sampled_pass(trainer, k, seed)
    records = trainer.run()
    after = sampled_pass(trainer, k, seed)
    evals = [r for r in records if r["kind"] == "eval"]
    result = {
        "task": "arithmetic " + json.dumps(TASK_KNOBS), "template": "r1-zero", "seed": seed,
        "corpus_styles": list(styles), "corpus_slip": slip,
        "pretrain": {key: base[key] for key in ("steps", "tokens", "heldout_loss", "train_seconds")},
        "base_dir": str(base_dir), "corpus_chars": base["corpus"].get("chars"),
        "base": {"greedy": evals[0]["heldout_accuracy"], "greedy_format": evals[0]["heldout_format_rate"], **before},
        "grpo": {"greedy": evals[-1]["heldout_accuracy"], "greedy_format": evals[-1]["heldout_format_rate"], **after},
        "curve": [(r["step"], r["heldout_accuracy"], r["heldout_format_rate"]) for r in evals],
        "grpo_steps": trainer.step, "grpo_lr": lr,
        "completions": completion_study(out / "grpo" / "completions.jsonl"),
        "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
    }
    (out / "r1zero.json").write_text(json.dumps(result, indent=1) + "\n")
    _report(out, result)
    return result


def _report(out: Path, r: dict[str, Any]) -> None:
    b, g, k = r["base"], r["grpo"], r["base"]["k"]
    lines = [
        "# R1-Zero in miniature", "",
        f"GRPO from the pre-trained base with the R1-Zero template and rule rewards only; task {r['task']}, "
        f"{r['grpo_steps']} GRPO steps at lr {r['grpo_lr']:g}, seed {r['seed']}.", "",
        f"| model | greedy accuracy | greedy format | pass@1 (T=1) | pass@{k} | sampled format |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {100 * m['greedy']:.1f}% | {100 * m['greedy_format']:.1f}% | {100 * m['pass@1']:.1f}% | "
          f"{100 * m[f'pass@{k}']:.1f}% | {100 * m['format_rate']:.1f}% |" for name, m in (("base", b), ("GRPO", g))],
        "", "Completions during GRPO (8 logged per step):", "",
        "| steps | chars | format | accuracy | with a reflective word | words |", "|---|---|---|---|---|---|",
        *[f"| {s['steps']} | {s['chars']:.0f} | {100 * s['format_rate']:.0f}% | {100 * s['accuracy']:.0f}% | "
          f"{100 * s['reflective']:.1f}% | {', '.join(s['words']) or '-'} |" for s in r["completions"]["spans"]],
        "", "![GRPO](grpo/grpo.png)", "", "First completions:", "",
        *[f"    {c!r}" for c in r["completions"]["first"]], "", "Last completions:", "",
        *[f"    {c!r}" for c in r["completions"]["last"]], "",
    ]
    (out / "report.md").write_text("\n".join(lines))
