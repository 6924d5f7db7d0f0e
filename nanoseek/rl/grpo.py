"""GRPO (DeepSeekMath / R1): sample G completions per question with the inference engine, score them with rule-based
rewards, normalise rewards within each group, and take clipped policy-gradient steps with a k3 KL to a reference.

    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(task="arithmetic", task_knobs={"digits": 1}), out_dir)
    trainer.run()

One step: questions_per_step problems x group_size rollouts (KV cache, batched, temperature sampling, seeded per
step so a resumed run draws the same samples) -> rewards -> advantages A_i = (r_i - mean) / std per group ->
old log-probs (pi_old = the policy that sampled) and reference log-probs -> mu optimisation passes over the batch
-> metrics (reward, accuracy, format rate, length, KL, clip fraction, entropy) to metrics.jsonl. The reference is
refreshed from the policy every ref_refresh_every steps. Checkpoints hold the policy, optimizer, RNG and reference.

Distributed (`parallel`, a rank of a torchrun launch): the policy that is trained is parallelized (FSDP2 / EP,
nanoseek.parallel); each rank keeps a whole copy of it for its rollouts (the engine runs in-process, without
collectives), refreshed from the trained shards after every update, and samples its share of the step's questions
with the seeds the single-process run gives them; the losses are normalised over the global batch.

The run / save / resume / signal code is the pre-training Trainer's (nanoseek.train.loop.RunLoop). With
`max_minutes` the run is time-budgeted: it stops when the next training step would exceed the budget (evaluation and
checkpoints are not counted), the progress bar shows seconds spent / budget, and a resumed run continues with the
seconds its checkpoint had left.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..infer.chat import encode_chat
from ..infer.engine import Engine, SamplingParams
from ..io.paths import TOKENIZER_FILES
from ..model import Transformer
from ..parallel import ParallelContext, parallelize
from ..train.checkpoint import load_latest, load_latest_sharded
from ..train.loop import RunLoop, TimeBudget
from ..train.metrics import MetricsLog, read_metrics
from .config import GRPOConfig
from .grpo_loss import all_equal_fraction, group_advantages, grpo_loss
from .rewards import accuracy_reward, countdown_reward, format_reward
from .tasks import Problem, generate, heldout_set


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


class GRPOTrainer(RunLoop):
    desc = "grpo"
    budget_counts_overhead = False  # max_minutes budgets the training steps; evaluation is excluded
    evaluate_first = True  # held-out accuracy before the first step

    def __init__(self, model: Transformer, tokenizer: Any, cfg: GRPOConfig, out_dir: str | Path,
                 resume: bool = False, progress: bool = True, reward_fn: Callable[..., float] | None = None,
                 parallel: ParallelContext | None = None) -> None:
        """reward_fn: a reward `(prompt, completion, **problem fields) -> float` replacing the task's default
        (accuracy + format_weight * format); accuracy and format rate are still reported."""
        self.cfg, self.tok, self.reward_fn = cfg, tokenizer, reward_fn
        self.out = Path(out_dir)
        self._init_loop(self.out, TimeBudget(cfg.max_minutes * 60) if cfg.max_minutes is not None else None,
                        progress, parallel, resume=resume)
        if cfg.questions_per_step % self.world:
            raise ConfigError(f"questions_per_step={cfg.questions_per_step} does not split over {self.world} ranks")
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        resumed = load_latest(self.ckpt_root) if resume and parallel is None else None
        if resumed is not None:
            path, model, opt_tensors, state, rng = resumed
        self.model = model.eval()  # eval mode throughout: no balance loss; gradients still flow
        # the model the engine samples with: the policy itself, or (distributed) a whole copy of it on this rank
        self.rollout_model = copy.deepcopy(self.model).requires_grad_(False) if parallel is not None else self.model
        self.ref = copy.deepcopy(self.model).requires_grad_(False) if cfg.beta > 0 else None
        if parallel is not None:
            parallelize(self.model, parallel)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                           weight_decay=cfg.weight_decay)
        if resume and parallel is not None:
            got = load_latest_sharded(self.ckpt_root, self.model, self.optimizer)
            if got is not None:
                path, state, rng = got
                self._restore_run(path, state, rng, inherit_budget=False)
                self._sync_rollout_model()
                resumed = got  # type: ignore[assignment]
        elif resumed is not None:
            # the budget is the config's (max_minutes); the seconds spent come from the checkpoint
            self._restore(path, self.optimizer, opt_tensors, state, rng, inherit_budget=False)
        if resumed is not None and self.ref is not None and (path / "ref.safetensors").exists():
            self.ref.load_state_dict(load_file(path / "ref.safetensors"))
        n_per_step = cfg.questions_per_step
        self.problems = generate(cfg.task, seed=cfg.seed, split="train", **cfg.task_knobs)
        for _ in itertools.islice(self.problems, self.step * n_per_step):  # the problems earlier steps used
            pass
        self.heldout = heldout_set(cfg.task, cfg.eval_n, **cfg.task_knobs)
        max_prompt = max(len(problem_prompt(p, tokenizer, cfg.template)) for p in self.heldout)
        self.max_len = max_prompt + 32 + cfg.max_new_tokens
        self.engine = Engine(self.rollout_model, tokenizer, max_batch=min(64, n_per_step * cfg.group_size),
                             max_len=self.max_len)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resumed else None,
                                  enabled=self.is_main)
        if self.is_main:
            (self.out / "grpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def _sync_rollout_model(self) -> None:
        """Distributed: the rollout copy takes the trained policy's weights (gathered from the shards)."""
        if self.rollout_model is not self.model:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            self.rollout_model.load_state_dict(full)

    # ---- rollouts and log-probs ------------------------------------------------------------------
    def rollout(self, problems: list[Problem], n: int, params: SamplingParams, seed: int | None,
                first: int = 0) -> list[list]:
        """n completions per problem: [(prompt ids, completion ids incl. a final EOS if it stopped, text)].
        `first`: the index of problems[0] in the step's questions (its samples' seeds)."""
        prompts = [problem_prompt(p, self.tok, self.cfg.template) for p in problems]
        groups = self.engine.generate_groups(prompts, n, params, seed, first)
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
        share = cfg.questions_per_step // self.world  # this rank's questions (all of them in one process)
        first = self.rank * share
        problems = problems[first:first + share]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        rolls = self.rollout(problems, cfg.group_size, params, seed=cfg.seed * 100_003 + self.step, first=first)
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
        # the aggregation's normaliser over the global batch (all ranks): sequences (grpo, dr_grpo) or tokens (dapo);
        # FSDP averages the ranks' gradients, so each rank's share is scaled by the world size
        n_all, active = self._sum(float(N), float(sum(len(c) for _, c in seqs)))
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
                w = (m.sum().item() / active if cfg.aggregation == "dapo" else len(chunk) / n_all) * self.world
                (loss * w).backward()
                for key, v in st.items():
                    stats[key] = stats.get(key, 0.0) + v * w / cfg.mu
            gnorm = self._clip_grads(self.model, cfg.grad_clip)
            self.optimizer.step()
        self._sync_rollout_model()
        self.step += 1
        if self.ref is not None and self.step % cfg.ref_refresh_every == 0:
            self.ref.load_state_dict(self.rollout_model.state_dict())
        lengths = torch.tensor([float(len(c)) for _, c, _ in rolls])
        entropy = torch.stack(ent).mean().item()
        if self.par is not None:  # every rank's rollouts (rank order = the single process's order)
            rewards = self.par.all_gather(rewards)
            lengths = self.par.all_gather(lengths)
            entropy = self._sum(entropy)[0] / self.world
            stats = {k: v / self.world for k, v in zip(stats, self._sum(*stats.values()), strict=True)}
        acc, fmt = self._sum(sum(s[1] for s in scored), sum(s[2] for s in scored))
        return {
            "kind": "train", "step": self.step, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(), "accuracy": acc / n_all,
            "format_rate": fmt / n_all, "completion_len": lengths.mean().item(),
            "entropy": entropy, "all_equal_groups": all_equal_fraction(rewards, cfg.group_size),
            "grad_norm": float(gnorm), "seconds": time.time() - t0, **stats,
        }

    @torch.no_grad()
    def evaluate(self, problems: list[Problem] | None = None) -> dict[str, float]:
        """Greedy accuracy and format rate on the fixed held-out problems."""
        problems = problems if problems is not None else self.heldout
        problems = problems[self.rank::self.world]  # distributed: each rank scores its share
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens)
        rolls = self.rollout(problems, 1, params, seed=None) if problems else []
        scored = [score(p, text, self.cfg.format_weight) for p, (_, _, text) in zip(problems, rolls, strict=True)]
        acc, fmt, n = self._sum(sum(s[1] for s in scored), sum(s[2] for s in scored), float(len(scored)))
        return {"kind": "eval", "step": self.step, "heldout_accuracy": acc / n, "heldout_format_rate": fmt / n,
                "heldout_n": int(n)}

    def save(self) -> Path:
        """Policy + optimizer + RNG (+ reference weights, + tokenizer.json) as one atomic checkpoint."""
        staging = self.out / ".staging"
        staging.mkdir(exist_ok=True)
        extra = []
        if hasattr(self.tok, "save"):
            if self.is_main:
                self.tok.save(staging / "tokenizer.json")  # with tokenizer_config.json beside it
            extra += [staging / f for f in TOKENIZER_FILES]
        if self.ref is not None:
            if self.is_main:
                save_file({k: v.contiguous() for k, v in self.ref.state_dict().items()}, staging / "ref.safetensors")
            extra.append(staging / "ref.safetensors")
        return self._checkpoint(self.model, self.optimizer, {"grpo_config": self.cfg.to_dict()}, self.cfg.keep_last,
                                extra_files=extra)

    def _eval_record(self) -> dict[str, Any]:
        return self.evaluate()

    def _cadence(self) -> tuple[int, int, int]:
        return self.cfg.eval_every, self.cfg.ckpt_every, self.cfg.steps

    def _postfix(self, rec: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{rec['reward_mean']:.3f}", "acc": f"{rec['accuracy']:.2f}"}

    def run(self) -> list[dict[str, Any]]:
        """Train to cfg.steps (or until max_minutes of training steps) with held-out evaluation before the first
        and after every eval_every steps; SIGINT/SIGTERM checkpoint and stop. Returns the records of this run."""
        records, _ = self._run_loop(self.cfg.steps)
        if self.is_main:
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
