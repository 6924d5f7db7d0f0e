"""GRPO (DeepSeekMath / R1): sample G completions per question with the inference engine, score them with rule-based
rewards, normalise rewards within each group, and take clipped policy-gradient steps with a k3 KL to a reference.

    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(task="arithmetic", task_knobs={"digits": 1}), out_dir)
    trainer.run()

One step: questions_per_step problems x group_size rollouts (KV cache, batched, temperature sampling, seeded per
step so a resumed run draws the same samples) -> rewards -> advantages A_i = (r_i - mean) / std per group ->
old log-probs (pi_old = the policy that sampled) and reference log-probs -> mu optimisation passes over the batch
-> metrics (reward, accuracy, format rate, length, KL, clip fraction, entropy) to metrics.jsonl. The reference is
refreshed from the policy every ref_refresh_every steps. Checkpoints hold the policy, optimizer, RNG and reference.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..infer.chat import encode_chat
from ..infer.engine import Engine, SamplingParams
from ..model import Transformer
from ..train.checkpoint import load_latest, restore_optimizer, save_training_checkpoint, set_rng_state
from ..train.metrics import MetricsLog, read_metrics
from .grpo_loss import all_equal_fraction, group_advantages, grpo_loss
from .rewards import accuracy_reward, countdown_reward, format_reward
from .tasks import Problem, generate, heldout_set


@dataclass
class GRPOConfig:
    """Defaults are sized for a tiny model on a CPU; R1-Zero used lr 3e-6, beta 0.001, G 16, 32 questions."""

    task: str = "arithmetic"  # a nanoseek.rl.GENERATORS name
    task_knobs: dict[str, Any] = field(default_factory=dict)  # e.g. {"digits": 1, "n_operands": 2}
    template: str = "chat"  # "chat": the question as a user turn; "r1-zero": the R1-Zero prompt as plain text
    steps: int = 50
    questions_per_step: int = 8
    group_size: int = 8
    mu: int = 1  # optimisation passes per sampled batch (mu = 1: ratio is 1, clipping inactive)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0  # KL weight (R1-Zero: 0.001)
    eps_low: float = 0.2
    eps_high: float | None = None  # DAPO: 0.28
    aggregation: str = "grpo"  # grpo | dapo | dr_grpo
    scale_std: bool = True  # Dr. GRPO: False
    format_weight: float = 0.1  # reward = accuracy + format_weight * format
    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int = 48
    micro_batch: int = 32  # sequences per forward/backward
    ref_refresh_every: int = 400
    eval_every: int = 10
    eval_n: int = 200
    ckpt_every: int = 25
    keep_last: int = 2
    seed: int = 0
    max_minutes: float | None = None  # wall-clock budget for training steps (evaluation excluded); then stop

    def __post_init__(self) -> None:
        if self.aggregation not in ("grpo", "dapo", "dr_grpo"):
            raise ValueError(f"aggregation must be grpo, dapo or dr_grpo, got {self.aggregation!r}")
        if self.template not in ("chat", "r1-zero"):
            raise ValueError(f"template must be 'chat' or 'r1-zero', got {self.template!r}")
        for name in ("steps", "questions_per_step", "group_size", "mu", "max_new_tokens", "micro_batch",
                     "eval_every", "eval_n", "ckpt_every", "ref_refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative within a group)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def problem_prompt(problem: Problem, tokenizer: Any, template: str) -> list[int]:
    if template == "r1-zero":
        return [tokenizer.bos_id] + tokenizer.encode(problem.prompt, allow_special=False)
    return encode_chat([{"role": "user", "content": problem.question}], tokenizer)  # type: ignore[return-value]


def score(problem: Problem, completion: str, format_weight: float) -> tuple[float, float, float]:
    """(reward, correct 0/1, well-formatted 0/1) of one completion."""
    fields = problem.reward_fields()
    if problem.task == "countdown":
        acc = float(countdown_reward("", completion, **fields) == 1.0)
    else:
        acc = accuracy_reward("", completion, **fields)
    fmt = format_reward("", completion)
    return acc + format_weight * fmt, acc, fmt


class GRPOTrainer:
    def __init__(self, model: Transformer, tokenizer: Any, cfg: GRPOConfig, out_dir: str | Path,
                 resume: bool = False, progress: bool = True, reward_fn: Callable[..., float] | None = None) -> None:
        """reward_fn: a reward `(prompt, completion, **problem fields) -> float` replacing the task's default
        (accuracy + format_weight * format); accuracy and format rate are still reported."""
        self.cfg, self.tok, self.progress, self.reward_fn = cfg, tokenizer, progress, reward_fn
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.step = 0
        torch.manual_seed(cfg.seed)
        resumed = load_latest(self.ckpt_root) if resume else None
        if resumed is not None:
            path, model, opt_tensors, state, rng = resumed
        self.model = model.eval()  # eval mode throughout: no balance loss; gradients still flow
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                           weight_decay=cfg.weight_decay)
        self.ref = copy.deepcopy(self.model).requires_grad_(False) if cfg.beta > 0 else None
        if resumed is not None:
            restore_optimizer(self.optimizer, opt_tensors, state["optimizer"])
            set_rng_state(rng, state["rng"])
            self.step = state["step"]
            if self.ref is not None and (path / "ref.safetensors").exists():
                self.ref.load_state_dict(load_file(path / "ref.safetensors"))
            if progress:
                print(f"resumed from {path} at step {self.step}")
        n_per_step = cfg.questions_per_step
        self.problems = generate(cfg.task, seed=cfg.seed, split="train", **cfg.task_knobs)
        for _ in itertools.islice(self.problems, self.step * n_per_step):  # the problems earlier steps used
            pass
        self.heldout = heldout_set(cfg.task, cfg.eval_n, **cfg.task_knobs)
        max_prompt = max(len(problem_prompt(p, tokenizer, cfg.template)) for p in self.heldout)
        self.max_len = max_prompt + 32 + cfg.max_new_tokens
        self.engine = Engine(self.model, tokenizer, max_batch=min(64, n_per_step * cfg.group_size),
                             max_len=self.max_len)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resumed else None)
        (self.out / "grpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self._stop = False

    # ---- rollouts and log-probs ------------------------------------------------------------------
    def rollout(self, problems: list[Problem], n: int, params: SamplingParams, seed: int | None) -> list[list]:
        """n completions per problem: [(prompt ids, completion ids incl. a final EOS if it stopped, text)]."""
        prompts = [problem_prompt(p, self.tok, self.cfg.template) for p in problems]
        groups = self.engine.generate_groups(prompts, n, params, seed)
        return [(prompt, list(r.output_ids) + ([self.tok.eos_id] if r.finish_reason == "stop" else []), r.text)
                for prompt, group in zip(prompts, groups, strict=True) for r in group]

    def token_logp(self, model: Transformer, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
        """log pi(completion token) [N, Lc], entropy [N, Lc] and mask [N, Lc] (right-padded)."""
        L = max(len(p) + len(c) for p, c in seqs)
        Lc = max(len(c) for _, c in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        pos = torch.zeros(len(seqs), Lc, dtype=torch.long)  # index of the logit that predicts completion token t
        tgt = torch.zeros(len(seqs), Lc, dtype=torch.long)
        mask = torch.zeros(len(seqs), Lc)
        for i, (p, c) in enumerate(seqs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            tgt[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        logits = model(ids).logits.float()
        logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [N, Lc, V]
        logp_all = F.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, tgt[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        return logp, entropy, mask

    # ---- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.time()
        problems = list(itertools.islice(self.problems, cfg.questions_per_step))
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        rolls = self.rollout(problems, cfg.group_size, params, seed=cfg.seed * 100_003 + self.step)
        scored = [score(problems[k // cfg.group_size], text, cfg.format_weight) for k, (_, _, text) in enumerate(rolls)]
        if self.reward_fn is not None:
            rewards = torch.tensor([float(self.reward_fn(problems[k // cfg.group_size].prompt, text,
                                                         **problems[k // cfg.group_size].reward_fields()))
                                    for k, (_, _, text) in enumerate(rolls)])
        else:
            rewards = torch.tensor([s[0] for s in scored])
        adv = group_advantages(rewards, cfg.group_size, scale_std=cfg.scale_std)
        seqs = [(p, c if c else [self.tok.eos_id]) for p, c, _ in rolls]  # an empty completion still has a token
        N = len(seqs)
        with torch.no_grad():
            old, ref, ent = [], [], []
            for a in range(0, N, cfg.micro_batch):
                lp, e, m = self.token_logp(self.model, seqs[a : a + cfg.micro_batch])
                old.append(lp)
                ent.append((e * m).sum() / m.sum())
                if self.ref is not None:
                    ref.append(self.token_logp(self.ref, seqs[a : a + cfg.micro_batch])[0])
        active = sum(len(c) for _, c in seqs)
        stats: dict[str, float] = {}
        for _ in range(cfg.mu):
            self.optimizer.zero_grad(set_to_none=True)
            for k, a in enumerate(range(0, N, cfg.micro_batch)):
                chunk = seqs[a : a + cfg.micro_batch]
                lp, _, m = self.token_logp(self.model, chunk)
                loss, st = grpo_loss(
                    lp, old[k], ref[k] if ref else None, adv[a : a + len(chunk)], m, beta=cfg.beta,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,  # type: ignore[arg-type]
                    max_len=cfg.max_new_tokens,
                )
                # the aggregation's normaliser over the whole batch: sequences (grpo, dr_grpo) or tokens (dapo)
                w = m.sum().item() / active if cfg.aggregation == "dapo" else len(chunk) / N
                (loss * w).backward()
                for key, v in st.items():
                    stats[key] = stats.get(key, 0.0) + v * w / cfg.mu
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        if self.ref is not None and self.step % cfg.ref_refresh_every == 0:
            self.ref.load_state_dict(self.model.state_dict())
        lengths = torch.tensor([float(len(c)) for _, c, _ in rolls])
        return {
            "kind": "train", "step": self.step, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(), "accuracy": sum(s[1] for s in scored) / N,
            "format_rate": sum(s[2] for s in scored) / N, "completion_len": lengths.mean().item(),
            "entropy": torch.stack(ent).mean().item(), "all_equal_groups": all_equal_fraction(rewards, cfg.group_size),
            "grad_norm": float(gnorm), "seconds": time.time() - t0, **stats,
        }

    @torch.no_grad()
    def evaluate(self, problems: list[Problem] | None = None) -> dict[str, float]:
        """Greedy accuracy and format rate on the fixed held-out problems."""
        problems = problems if problems is not None else self.heldout
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens)
        rolls = self.rollout(problems, 1, params, seed=None)
        scored = [score(p, text, self.cfg.format_weight) for p, (_, _, text) in zip(problems, rolls, strict=True)]
        return {"kind": "eval", "step": self.step, "heldout_accuracy": sum(s[1] for s in scored) / len(scored),
                "heldout_format_rate": sum(s[2] for s in scored) / len(scored), "heldout_n": len(scored)}

    def save(self) -> Path:
        """Policy + optimizer + RNG (+ reference weights, + tokenizer.json) as one atomic checkpoint."""
        staging = self.out / ".staging"
        staging.mkdir(exist_ok=True)
        extra = []
        if hasattr(self.tok, "save"):
            self.tok.save(staging / "tokenizer.json")
            extra.append(staging / "tokenizer.json")
        if self.ref is not None:
            save_file({k: v.contiguous() for k, v in self.ref.state_dict().items()}, staging / "ref.safetensors")
            extra.append(staging / "ref.safetensors")
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer,
                                        {"grpo_config": self.cfg.to_dict()}, self.cfg.keep_last, extra_files=extra)

    def run(self) -> list[dict[str, Any]]:
        """Train to cfg.steps with held-out evaluation before the first and after every eval_every steps;
        SIGINT/SIGTERM checkpoint and stop. Returns the records of this run."""
        cfg = self.cfg
        records: list[dict[str, Any]] = []
        old = {s: signal.signal(s, lambda *_: setattr(self, "_stop", True)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.step == 0:
                records.append(self.evaluate())
                self.metrics.write(records[-1])
            bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="grpo")
            budget = float("inf") if cfg.max_minutes is None else cfg.max_minutes * 60
            spent = 0.0
            while self.step < cfg.steps and not self._stop:
                if spent >= budget:
                    records.append(self.evaluate())
                    self.metrics.write(records[-1])
                    self.save()
                    break
                rec = self.train_step()
                spent += rec["seconds"]
                self.metrics.write(rec)
                records.append(rec)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.2f}")
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    records.append(self.evaluate())
                    self.metrics.write(records[-1])
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or self._stop:
                    self.save()
            bar.close()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        plot_grpo(read_metrics(self.out / "metrics.jsonl"), self.out / "grpo.png")
        return records


def plot_grpo(records: list[dict[str, Any]], out: Path) -> Path:
    """Reward, held-out accuracy and completion length against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    steps = [r["step"] for r in tr]
    w = max(1, len(tr) // 40)  # moving average over ~1/40 of the run (the faint line is the raw per-step value)

    def smooth(xs: list[float]) -> list[float]:
        return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for a, key, label in ((ax[0], "reward_mean", "reward (mean)"), (ax[0], "accuracy", "train accuracy"),
                          (ax[2], "completion_len", "completion length (tokens)")):
        vals = [r[key] for r in tr]
        line = a.plot(steps, vals, alpha=0.25)[0]
        a.plot(steps, smooth(vals), color=line.get_color(), label=label)
    ax[1].plot([r["step"] for r in ev], [r["heldout_accuracy"] for r in ev], "o-", label="held-out accuracy")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
