"""GRPO (DeepSeekMath / R1): sample G completions per question with the inference engine, score them with rule-based
rewards, normalise rewards within each group, and take clipped policy-gradient steps with a k3 KL to a reference.

    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(task="arithmetic", task_knobs={"digits": 1}), out_dir)
    trainer.run()

One step: questions_per_step problems x group_size rollouts (KV cache, batched, temperature sampling, seeded per
step so a resumed run draws the same samples; with `prefix_cache` a question's prompt is read once per group, the
other samples starting from the first's keys and recorded experts) -> rewards -> advantages
A_i = (r_i - mean) / std per group -> reference log-probs -> mu optimisation passes over the batch -> metrics (reward,
accuracy, format rate, length, KL, clip fraction, entropy; time_rollout / time_score / time_logprob / time_train) to
metrics.jsonl. The reference is refreshed from the policy every ref_refresh_every steps. Checkpoints hold the
policy, optimizer, RNG and reference.

Rollouts and training use one model and one codebase, so their mismatch is measured every step and can be removed:
the engine reports each sampled token's log-prob and the experts every MoE layer routed each token to, and the first
optimisation pass (still the policy that sampled) compares them with its own: logprob_diff_max / _mean,
routing_disagree (tokens routed differently in some layer) and routing_disagree_decisions (token x layer).
`routing_replay` runs the training forwards with the rollout's experts (the gate weights are recomputed at them,
so the router still learns); pi_old is the first pass's own log-probs (`old_logprobs="trainer"`: the first-pass
ratio is exactly 1, no extra forward), the engine's (`"rollout"`) or a separate no-grad forward (`"recompute"`).
With a model that has MTP modules, MTP module 1 is distilled towards the main head's next-next token distribution
on the completions (`mtp_lambda`, see `_mtp_distill`) so that speculative decoding keeps accepting its drafts; the
held-out evaluation drafts with it and logs heldout_mtp_acceptance.

Distributed (`parallel`, a rank of a torchrun launch): the policy that is trained is parallelized (FSDP2 / EP,
nanoseek.parallel); each rank keeps a whole copy of it for its rollouts (the engine runs in-process, without
collectives), refreshed from the trained shards after every update, and samples its share of the step's questions
with the seeds the single-process run gives them; the losses (the MTP distillation's too: MTP module 1 is sharded
like the blocks) are normalised over the global batch, the metrics summed over the ranks.

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
from dataclasses import dataclass
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
from ..model.moe import routing_hooks
from ..parallel import ParallelContext, clip_grad_norm, parallelize
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


@dataclass
class Rollout:
    """One sampled completion: prompt and completion ids (the completion with a final EOS if it stopped), its text,
    the engine's log-probs of the completion tokens [len(completion)] and the experts its tokens were routed to
    [positions read, n_moe_layers, K] (see Request.routing)."""

    prompt: list[int]
    completion: list[int]
    text: str
    logprobs: torch.Tensor | None = None
    routing: torch.Tensor | None = None


@dataclass
class PolicyForward:
    """A training-side forward over right-padded sequences: log pi of the completion tokens, entropy and mask
    [N, Lc]; the experts used at each completion token's input position [N, Lc, n_moe_layers, K] (when recorded);
    the MTP distillation loss and the MTP/main top-1 agreement (when asked)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    routing: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    mtp_agree: float = 0.0
    mtp_tokens: float = 0.0


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
        if parallel is not None and parallel.cfg.pp > 1:
            raise ConfigError(f"--parallel pp={parallel.cfg.pp}: GRPO does not run pipeline stages (each rank samples "
                              f"its rollouts on a whole copy of the policy); use dp= and ep=")
        if parallel is not None and parallel.cfg.redundant:  # (the trainer plans them from its bias-update loads)
            raise ConfigError(f"--parallel redundant={parallel.cfg.redundant}: GRPO does not plan redundant experts "
                              f"(pre-training and SFT do); use redundant=0")
        if cfg.questions_per_step % self.world:
            raise ConfigError(f"questions_per_step={cfg.questions_per_step} does not split over {self.world} ranks")
        # MTP module 1 keeps drafting for the policy as it changes (see _mtp_distill)
        self.mtp_lambda = 0.0 if not len(model.mtp) else 0.3 if cfg.mtp_lambda is None else cfg.mtp_lambda
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
        # (prefix caching: each question's prompt is read once per group, the group's other samples start from its
        # keys and recorded routing)
        self.engine = Engine(self.rollout_model, tokenizer, max_batch=min(64, n_per_step * cfg.group_size),
                             max_len=self.max_len, prefix_cache=cfg.prefix_cache)
        # greedy evaluation drafts with MTP module 1 (the same tokens; its acceptance rate is logged)
        self.eval_engine = (Engine(self.rollout_model, tokenizer, max_batch=self.engine.max_batch,
                                   max_len=self.max_len, speculative=True) if len(model.mtp) else self.engine)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resumed else None,
                                  enabled=self.is_main)
        # what the policy writes as it trains (TRL's log_completions): lengths, formats, R1's "aha" words
        self.completions = MetricsLog(self.out / "completions.jsonl", resume_step=self.step if resumed else None,
                                      enabled=self.is_main and cfg.log_completions > 0)
        if self.is_main:
            (self.out / "grpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def _sync_rollout_model(self) -> None:
        """Distributed: the rollout copy takes the trained policy's weights (gathered from the shards)."""
        if self.rollout_model is not self.model:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            self.rollout_model.load_state_dict(full)

    # ---- rollouts and log-probs ------------------------------------------------------------------
    def sample(self, problems: list[Problem], n: int, params: SamplingParams, seed: int | None,
               first: int = 0, engine: Engine | None = None) -> list[Rollout]:
        """n completions per problem (with the engine's log-probs and routing where `params` asks for them).
        `first`: the index of problems[0] in the step's questions (its samples' seeds)."""
        prompts = [problem_prompt(p, self.tok, self.cfg.template) for p in problems]
        engine = engine or self.engine
        engine.forget_prefixes()  # the keys finished rollouts left were computed before the last update
        groups = engine.generate_groups(prompts, n, params, seed, first)
        out = []
        for prompt, group in zip(prompts, groups, strict=True):
            for r in group:
                completion = list(r.output_ids) + ([self.tok.eos_id] if r.finish_reason == "stop" else [])
                lp = torch.tensor([x.logprob for x in r.logprobs]) if params.logprobs is not None else None
                out.append(Rollout(prompt, completion, r.text, lp, r.routing() if params.routed_experts else None))
        return out

    def rollout(self, problems: list[Problem], n: int, params: SamplingParams, seed: int | None,
                first: int = 0) -> list[tuple[list[int], list[int], str]]:
        """n completions per problem: [(prompt ids, completion ids incl. a final EOS if it stopped, text)]."""
        return [(r.prompt, r.completion, r.text) for r in self.sample(problems, n, params, seed, first)]

    def token_logp(self, model: Transformer, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
        """log pi(completion token) [N, Lc], entropy [N, Lc] and mask [N, Lc] (right-padded)."""
        f = self._forward(model, seqs)
        return f.logp, f.entropy, f.mask

    def _forward(self, model: Transformer, seqs: list[tuple[list[int], list[int]]],
                 routing: list[torch.Tensor | None] | None = None, replay: bool = False, record: bool = False,
                 mtp: bool = False) -> PolicyForward:
        """One forward of `model` over (prompt, completion) pairs. routing: the rollouts' experts per sequence
        ([positions read, n_moe_layers, K], see Rollout), replayed in the MoE layers with `replay`; `record`: return
        the experts this forward used; `mtp`: also the MTP distillation loss (the policy itself gets no gradient
        from it)."""
        N = len(seqs)
        L = max(len(p) + len(c) for p, c in seqs)
        Lc = max(len(c) for _, c in seqs)
        ids = torch.zeros(N, L, dtype=torch.long)
        pos = torch.zeros(N, Lc, dtype=torch.long)  # index of the logit that predicts completion token t
        tgt = torch.zeros(N, Lc, dtype=torch.long)
        mask = torch.zeros(N, Lc)
        for i, (p, c) in enumerate(seqs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            tgt[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        gates = model.moe_gates()[: model.config.n_moe_layers]
        forced = None
        if replay and routing is not None and gates:  # [N*L, K] per layer; -1 where the rollout read no token
            R = torch.full((N, L, len(gates), model.config.num_experts_per_tok), -1, dtype=torch.long)
            for i, r in enumerate(routing):
                if r is not None and r.numel():
                    R[i, : min(len(r), L)] = r[:L].long()
            forced = [R[:, :, g].reshape(N * L, -1) for g in range(len(gates))]
        with routing_hooks(gates, forced, record=record) as logs:
            out = model(ids)
        logits = out.logits.float().gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1]))  # [N, Lc, V]
        logp_all = F.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, tgt[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        f = PolicyForward(logp, entropy, mask)
        if record and gates:
            used = torch.stack([log[0].view(N, L, -1) for log in logs], dim=2)  # [N, L, layers, K]
            f.routing = used.gather(1, pos[:, :, None, None].expand(-1, -1, *used.shape[2:]))
        if mtp:
            self._mtp_distill(model, f, ids, out.hidden, pos, logp_all.detach())
        return f

    def _mtp_distill(self, model: Transformer, f: PolicyForward, ids: torch.Tensor, hidden: torch.Tensor,
                     pos: torch.Tensor, teacher: torch.Tensor) -> None:
        """MTP module 1 (V3 §2.2) at position i reads h_i and t_{i+1} and predicts t_{i+2}; speculative decoding
        accepts its draft when it equals the main head's choice at position i+1. So it distils that distribution:
        KL(p_main(. | t_<=i+1) || p_mtp(. | h_i, t_{i+1})) at the completion positions the engine drafts for (the
        second completion token on). Distillation, not cross-entropy on the sampled tokens: the same objective in
        expectation at temperature 1 (the tokens are samples of p_main), without the sampling noise, and at any
        temperature the target whose argmax greedy drafting must match. The main model's hidden states, embedding
        and head enter detached: only the MTP module learns, the policy's trajectory is the GRPO update's alone.
        Distributed: the block is its own FSDP2 unit (nanoseek.parallel.parallelize), gathered by this call and kept
        gathered for its output norm; with no input that needs a gradient, its gradients are reduced by the root's
        end-of-backward callback. Its experts dispatch over "ep" like the main blocks' (every rank runs the same
        number of these forwards and backwards)."""
        block = model.mtp[0]
        S = ids.shape[1] - 1
        P = model.positions(S, device=ids.device)
        h, _ = block(hidden[:, :S].detach(), model.embed(ids[:, 1:]).detach(), P.cos, P.sin)
        at = pos[:, :-1]  # MTP position pos[t] predicts what the main head's row t + 1 predicts
        h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))
        q = F.log_softmax(F.linear(block.shared_head.norm(h), model.lm_head.weight.detach()).float(), dim=-1)
        p = teacher[:, 1:]
        m = f.mask[:, 1:]
        kl = (p.exp() * (p - q)).sum(-1)
        n = m.sum()
        f.mtp_loss = (kl * m).sum() / n.clamp(min=1)
        f.mtp_agree = float(((q.argmax(-1) == p.argmax(-1)).float() * m).sum())
        f.mtp_tokens = float(n)

    def _rollout_logp(self, rolls: list[Rollout], Lc: int) -> torch.Tensor:
        """The engine's log-probs of the completion tokens [N, Lc] (NaN where it reported none)."""
        out = torch.full((len(rolls), Lc), float("nan"))
        for i, r in enumerate(rolls):
            if r.logprobs is not None and len(r.logprobs) == len(r.completion):
                out[i, : len(r.completion)] = r.logprobs
        return out

    # ---- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.time()
        problems = list(itertools.islice(self.problems, cfg.questions_per_step))
        share = cfg.questions_per_step // self.world  # this rank's questions (all of them in one process)
        first = self.rank * share
        problems = problems[first:first + share]
        # the engine reports each token's log-prob and routing, to measure (and optionally remove) the mismatch
        # between the rollout and the training forward
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                logprobs=0, routed_experts=True)
        rolls = self.sample(problems, cfg.group_size, params, seed=cfg.seed * 100_003 + self.step, first=first)
        t_rollout = time.time()
        scored = [score(problems[k // cfg.group_size], r.text, cfg.format_weight) for k, r in enumerate(rolls)]
        if self.reward_fn is not None:
            rewards = torch.tensor([float(self.reward_fn(problems[k // cfg.group_size].prompt, r.text,
                                                         **problems[k // cfg.group_size].reward_fields()))
                                    for k, r in enumerate(rolls)])
        else:
            rewards = torch.tensor([s[0] for s in scored])
        adv = group_advantages(rewards, cfg.group_size, scale_std=cfg.scale_std)
        for r in rolls:
            if not r.completion:  # an empty completion still has a token
                r.completion, r.logprobs = [self.tok.eos_id], None
        seqs = [(r.prompt, r.completion) for r in rolls]
        N = len(seqs)
        chunks = list(range(0, N, cfg.micro_batch))
        t_score = time.time()
        old: list[torch.Tensor] = []
        ref: list[torch.Tensor] = []
        with torch.no_grad():
            for a in chunks:
                if self.ref is not None:
                    ref.append(self.token_logp(self.ref, seqs[a : a + cfg.micro_batch])[0])
                if cfg.old_logprobs == "recompute":
                    old.append(self._forward(self.model, seqs[a : a + cfg.micro_batch],
                                             [r.routing for r in rolls[a : a + cfg.micro_batch]],
                                             replay=cfg.routing_replay).logp)
        t_logprob = time.time()
        # the aggregation's normaliser over the global batch (all ranks): sequences (grpo, dr_grpo) or tokens (dapo);
        # FSDP averages the ranks' gradients, so each rank's share is scaled by the world size
        # (and of the MTP loss: the tokens MTP module 1 drafts for)
        n_all, active, mtp_all = self._sum(float(N), float(sum(len(c) for _, c in seqs)),
                                           float(sum(len(c) - 1 for _, c in seqs)))
        mtp_on = self.mtp_lambda > 0
        stats: dict[str, float] = {}
        match = {"diff_max": 0.0, "diff_sum": 0.0, "diff_n": 0.0, "ratio_dev": 0.0, "route_tok": 0.0,
                 "route_dec": 0.0, "route_n": 0.0, "mtp_loss": 0.0, "mtp_agree": 0.0, "ent": 0.0}
        ent_n = 0.0
        for mu_pass in range(cfg.mu):
            self.optimizer.zero_grad(set_to_none=True)
            for k, a in enumerate(chunks):
                chunk, rchunk = seqs[a : a + cfg.micro_batch], rolls[a : a + cfg.micro_batch]
                f = self._forward(self.model, chunk, [r.routing for r in rchunk], replay=cfg.routing_replay,
                                  record=mu_pass == 0, mtp=mtp_on)
                lp, m = f.logp, f.mask
                if mu_pass == 0:  # the policy that sampled: measure the rollout / training mismatch, fix pi_old
                    rlp = self._rollout_logp(rchunk, lp.shape[1])
                    have = ~rlp.isnan() & m.bool()
                    if cfg.old_logprobs == "trainer":
                        old.append(lp.detach())
                    elif cfg.old_logprobs == "rollout":
                        old.append(torch.where(have, rlp, lp.detach()))
                    d = (lp.detach() - rlp).abs()[have]
                    if d.numel():
                        match["diff_max"] = max(match["diff_max"], d.max().item())
                        match["diff_sum"] += d.sum().item()
                        match["diff_n"] += d.numel()
                    rho = torch.exp(lp.detach() - old[k])[m.bool()]
                    if rho.numel():
                        match["ratio_dev"] = max(match["ratio_dev"], (rho - 1).abs().max().item())
                    if f.routing is not None:
                        self._routing_mismatch(f.routing, rchunk, m, match)
                    match["ent"] += (f.entropy * m).sum().item()
                    ent_n += m.sum().item()
                loss, st = grpo_loss(
                    lp, old[k], ref[k] if ref else None, adv[a : a + len(chunk)], m, beta=cfg.beta,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,  # type: ignore[arg-type]
                    max_len=cfg.max_new_tokens,
                )
                w = (m.sum().item() / active if cfg.aggregation == "dapo" else len(chunk) / n_all) * self.world
                total = loss * w
                if f.mtp_loss is not None and mtp_all > 0:
                    total = total + self.mtp_lambda * f.mtp_loss * (f.mtp_tokens / mtp_all * self.world)
                    match["mtp_loss"] += f.mtp_loss.item() * f.mtp_tokens / mtp_all / cfg.mu
                    match["mtp_agree"] += f.mtp_agree / mtp_all / cfg.mu
                total.backward()
                for key, v in st.items():
                    stats[key] = stats.get(key, 0.0) + v * w / cfg.mu
            gnorm, mtp_gnorm = self._clip(mtp_on)
            self.optimizer.step()
        self._sync_rollout_model()
        self.step += 1
        for k, r in enumerate(rolls[: cfg.log_completions]):
            self.completions.write({"step": self.step, "question": problems[k // cfg.group_size].question,
                                    "completion": r.text, "reward": rewards[k].item(), "correct": scored[k][1],
                                    "format": scored[k][2]})
        if self.ref is not None and self.step % cfg.ref_refresh_every == 0:
            self.ref.load_state_dict(self.rollout_model.state_dict())
        t_train = time.time()
        lengths = torch.tensor([float(len(r.completion)) for r in rolls])
        diff_max, ratio_dev = match["diff_max"], match["ratio_dev"]
        sums = [match[k] for k in ("ent", "diff_sum", "diff_n", "route_tok", "route_dec", "route_n")]
        if self.par is not None:  # every rank's rollouts (rank order = the single process's order)
            rewards = self.par.all_gather(rewards)
            lengths = self.par.all_gather(lengths)
            stats = {k: v / self.world for k, v in zip(stats, self._sum(*stats.values()), strict=True)}
            sums, ent_n = list(self._sum(*sums)), self._sum(ent_n)[0]
            match["mtp_loss"], match["mtp_agree"] = self._sum(match["mtp_loss"], match["mtp_agree"])
            diff_max, ratio_dev = (self.par.all_reduce(torch.tensor([diff_max, ratio_dev]), "max")).tolist()
        ent_sum, diff_sum, diff_n, route_tok, route_dec, route_n = sums
        acc, fmt = self._sum(sum(s[1] for s in scored), sum(s[2] for s in scored))
        rec = {
            "kind": "train", "step": self.step, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(), "accuracy": acc / n_all,
            "format_rate": fmt / n_all, "completion_len": lengths.mean().item(),
            "entropy": ent_sum / max(ent_n, 1.0), "all_equal_groups": all_equal_fraction(rewards, cfg.group_size),
            "grad_norm": float(gnorm), "seconds": time.time() - t0, **stats,
            # rollout vs training forward, first pass (the policy that sampled): |log-prob difference| per completion
            # token, the largest |ratio - 1| against pi_old, and the fraction of tokens (of router decisions, token x
            # MoE layer) whose experts differ
            "logprob_diff_max": diff_max, "logprob_diff_mean": diff_sum / max(diff_n, 1.0),
            "ratio_dev_max": ratio_dev, "routing_disagree": route_tok / max(route_n, 1.0),
            "routing_disagree_decisions": route_dec / max(route_n, 1.0),
            # where the step's time went: sampling, rewards, no-grad log-prob forwards, the optimisation passes
            "time_rollout": t_rollout - t0, "time_score": t_score - t_rollout, "time_logprob": t_logprob - t_score,
            "time_train": t_train - t_logprob,
        }
        if mtp_on:  # MTP distillation: KL per token, and how often its argmax is the main head's (greedy acceptance)
            rec.update(mtp_loss=match["mtp_loss"], mtp_agree=match["mtp_agree"], mtp_grad_norm=mtp_gnorm)
        return rec

    def _routing_mismatch(self, used: torch.Tensor, rolls: list[Rollout], mask: torch.Tensor,
                          acc: dict[str, float]) -> None:
        """Add to `acc` the completion tokens (route_n) whose input position was routed to other experts in the
        training forward than in the rollout in some MoE layer (route_tok), and the router decisions, as a fraction
        of the layers, that differ (route_dec). used: [N, Lc, layers, K] (PolicyForward.routing)."""
        for i, r in enumerate(rolls):
            n = int(mask[i].sum())
            start = len(r.prompt) - 1
            if r.routing is None or len(r.routing) < start + n:
                continue
            mine = used[i, :n].sort(dim=-1).values
            theirs = r.routing[start : start + n].long().sort(dim=-1).values
            differ = (mine != theirs).any(-1)  # [n, layers]
            acc["route_tok"] += differ.any(-1).sum().item()
            acc["route_dec"] += differ.float().mean(-1).sum().item()
            acc["route_n"] += n

    def _clip(self, mtp_on: bool) -> tuple[float, float]:
        """Clip the policy's gradients and (MTP training) the MTP module's separately, so that the MTP loss never
        changes the policy's update; returns both norms before clipping."""
        if not mtp_on:
            return self._clip_grads(self.model, self.cfg.grad_clip), 0.0
        mtp = list(self.model.mtp.parameters())
        grads = [p.grad for p in mtp]
        for p in mtp:
            p.grad = None
        gnorm = self._clip_grads(self.model, self.cfg.grad_clip)
        for p, g in zip(mtp, grads, strict=True):
            p.grad = g
        if self.par is not None:
            return gnorm, clip_grad_norm(self.model, self.cfg.grad_clip, self.par, params=mtp)
        return gnorm, torch.nn.utils.clip_grad_norm_(mtp, self.cfg.grad_clip).item()

    @torch.no_grad()
    def evaluate(self, problems: list[Problem] | None = None) -> dict[str, float]:
        """Greedy accuracy and format rate on the fixed held-out problems."""
        problems = problems if problems is not None else self.heldout
        problems = problems[self.rank::self.world]  # distributed: each rank scores its share
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens)
        eng = self.eval_engine
        before = eng.stats.drafted, eng.stats.accepted
        rolls = self.sample(problems, 1, params, seed=None, engine=eng) if problems else []
        scored = [score(p, r.text, self.cfg.format_weight) for p, r in zip(problems, rolls, strict=True)]
        acc, fmt, n, drafted, accepted = self._sum(sum(s[1] for s in scored), sum(s[2] for s in scored),
                                                   float(len(scored)), float(eng.stats.drafted - before[0]),
                                                   float(eng.stats.accepted - before[1]))
        rec = {"kind": "eval", "step": self.step, "heldout_accuracy": acc / n, "heldout_format_rate": fmt / n,
               "heldout_n": int(n)}
        if eng.speculative:  # the share of MTP drafts the main model accepted (V3 §5.4.3 reports 85-90%)
            rec["heldout_mtp_acceptance"] = accepted / max(drafted, 1.0)
        return rec

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


def draft_acceptance(model: Transformer, tokenizer: Any, problems: list[Problem], template: str = "chat",
                     max_new_tokens: int = 40, max_batch: int = 32) -> float:
    """Speculative decoding's acceptance rate on greedy answers to `problems`: the share of MTP module 1's drafts
    (one token past the main model's, V3 §2.2) that the main model's next choice confirmed."""
    prompts = [problem_prompt(p, tokenizer, template) for p in problems]
    engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max(map(len, prompts)) + max_new_tokens + 2,
                    speculative=True)
    engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return engine.stats.acceptance_rate


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
