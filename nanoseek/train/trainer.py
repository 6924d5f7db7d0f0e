"""The pre-training loop: V3 schedules, MTP, auxiliary-loss-free balancing, metrics, exact resume.

A run is step-driven (`TrainConfig.steps`) or time-budgeted (`Trainer(..., budget=TimeBudget(seconds))`): under a
budget the schedules follow the fraction of the budget spent and the run ends when the budget does (at the latest at
`steps`); see nanoseek.train.loop for what resuming such a run means.

The training coefficients live in TrainConfig only: the MTP weight lambda (`mtp_lambda*`, passed to each forward)
and the balance-loss weight alpha (`aux_loss_alpha`, set on the MoE layers). The model config's `mtp_loss_weight` /
`aux_loss_alpha` are the defaults of a forward outside the trainer and are never rewritten by it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data import PackedBatches, TokenShard, heldout_batches
from ..fp8 import convert_to_fp8, emulate_bf16_gemms
from ..io import build, read_config
from ..io.paths import TOKENIZER_FILES
from ..model import ModelConfig, Transformer, update_bias
from ..model.moe import MoE
from ..parallel import ParallelContext, Traffic, clip_grad_norm, expert_traffic, materialize, parallelize
from ..parallel.overlap import take_stats as take_a2a_stats
from ..parallel.pipeline import Pipeline, microbatches
from ..parallel.redundant import ExpertReplicas, expert_replicas
from .checkpoint import load_latest, load_latest_sharded, load_model
from .config import TrainConfig, write_resolved
from .loop import RunLoop, TimeBudget
from .metrics import MetricsLog, max_violation, plot_expert_heatmap, plot_losses, read_metrics
from .optim import build_optimizer
from .schedule import batch_at, bias_speed_at, lr_at, mtp_lambda_at

# ModelConfig fields that are training coefficients, not architecture: TrainConfig's mtp_lambda* / aux_loss_alpha
# are the ones training uses, so a checkpoint that differs from the requested config only in these is the same model
TRAINING_COEFFICIENTS = ("mtp_loss_weight", "aux_loss_alpha")


def config_differences(checkpoint: ModelConfig, requested: ModelConfig) -> list[str]:
    """The architecture fields in which two model configs differ, as "name <checkpoint> (checkpoint) vs
    <requested> (requested)"."""
    a, b = checkpoint.to_dict(), requested.to_dict()
    return [f"{k} {json.dumps(a.get(k))} (checkpoint) vs {json.dumps(b.get(k))} (requested)"
            for k in [*a, *(k for k in b if k not in a)] if k not in TRAINING_COEFFICIENTS and a.get(k) != b.get(k)]


def set_balance_loss_weight(model: Transformer, alpha: float) -> None:
    """alpha of the complementary sequence-wise balance loss (V3 §2.1.2) on every MoE layer, for training; the
    model config keeps its own value. (TrainConfig checks the value's range.)"""
    for m in model.modules():
        if isinstance(m, MoE):
            m.alpha = float(alpha)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    final_heldout_loss: float | None
    interrupted: bool
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer(RunLoop):
    """Trains `model_cfg` on the token shards in `data_dir` (made by nanoseek.data.prepare_corpus), for cfg.steps
    steps or, with `budget`, for that many seconds (cfg.steps then caps the steps).

    With `parallel` (a process of a torchrun launch, nanoseek.parallel) the model is parallelized over its mesh;
    `batch_size` stays the global number of sequences per step, `micro_batch_size` is per rank, and each rank reads
    its slice of every batch, so the global batch -- and the loss -- are the single-process run's. Rank 0 alone
    writes metrics, plots and the progress bar; checkpoints are sharded (torch.distributed.checkpoint)."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data_dir: Path, out_dir: Path,
                 resume: bool = False, progress: bool = True, budget: TimeBudget | None = None,
                 parallel: ParallelContext | None = None) -> None:
        """`resume`: continue from the newest valid checkpoint in out_dir (RunDirError if it holds checkpoints but
        none is usable; a fresh start if it holds none); a time-budgeted checkpoint keeps its budget unless `budget`
        replaces it. Without `resume`, an out_dir that already holds checkpoints is refused (RunDirError)."""
        self.model_cfg, self.cfg = model_cfg, cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self._init_loop(self.out_dir, budget, progress, parallel, resume=resume)
        self.device = parallel.device if parallel is not None else pick_device(cfg.device)
        # the ranks that read different sequences: dp x ep (the stages of a pipeline read the same ones)
        self.data_world, self.data_rank = (parallel.data_world, parallel.data_rank) if parallel is not None else (1, 0)
        if cfg.batch_size % self.data_world:
            raise ConfigError(f"batch_size={cfg.batch_size} sequences do not split over {self.data_world} ranks")
        info = json.loads((self.data_dir / "data.json").read_text())
        self.tok_hash = info["tokenizer_hash"]
        vocab = info.get("vocab_size")
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab_size is {model_cfg.vocab_size}")
        self.train_shard = TokenShard.open(self.data_dir / "train.bin", self.tok_hash)
        self.val_shard = TokenShard.open(self.data_dir / "val.bin", self.tok_hash)
        # SFT data (nanoseek.train.sft) comes with loss masks: only assistant tokens are trained and evaluated
        masks = [self.data_dir / f"{k}_mask.bin" for k in ("train", "val")]
        self.train_mask, self.val_mask = (
            [TokenShard.open(m, self.tok_hash) for m in masks] if masks[0].exists() else [None, None])
        self.loader = PackedBatches(self.train_shard, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed,
                                    loss_mask=self.train_mask)
        resumed = load_latest(self.ckpt_root, device=self.device) if resume and parallel is None else None
        torch.manual_seed(cfg.seed)  # (every rank of a distributed run builds the same model)
        if resumed is not None:
            path, model, opt_tensors, state, rng = resumed
        elif cfg.init_from:  # fine-tuning: the weights of another run, fresh optimizer and data position
            path, model = Path(cfg.init_from), load_model(cfg.init_from, self.device)  # HF layout or sharded
        else:
            meta = parallel is not None and parallel.cfg.meta_init  # shards are allocated after parallelize
            path, model = None, build(model_cfg, torch.float32, "meta" if meta else self.device)
        if path is not None:
            self._check_config(path, model.config)
        self.model: Transformer = model.train()
        if cfg.fp8:
            convert_to_fp8(self.model, cfg.fp8_pow2_scale, cfg.fp8_backend)  # type: ignore[arg-type]
        elif cfg.emulate_bf16:
            emulate_bf16_gemms(self.model)
        set_balance_loss_weight(self.model, cfg.aux_loss_alpha)
        self.pipe: Pipeline | None = None
        if parallel is not None:
            if parallel.cfg.pp > 1:  # this rank's pipeline stages, parallelized over their dp x ep ranks
                self.pipe = Pipeline(self.model, parallel)
                self.state_keys = self.pipe.state_keys()
                for b in {cfg.batch_size, batch_at(cfg, 0)}:  # a batch the schedule cannot run: refused now
                    self._microbatches(max(self.data_world, b // self.data_world * self.data_world))
            else:
                parallelize(self.model, parallel)
            if next(self.model.parameters()).device.type == "meta":
                materialize(self.model, self.device, cfg.seed)
        # redundant experts (--parallel redundant=R): re-planned from the expert loads of the steps
        self.replicas: ExpertReplicas | None = expert_replicas(self.model) if parallel is not None else None
        self.optimizer = build_optimizer(self.pipe.parts if self.pipe is not None else self.model, cfg)
        if resume and parallel is not None:
            got = load_latest_sharded(self.ckpt_root, self.model, self.optimizer, self.state_keys)
            if got is not None:
                path, state, rng = got
                self._check_config(path, read_config(path))
                self._check_budget(path, state, budget)
                self._restore_run(path, state, rng, inherit_budget=True)
                self.loader.load_state_dict(state["data"])
                resumed = got  # type: ignore[assignment]
        elif resumed is not None:
            self._check_budget(path, state, budget)
            self._restore(path, self.optimizer, opt_tensors, state, rng, inherit_budget=True)
            self.loader.load_state_dict(state["data"])
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=self.step if resumed else None,
                                  enabled=self.is_main)
        if self.is_main:
            extra = {"data_dir": str(self.data_dir), "data": info}
            if parallel is not None:
                extra["parallel"] = {**parallel.cfg.to_dict(), "world_size": self.world}
            write_resolved(self.out_dir, self.model_cfg, cfg, extra)
        eval_len = min(cfg.seq_len, len(self.val_shard) - 1)  # a small held-out split (e.g. SFT) gets shorter windows
        if 0 < eval_len < cfg.seq_len:
            warnings.warn(f"{self.val_shard.path}: {len(self.val_shard)} held-out tokens; evaluating on windows of "
                          f"{eval_len} instead of {cfg.seq_len}", stacklevel=2)
        self.heldout = heldout_batches(self.val_shard, cfg.micro_batch_size, max(eval_len, 1), cfg.eval_batches,
                                       self.val_mask)
        self.desc = "sft" if self.train_mask is not None else "pretrain"

    def _check_config(self, path: Path, found: ModelConfig) -> None:
        diff = config_differences(found, self.model_cfg)
        if diff:
            raise ValueError(f"{path}: checkpoint model config differs from the requested one: {', '.join(diff)}")
        self.model_cfg = found

    def _check_budget(self, path: Path, state: dict[str, Any], budget: TimeBudget | None) -> None:
        if budget is not None and "budget" not in state and state["step"] > 0:
            raise ValueError(f"{path}: a step-driven run (step {state['step']} of {self.cfg.steps}); resume it without "
                             f"a time budget")

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean main-model cross-entropy over the scored tokens of the fixed held-out batches (in a distributed run
        each rank scores every world-th sequence of each batch; a rank left without one scores a copy with weight 0,
        since every rank must take part in each forward)."""
        self.model.eval()
        total, n = 0.0, 0.0
        for x, y in self.heldout:
            weight = 1.0
            if self.par is not None:
                x, y = x[self.data_rank::self.data_world], y[self.data_rank::self.data_world]
                if len(x) == 0:
                    x, y, weight = self.heldout[0][0][:1], self.heldout[0][1][:1], 0.0
            if self.pipe is not None:
                main = self.pipe.main_loss(x, y)
                if main is None:  # not the last stage: its ranks count the loss
                    continue
            else:
                main = self.model(x.to(self.device), labels=y.to(self.device), mtp=False,
                                  return_logits=False).main_loss.item()
            scored = int((y != -100).sum())  # SFT: the assistant tokens
            if scored:
                total += main * scored * weight
                n += scored * weight
        self.model.train()
        total, n = self._sum(total, n)
        return total / max(n, 1)

    # ---------------------------------------------------------------------------------------- one step
    def schedule_progress(self) -> float | None:
        """Where a time-budgeted run is in its schedules (nanoseek.train.loop), or in its step cap if that is
        further; None for a step-driven run."""
        p = super().schedule_progress()
        return None if p is None else max(p, min(1.0, self.step / max(self.cfg.steps, 1)))

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        step = self.step
        p = self.schedule_progress()
        lr = lr_at(cfg, step, p)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        lam = mtp_lambda_at(cfg, step, p)
        W = self.data_world
        n_seq = max(W, batch_at(cfg, step, p) // W * W)  # the ramp's batch rounded to whole sequences per rank
        part = (self.data_rank, W)
        if self.par is not None:
            expert_traffic(model)  # reset: count this step's dispatches only
        depth = len(model.mtp)
        sums = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        loads = []
        done = 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        if self.pipe is not None:  # this rank's share of the batch through the pipeline, in equal micro-batches
            x, y = self.loader.next_batch(n_seq, part)
            with autocast:
                got = self.pipe.step(x.to(self.device), y.to(self.device), self._microbatches(n_seq), lam)
            sums.update(main_loss=got.main_loss, mtp_loss=got.mtp_loss, balance_loss=got.balance_loss)
            done = n_seq
        while done < n_seq:
            mb = min(cfg.micro_batch_size * W, n_seq - done)  # sequences in this micro-batch over all ranks
            x, y = self.loader.next_batch(mb, part)
            x, y = x.to(self.device), y.to(self.device)
            with autocast:
                out = model(x, labels=y, return_logits=False, mtp_loss_weight=lam)
            loss = out.loss  # main + lambda/D * sum_k MTP_k + balance
            mtp = torch.stack(out.mtp_losses).mean() if out.mtp_losses else None
            (loss * (mb / n_seq)).backward()
            w = mb / n_seq
            sums["loss"] += loss.item() * w
            sums["main_loss"] += out.main_loss.item() * w
            sums["mtp_loss"] += (mtp.item() if mtp is not None else 0.0) * w
            sums["balance_loss"] += (out.balance_loss.item() if out.balance_loss is not None else 0.0) * w
            if out.expert_load is not None:
                loads.append(out.expert_load)
            done += mb
        sums = {k: v / W for k, v in zip(sums, self._sum(*sums.values()), strict=True)}  # the data ranks' mean
        if self.pipe is not None:  # the stages' parts, summed over the pipeline above: the whole loss
            sums["loss"] = sums["main_loss"] + (lam or 0.0) * sums["mtp_loss"] * (depth > 0) + sums["balance_loss"]
            grad_norm = clip_grad_norm(model, cfg.grad_clip, self.par,  # type: ignore[arg-type]
                                       self.pipe.parameters(), self.pipe.shared_parameters())
        else:
            grad_norm = self._clip_grads(model, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec: dict[str, Any] = {"kind": "train", "step": step + 1, "lr": lr, "grad_norm": grad_norm,
                               "batch": n_seq, "tokens": n_seq * cfg.seq_len, "mtp_lambda": lam, **sums}
        if depth == 0:
            rec["mtp_loss"] = None
        if p is not None:
            rec["progress"] = round(p, 5)
        traffic = expert_traffic(model) if self.par is not None else None
        if self.par is not None and self.par.cfg.ep > 1:  # (a pipeline rank without MoE layers sends nothing)
            t = (traffic or Traffic()).to_dict()
            a2a = take_a2a_stats()
            summed = self._sum(t["dispatch_bytes"] + t["combine_bytes"], t["cross_node_bytes"], t["token_nodes"],
                               t["replica_bytes"], a2a.overlapped_calls, a2a.exposed)
            rec["ep_bytes"], rec["ep_cross_node_bytes"], rec["ep_token_nodes"], rec["ep_replica_bytes"] = (
                int(v) for v in summed[:4])
            # all-to-alls run beside the other chunk's compute (DualPipeV overlap), and the seconds a rank waited on
            # all-to-alls with nothing else computing (mean over ranks)
            rec["ep_a2a_overlapped"] = int(summed[4])
            rec["ep_a2a_exposed_s"] = round(float(summed[5]) / self.par.cfg.world_size, 6)
            ranks = self.par.all_gather(torch.tensor([[t["max_nodes_per_token"], t["expert_rows"]]],
                                                     dtype=torch.float64, device=self.device))
            rec["ep_max_nodes_per_token"] = int(ranks[:, 0].max())
            # the expert rows of a stage's busiest rank over its ranks' mean (1.0: all compute as many), worst stage
            rows = ranks[:, 1].view(self.par.cfg.pp, -1)  # pipeline stages outermost in the mesh
            rec["ep_rows_max_over_mean"] = (rows.amax(1) / rows.mean(1).clamp_min(1.0)).max().item()
        load = None
        if self.pipe is not None:
            load = self._pipeline_load(got.loads, n_seq // W)
        elif loads:
            load = torch.cat(loads, dim=1)  # [layers, sequences, E]
            if self.par is not None:  # every rank's sequences: the biases move identically everywhere
                load = self.par.all_gather(load.transpose(0, 1).contiguous()).transpose(0, 1)
        if load is not None:
            gamma = bias_speed_at(cfg, step, p)
            for gate, layer_load in zip(model.moe_gates(), load, strict=True):
                update_bias(gate, layer_load, gamma)
            if self.replicas is not None:
                self.replicas.observe(load)
            n_main = model.config.n_moe_layers
            main_load = load[:n_main]
            rec["maxvio_batch"], rec["maxvio_seq"] = max_violation(main_load)
            share = main_load.sum(dim=1)
            rec["expert_load"] = (share / share.sum(dim=-1, keepdim=True)).round(decimals=4).tolist()
        else:
            rec["maxvio_batch"] = rec["maxvio_seq"] = 0.0
        self.step += 1
        return rec

    def _microbatches(self, n_seq: int) -> int:
        """Pipeline micro-batches for a batch of n_seq sequences (nanoseek.parallel.pipeline.microbatches)."""
        assert self.par is not None
        pc = self.par.cfg
        return microbatches(n_seq // self.data_world, self.cfg.micro_batch_size, pc.pp, pc.pp_schedule)

    def _pipeline_load(self, held: dict[int, torch.Tensor], n_local: int) -> torch.Tensor | None:
        """Every MoE layer's loads [layers, the step's sequences, E] on every rank, from the layers each pipeline
        rank held (the stage's data ranks' sequences gathered, then the stages' layers summed: each is one's)."""
        assert self.par is not None
        n_gates = len(self.model.moe_gates())
        if not n_gates:
            return None
        local = torch.zeros(n_gates, n_local, self.model_cfg.n_routed_experts, device=self.device)
        for i, t in held.items():
            local[i] = t
        load = self.par.all_gather(local.transpose(0, 1).contiguous(), self.par.dense_mesh.get_group())
        load = load.transpose(0, 1).contiguous()
        dist.all_reduce(load, group=self.par.pp_group)
        return load

    # ---------------------------------------------------------------------------------------- the loop
    def save(self) -> Path:
        state = {"data": self.loader.state_dict(), "train_config": self.cfg.to_dict()}
        return self._checkpoint(self.model, self.optimizer, state, self.cfg.keep_last,
                                extra_files=[self.data_dir / f for f in TOKENIZER_FILES])

    def _eval_record(self) -> dict[str, Any]:
        return {"kind": "eval", "step": self.step, "heldout_loss": self.evaluate()}

    def _cadence(self) -> tuple[int, int, int]:
        return self.cfg.eval_every, self.cfg.ckpt_every, self.cfg.steps

    def _log_due(self, end: int) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == end

    def _after_step(self, rec: dict[str, Any], seconds: float) -> None:
        rec["tokens_per_s"] = rec["tokens"] / seconds
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}")

    def _postfix(self, rec: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{rec['main_loss']:.3f}", "lr": f"{rec['lr']:.1e}", "vio": f"{rec['maxvio_batch']:.2f}",
                "tok_s": f"{rec['tokens_per_s']:.0f}"}

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until cfg.steps (or `max_steps` more steps), or until the time budget is spent; SIGINT/SIGTERM
        checkpoint and stop."""
        end = self.cfg.steps if max_steps is None else min(self.cfg.steps, self.step + max_steps)
        self.model.train()
        t0 = time.perf_counter()
        history, interrupted = self._run_loop(end)
        seconds = time.perf_counter() - t0
        tokens = sum(r["tokens"] for r in history if r["kind"] == "train")
        evals = [r["heldout_loss"] for r in history if r["kind"] == "eval"]
        records = read_metrics(self.metrics.path) if self.is_main else []
        if records:
            plot_losses(records, self.out_dir / "loss.png")
            plot_expert_heatmap(records, self.out_dir / "expert_load.png")
        return TrainResult(self.out_dir, self.step, evals[-1] if evals else None, interrupted, tokens, seconds,
                           history)
