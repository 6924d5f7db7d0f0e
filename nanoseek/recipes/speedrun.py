"""`nanoseek speedrun`: tokenizer -> corpus -> pre-training of a DeepSeek-V3-style model -> report, on one machine.

The pre-training is time-budgeted (nanoseek.train.loop.TimeBudget): its schedules (V3 §4.2: LR warm-up / constant /
cosine / tails, the batch ramp, the MTP-lambda switch, the bias freeze) follow the fraction of the budget spent, and it
stops when the next step would not fit. The number of steps is whatever the machine manages: a machine busy for the
first minutes slows the first steps, it does not shorten the run. `--steps N` makes it a step-driven run instead.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import Tokenizer, prepare_corpus
from ..eval.fim import fim_exact_match
from ..infer.sample import generate_simple
from ..model import preset
from ..model.stats import model_stats
from ..train.config import TrainConfig, apply_overrides
from ..train.loop import TimeBudget
from ..train.trainer import Trainer
from .posttrain import GRPO_MINUTES, SFT_STEPS, TEACHER_SLIP
from .posttrain import post_train as run_post_train

STAGE_DIRS = ("data", "pretrain", "post")  # what a speedrun writes under its --out (besides report.md, summary.json)
REPORT_SECONDS = 75  # kept out of the pre-training budget for the evaluation and the report
MIN_BUDGET_SECONDS = 30.0
STEP_CAP = 10**9  # a time-budgeted run's steps are capped only by its budget


def speedrun(
    out: Path = Path("runs/speedrun"), preset_name: str = "tiny", minutes: float = 10.0,
    sources: list[str] | None = None, max_chars: int | None = 12_000_000, steps: int | None = None,
    sets: list[str] | None = None, seed: int = 0, fim_cases: int = 100, post_train: bool = True,
    sft_steps: int = SFT_STEPS, grpo_minutes: float = GRPO_MINUTES, post_eval_n: int = 200, overwrite: bool = False,
    teacher_slip: float = TEACHER_SLIP,
) -> dict[str, Any]:
    """`minutes` budgets the pre-training; the post-training stages (SFT on teacher traces, then GRPO for
    `grpo_minutes`, see nanoseek.recipes.posttrain) come after it unless `post_train=False`. An `out` that holds
    an earlier speedrun is refused unless `overwrite` (which removes that run's stages first)."""
    t_start = time.perf_counter()
    if not 0.0 <= teacher_slip <= 1.0:  # checked before the pre-training, not after it
        raise ConfigError(f"teacher_slip must be in [0, 1], got {teacher_slip}")
    out = Path(out)
    earlier = [out / d for d in STAGE_DIRS if (out / d).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"{out} holds an earlier speedrun ({', '.join(d.name for d in earlier)}/): pass "
                          f"--overwrite to replace it, or a fresh --out")
    for d in earlier:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = preset(preset_name)
    # gamma 0.01: the paper's 0.001 is for 14.8T tokens; a few hundred steps need a faster bias (docs/balancing.md)
    train_cfg = TrainConfig(seed=seed, bias_update_speed=0.01)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, list(sets or []))
    print(f"[1/4] corpus and tokenizer (vocab {model_cfg.vocab_size})")
    data_dir = out / "data"
    info = prepare_corpus(sources, data_dir, vocab_size=model_cfg.vocab_size, seed=seed, max_chars=max_chars)
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    if tok.vocab_size != model_cfg.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    budget: TimeBudget | None = None
    if steps is None:
        seconds = minutes * 60 - (time.perf_counter() - t_start) - REPORT_SECONDS
        if seconds < MIN_BUDGET_SECONDS:
            print(f"[2/4] {seconds:.0f} s left for pre-training; taking {MIN_BUDGET_SECONDS:.0f} s")
            seconds = MIN_BUDGET_SECONDS
        # held-out evaluation every 10% of the budget, a checkpoint every 25%
        budget = TimeBudget(seconds, eval_every=0.1, ckpt_every=0.25)
        train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), "steps": STEP_CAP})
        print(f"[2/4] a {seconds / 60:.1f}-minute budget for pre-training: the schedules follow the time spent")
        plan = f"for {seconds / 60:.1f} minutes"
    else:
        train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), "steps": steps,
                                           "eval_every": max(1, steps // 10), "ckpt_every": max(1, steps // 4)})
        plan = f"for {steps} steps"
    print(f"[3/4] pre-training {preset_name} ({model_stats(model_cfg).total_params / 1e6:.1f}M params) {plan}")
    trainer = Trainer(model_cfg, train_cfg, data_dir, out / "pretrain", budget=budget)
    result = trainer.run()
    model = trainer.model.eval()
    print("[4/4] evaluation and report")
    docs = [json.loads(line)["text"] for line in (data_dir / "val_docs.jsonl").read_text().splitlines() if line]
    fim = fim_exact_match(model, tok, docs, n=fim_cases, seed=seed)
    samples = []
    for doc in docs[:4]:
        prompt_text = "\n".join(doc.splitlines()[:3]) + "\n"
        gen = generate_simple(model, tok.encode(prompt_text), 48, stop_ids={tok.eos_id})
        samples.append((prompt_text, tok.decode(gen)))
    train_recs = [r for r in result.history if r.get("kind") == "train"]
    summary = {
        "preset": preset_name, "params": model_stats(model_cfg).total_params, "steps": result.steps_done,
        "budget_seconds": round(budget.seconds, 1) if budget is not None else None,
        "tokens": sum(r["tokens"] for r in train_recs), "train_seconds": round(result.seconds, 1),
        "tokens_per_s": round(sum(r["tokens"] for r in train_recs) / max(result.seconds, 1e-9)),
        "final_train_loss": train_recs[-1]["main_loss"] if train_recs else None,
        "heldout_loss": result.final_heldout_loss, "fim_exact_match": fim.exact_match, "fim_cases": fim.n,
        "final_maxvio_batch": train_recs[-1]["maxvio_batch"] if train_recs else None,
        "total_seconds": round(time.perf_counter() - t_start, 1), "corpus": info.get("stats", {}),
        "device": str(trainer.device), "torch": torch.__version__,
    }
    if post_train:
        from ..io.paths import resolve_checkpoint

        print(f"[post] SFT on teacher traces ({sft_steps} steps), then GRPO ({grpo_minutes:g} minutes)")
        summary["post"] = run_post_train(out / "post", resolve_checkpoint(out / "pretrain"), tok, sft_steps,
                                         grpo_minutes, seed, eval_n=post_eval_n,
                                         heldout_text=data_dir / "val_docs.jsonl", teacher_slip=teacher_slip)
        summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_report(out, summary, fim, samples)
    print(f"report: {out / 'report.md'}")
    return summary


def _write_report(out: Path, s: dict[str, Any], fim, samples: list[tuple[str, str]]) -> None:
    lines = [
        "# nanoseek speedrun",
        "",
        f"Pre-trained the `{s['preset']}` DeepSeek-V3-style model ({s['params'] / 1e6:.2f}M parameters, MLA + "
        f"DeepSeekMoE + MTP, auxiliary-loss-free balancing) on {s['device']} with torch {s['torch']}.",
        "",
        "| what | value |",
        "|---|---|",
        f"| optimizer steps | {s['steps']} |",
        f"| training tokens | {s['tokens']:,} |",
        f"| training time | {s['train_seconds']} s ({s['tokens_per_s']:,} tokens/s) |",
        *([f"| pre-training budget | {s['budget_seconds']} s (schedules follow the time spent) |"]
          if s.get("budget_seconds") else []),
        f"| final train loss (main) | {s['final_train_loss']:.4f} |",
        f"| held-out loss | {s['heldout_loss']:.4f} (perplexity {2.718281828 ** s['heldout_loss']:.1f}) |",
        f"| FIM exact match (held-out lines) | {100 * s['fim_exact_match']:.1f}% of {s['fim_cases']} |",
        f"| MaxVio (last batch) | {s['final_maxvio_batch']:.3f} |",
        f"| whole run | {s['total_seconds']} s |",
        "",
        "![losses](pretrain/loss.png)",
        "",
        "Expert load over training (share of routed tokens per expert, each MoE layer):",
        "",
        "![expert load](pretrain/expert_load.png)",
        "",
        "## FIM examples (hidden line vs. generated)",
        "",
    ]
    for ex in fim.examples:
        lines += [f"- {'✓' if ex['match'] == 'True' else '✗'} `{ex['middle'].strip()}` → `{ex['generated'].strip()}`"]
    lines += ["", "## Sample completions (greedy, 48 tokens)", ""]
    for prompt, gen in samples:
        lines += ["```python", prompt + gen, "```", ""]
    p = s.get("post")
    if p:
        lines += [
            "## Post-training: SFT on teacher traces, then GRPO", "",
            f"Task: {p['task']} (chained one-digit + / −), answers checked by rule; held-out accuracy on "
            f"{p['heldout_n']} problems, greedy.", "",
            f"The teacher program's traces are {100 * p['teacher_accuracy']:.1f}% right: it drops the minus sign of "
            f"a negative step result with probability {p['teacher_slip']:g} (a fallible teacher, as a distilled one "
            "is). SFT learns the task and the slip; GRPO's rule-based reward checks the answer, not the trace.", "",
            "Evaluation table (`nanoseek.eval`, the code behind `nanoseek eval`): greedy held-out accuracy, and "
            "bits per byte on held-out pre-training text (lower is better; post-training trades some of it away).",
            "", "| stage | held-out accuracy | held-out text BPB |", "|---|---|---|",
            *[f"| {label} | {100 * p['eval'][key]['accuracy']:.1f}% | "
              f"{p['eval'][key]['bpb']:.3f} ({p['eval'][key]['bpb_docs']} docs) |"
              if "bpb" in p["eval"][key] else f"| {label} | {100 * p['eval'][key]['accuracy']:.1f}% | |"
              for key, label in (("pre-trained", "pre-trained"), ("sft", f"after SFT ({p['sft_steps']} steps)"),
                                 ("grpo", f"after GRPO ({p['grpo_steps']} steps, {p['grpo_seconds']:.0f} s)"))],
            "", "![SFT loss](post/sft/loss.png)", "", "Reward, held-out accuracy and completion length during GRPO:",
            "", "![GRPO](post/grpo/grpo.png)", "",
        ]
    (out / "report.md").write_text("\n".join(lines))
