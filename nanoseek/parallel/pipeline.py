"""Pipeline parallelism on torch.distributed.pipelining: the model's layers cut into stages (Transformer.stages'
split), one or two stages per rank, run by PyTorch's schedules (1F1B, interleaved 1F1B, DualPipeV).

    stage s      layers [bounds[s], bounds[s+1]); the first also embeds, the last's output goes to the loss
    loss         the output stage -- final norm, head, the MTP modules and their losses -- runs in the schedule's
                 loss function on the last stage (so the MTP modules see the micro-batch's labels)
    balance loss each stage's MoE layers add theirs where they are: the hidden state passes through an identity
                 whose backward also sends gradient 1 into the stage's balance loss (Megatron's aux-loss scaler),
                 so nothing but the hidden state crosses a stage boundary
    placement    "loop" (stage s on rank s % pp: 1F1B, interleaved) or "v" (DualPipeV: rank r holds stages r and
                 2 pp - 1 - r, so the first and the last stage -- embedding, head and MTP -- share rank 0, V3 §3.2.1)

Where the first and the last stage live on different ranks and the model has MTP modules, the last rank keeps its own
copy of the embedding (MTP embeds the next tokens with it); `sync_tied_embedding` sums the two copies' gradients.
`Pipeline` is the training runtime: the stages of a pp x dp x ep mesh, each parallelized (EP, FSDP2) over its stage's
dp x ep ranks, a step, a forward-only held-out loss and the names each rank holds for sharded checkpoints.
Each micro-batch's loss enters with weight 1 / micro-batches (the loss function's value and the balance losses' injected
gradient), so a step equals the single-process step on the whole batch; the schedule's own gradient scaling is off,
since it would scale a parameter once per stage that holds it (the embedding of DualPipeV's rank 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    OVERLAP_F_B,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor

from ..config import ConfigError
from ..model import Transformer
from ..model.moe import MoE
from ..model.stats import attention_params, moe_params
from .launch import ParallelContext
from .overlap import Turns, overlap_f_b
from .parallelize import apply_activation_checkpointing, parallelize

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
             "dualpipev": ScheduleDualPipeV}
MULTI = ("interleaved", "dualpipev")  # two stages per rank


class _AddBalanceLoss(torch.autograd.Function):
    """Identity on h; the backward also gives the stage's balance loss the gradient `weight` (its weight in the
    step's loss: 1 / micro-batches)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.aux_shape, ctx.weight = aux.shape, weight
        return h.clone()  # not a view: the schedule detaches a stage's outputs in place after their backward

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, torch.full(ctx.aux_shape, ctx.weight, dtype=g.dtype, device=g.device), None


class PipelineStageModule(nn.Module):
    """Layers [start, stop) of `model` (its own modules, registered here so that the schedule's weight gradients
    and the rank's optimizer see them), with the embedding on the first stage and the output stage's modules
    (final norm, head, MTP and, for MTP, the embedding) on the last."""

    def __init__(self, model: Transformer, start: int, stop: int, n_microbatches: int = 1) -> None:
        super().__init__()
        self._model = [model]
        self.n_microbatches = n_microbatches
        self.start, self.stop = start, stop
        self.first, self.last = start == 0, stop == len(model.model.layers)
        self.layers = nn.ModuleList(model.model.layers[start:stop])
        if self.first or (self.last and len(model.mtp)):
            self.embed_tokens = model.model.embed_tokens
        if self.last:
            self.norm, self.lm_head, self.mtp = model.model.norm, model.lm_head, model.mtp
        # per forward call: the MoE layers' loads [B, E] and the stage's balance loss (see `take`)
        self.calls: list[tuple[list[torch.Tensor], float]] = []
        # the last stage, per micro-batch: the MTP modules' loads and the parts of the loss (main, MTP losses, the
        # MTP modules' balance loss)
        self.outputs: list[tuple[torch.Tensor | None, float, list[float], float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        h = model.embed(x) if self.first else x
        pos = model.positions(h.shape[1], device=h.device)
        h, stats = model.layers_forward(h, pos, start=self.start, stop=self.stop)
        if not stats:
            self.calls.append(([], 0.0))
            return h
        balance = torch.stack([s.balance_loss for s in stats]).sum()
        self.calls.append(([s.load for s in stats], float(balance.detach())))
        return _AddBalanceLoss.apply(h, balance, 1.0 / self.n_microbatches)

    def take(self, n_microbatches: int) -> tuple[list[torch.Tensor], float]:
        """(this step's loads per MoE layer [micro-batches x B, E], the mean over micro-batches of the stage's
        balance loss), and forget them (and the last stage's `outputs`). The last n_microbatches forward calls are
        the step's: the schedule's first step also runs one forward to infer the shapes passed between stages."""
        calls, self.calls, self.outputs = self.calls[-n_microbatches:], [], []
        loads = [torch.cat(per_layer) for per_layer in zip(*(c[0] for c in calls), strict=True)] if calls else []
        return loads, sum(c[1] for c in calls) / max(len(calls), 1)


def stage_bounds(n_layers: int, n_stages: int, last_extra: float = 0.0) -> list[int]:
    """Layer indices where stages 1.. start, for even work per stage when the last stage also carries `last_extra`
    blocks' worth of work (the MTP modules and the head: `output_cost`); every stage keeps at least one layer."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"{n_layers} layers cannot make {n_stages} pipeline stages")
    per = (n_layers + last_extra) / n_stages
    bounds, prev = [], 0
    for s in range(1, n_stages):
        b = min(max(round(s * per), prev + 1), n_layers - (n_stages - s))
        bounds.append(b)
        prev = b
    return bounds


def output_cost(model: Transformer) -> float:
    """The output stage's work in blocks, by the weights each token touches: the head (once for the main model and
    once per MTP module) and each MTP module (a block and its projection), against one MoE block."""
    c = model.config
    routed, moe_other = moe_params(c)
    block = attention_params(c) + moe_other + routed * c.num_experts_per_tok // c.n_routed_experts
    head = c.vocab_size * c.hidden_size
    mtp = block + 2 * c.hidden_size * c.hidden_size
    return ((1 + len(model.mtp)) * head + len(model.mtp) * mtp) / block


def stage_indices(rank: int, pp: int, schedule: str) -> list[int]:
    """The stages rank `rank` runs: one (1F1B, GPipe), two looped (interleaved) or two in a V (DualPipeV)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if schedule == "dualpipev":
        return [rank, 2 * pp - 1 - rank]
    if schedule == "interleaved":
        return [rank, rank + pp]
    return [rank]


def stage_count(pp: int, schedule: str) -> int:
    """Pipeline stages over pp ranks: one per rank, two with the interleaved and DualPipeV schedules."""
    return pp * (2 if schedule in MULTI else 1)


def check_stages(n_layers: int, pp: int, schedule: str) -> None:
    """ConfigError unless `schedule` over pp ranks gives every stage at least one of the n_layers layers."""
    n_stages = stage_count(pp, schedule)
    if n_layers < n_stages:
        raise ConfigError(f"--parallel pp={pp},pp_schedule={schedule} needs {n_stages} stages of at least one layer "
                          f"each; the model has {n_layers} layers (num_hidden_layers)")


def microbatches(share: int, micro_batch_size: int, pp: int, schedule: str) -> int:
    """A pipeline rank's micro-batches for `share` sequences: equal micro-batches of at most micro_batch_size
    sequences (the largest such size that divides the share). ConfigError where the schedule needs more (interleaved
    and DualPipeV: one per stage at least)."""
    m = share // math.gcd(share, micro_batch_size)
    if schedule in MULTI and m < 2 * pp:
        raise ConfigError(f"--parallel pp={pp},pp_schedule={schedule} needs at least {2 * pp} micro-batches per rank "
                          f"(one per stage); {share} sequences per rank (batch_size / data ranks) in micro-batches of "
                          f"micro_batch_size={micro_batch_size} make {m}")
    return m


def stage_owner(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs `stage` (inverse of `stage_indices`)."""
    if schedule == "dualpipev":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def stage_modules(model: Transformer, pp: int, rank: int, schedule: str, n_microbatches: int = 1,
                  ) -> list[PipelineStageModule]:
    """The stage modules of pipeline rank `rank` (of `pp`), cut by `stage_bounds` with the output stage weighted."""
    n_stages = stage_count(pp, schedule)
    edges = [0, *stage_bounds(len(model.model.layers), n_stages, output_cost(model)), len(model.model.layers)]
    return [PipelineStageModule(model, edges[s], edges[s + 1], n_microbatches)
            for s in stage_indices(rank, pp, schedule)]


def make_schedule(model: Transformer, modules: list[PipelineStageModule], pp_group: dist.ProcessGroup,
                  schedule: str, n_microbatches: int, mtp_loss_weight: float | None | Callable[[], float | None] = None,
                  device: torch.device | str = "cpu", overlap: bool = False) -> object:
    """torch's schedule over `modules` (this rank's, from `stage_modules`) for n_microbatches micro-batches; the
    loss function is the output stage. `mtp_loss_weight`: lambda, or a function giving this step's lambda.
    `overlap` (DualPipeV): its paired forward / backward chunks take turns at expert all-to-alls
    (nanoseek.parallel.overlap) instead of running one after the other."""
    pp, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    n_stages = stage_count(pp, schedule)
    stages = [PipelineStage(mod, s, n_stages, torch.device(device), group=pp_group)
              for mod, s in zip(modules, stage_indices(rank, pp, schedule), strict=True)]
    last = next((m for m in modules if m.last), None)

    def loss_fn(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # target: the labels [B, S], or labels and input ids stacked [B, 2, S] (MTP then embeds the true tokens
        # where labels are masked, see Transformer.output)
        labels, inputs = (target[:, 0], target[:, 1]) if target.dim() == 3 else (target, None)
        pos = model.positions(h.shape[1], device=h.device)
        lam = mtp_loss_weight() if callable(mtp_loss_weight) else mtp_loss_weight
        out = model.output(h, pos, labels, [], inputs=inputs, return_logits=False, mtp_loss_weight=lam)
        if last is not None:  # the MTP modules' MoE loads, and the parts of the loss, for the last stage's record
            load = out.expert_load.detach() if out.expert_load is not None else None
            balance = float(out.balance_loss) if out.balance_loss is not None else 0.0
            last.outputs.append((load, float(out.main_loss), [float(x) for x in out.mtp_losses], balance))
        return out.loss / n_microbatches  # the schedule's `losses` then sum to the step's loss

    cls = SCHEDULES[schedule]
    sched = cls(stages if schedule in MULTI else stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if overlap:
        if schedule != "dualpipev":
            raise ConfigError(f"overlap pairs DualPipeV's forward and backward chunks; pp_schedule={schedule} has none")
        sched.register_custom_function(OVERLAP_F_B, overlap_f_b(Turns()))
    return sched


def build_pipeline(model: Transformer, pp_group: dist.ProcessGroup, schedule: str, n_microbatches: int,
                   mtp_loss_weight: float | None = None, device: torch.device | str = "cpu",
                   ) -> tuple[object, list[PipelineStageModule]]:
    """(the schedule, this rank's stage modules). Call `schedule.step(ids)` on the rank holding stage 0,
    `schedule.step(target=labels, losses=out)` where the last stage is (both, on DualPipeV's rank 0; `sum(out)` is
    the step's loss without the balance losses of the stages, see `PipelineStageModule.take`) and
    `schedule.step()` elsewhere; then `sync_tied_embedding`, clip and step the optimizer over the stages' params."""
    pp, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    modules = stage_modules(model, pp, rank, schedule, n_microbatches)
    return make_schedule(model, modules, pp_group, schedule, n_microbatches, mtp_loss_weight, device), modules


def sync_tied_embedding(model: Transformer, modules: list[PipelineStageModule], pp_group: dist.ProcessGroup,
                        schedule: str) -> None:
    """Where the first and the last stage sit on different ranks and both use the embedding (MTP), the two copies'
    gradients (or their FSDP shards) are exchanged and summed, so both copies take the same step; ranks with neither
    do nothing. Under DualPipeV both are on rank 0: one copy, nothing to do."""
    pp = dist.get_world_size(pp_group)
    if not len(model.mtp) or schedule == "dualpipev" or pp == 1:
        return
    first, last = any(m.first for m in modules), any(m.last for m in modules)
    if first == last:  # neither (a middle rank), or both (impossible outside DualPipeV at pp > 1)
        return
    emb = model.model.embed_tokens.weight
    grad = emb.grad if emb.grad is not None else torch.zeros_like(emb)
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    other = torch.empty_like(local)
    peer = dist.get_global_rank(pp_group, stage_owner(0 if last else pp - 1, pp, schedule))
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, local.contiguous(), peer, pp_group),
                                     dist.P2POp(dist.irecv, other, peer, pp_group)]):
        w.wait()
    local.add_(other)
    if emb.grad is None:
        emb.grad = grad


def stage_parameters(modules: list[PipelineStageModule]) -> list[nn.Parameter]:
    """The parameters this rank trains (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


@dataclass
class PipelineStep:
    """What one pipelined step computed on this rank: the MoE loads of the layers it holds (gate index in
    `Transformer.moe_gates()` order -> [this rank's sequences, E]) and its parts of the step's loss (the last
    stage's main and mean MTP loss, 0 elsewhere; the balance losses of this rank's stages)."""

    loads: dict[int, torch.Tensor]
    main_loss: float
    mtp_loss: float
    balance_loss: float


class Pipeline:
    """This rank's stages of `model`, pipelined over ctx's "pp" ranks by `ctx.cfg.pp_schedule` and parallelized
    (expert parallelism, FSDP2) over its stage's dp x ep ranks: what the Trainer runs under `--parallel pp=N`.

        pipe = Pipeline(model, ctx)                      # every rank builds the whole model first (same seed)
        opt = build_optimizer(pipe.parts, cfg)           # this rank's parameters only
        rec = pipe.step(x, y, n_microbatches, mtp_weight)
        loss = pipe.main_loss(x, y)                      # forward only (held-out evaluation), on the last stage

    A rank keeps the blocks it does not run (the model stays whole, so its state-dict names stay the model's);
    they are never trained, and `state_keys` names what this rank holds, for sharded checkpoints."""

    def __init__(self, model: Transformer, ctx: ParallelContext) -> None:
        pc = ctx.cfg
        self.model, self.ctx, self.schedule = model, ctx, pc.pp_schedule
        self.group, self.pp, self.rank = ctx.pp_group, pc.pp, ctx.pp_rank
        check_stages(len(model.model.layers), pc.pp, self.schedule)
        if pc.activation_checkpoint:  # before the stages take their blocks
            apply_activation_checkpointing(model)
        self.modules = stage_modules(model, self.pp, self.rank, self.schedule)
        parallelize(model, ctx, self.modules)
        self.parts = nn.ModuleList(self.modules)  # the optimizer's view: this rank's parameters, each once
        self.first = any(m.first for m in self.modules)
        self.last = next((m for m in self.modules if m.last), None)
        self.mtp_weight: float | None = None
        self._schedules: dict[int, object] = {}
        gate_index = {id(g): i for i, g in enumerate(model.moe_gates())}
        # the gate index of each MoE layer of each module, in the order its forward records their loads
        self._gates = [[gate_index[id(b.mlp.gate)] for b in m.layers if isinstance(b.mlp, MoE)] for m in self.modules]
        self._mtp_gates = [gate_index[id(b.mlp.gate)] for b in model.mtp if isinstance(b.mlp, MoE)]

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once."""
        return stage_parameters(self.modules)

    def shared_parameters(self) -> tuple[nn.Parameter, ...]:
        """This rank's parameters whose gradients another pipeline rank also holds: a last stage's copy of the
        embedding (for MTP, when the first stage is elsewhere); the first stage counts it in the gradient norm."""
        emb = self.model.model.embed_tokens.weight
        return (emb,) if self.last is not None and not self.first and any(p is emb for p in self.parameters()) else ()

    def state_keys(self) -> set[str]:
        """The model state-dict names of the parameters and buffers this rank holds."""
        held = {id(t) for m in self.modules for t in (*m.parameters(), *m.buffers())}
        model = self.model
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        return {_clean_fqn(n) for n, t in named if id(t) in held}

    def _schedule(self, n_microbatches: int) -> object:
        if n_microbatches not in self._schedules:  # one per micro-batch count (a batch-size ramp changes it)
            self._schedules[n_microbatches] = make_schedule(self.model, self.modules, self.group, self.schedule,
                                                            n_microbatches, lambda: self.mtp_weight, self.ctx.device,
                                                            self.ctx.cfg.overlap)
        return self._schedules[n_microbatches]

    def step(self, x: torch.Tensor, y: torch.Tensor, n_microbatches: int, mtp_weight: float | None) -> PipelineStep:
        """Forward and backward of this rank's sequences x, y [B, S] in n_microbatches micro-batches (every rank of
        the pipeline passes the same x, y; only the first stage reads x and the last y). Gradients accumulate, each
        micro-batch weighted 1 / n_microbatches."""
        self.mtp_weight = mtp_weight
        sched = self._schedule(n_microbatches)
        for m in self.modules:
            m.n_microbatches = n_microbatches
        losses: list[torch.Tensor] = []
        target = torch.stack([y, x], dim=1)  # labels and input ids: see make_schedule's loss function
        if self.first and self.last is not None:
            sched.step(x, target=target, losses=losses)  # type: ignore[attr-defined]
        elif self.first:
            sched.step(x)  # type: ignore[attr-defined]
        elif self.last is not None:
            sched.step(target=target, losses=losses)  # type: ignore[attr-defined]
        else:
            sched.step()  # type: ignore[attr-defined]
        sync_tied_embedding(self.model, self.modules, self.group, self.schedule)
        outputs = list(self.last.outputs[-n_microbatches:]) if self.last is not None else []
        loads: dict[int, torch.Tensor] = {}
        balance = 0.0
        for m, gates in zip(self.modules, self._gates, strict=True):
            layer_loads, b = m.take(n_microbatches)
            balance += b
            loads.update(zip(gates, layer_loads, strict=True))
        main = mtp = 0.0
        if outputs:
            main = sum(o[1] for o in outputs) / len(outputs)
            mtp = sum(sum(o[2]) / max(len(o[2]), 1) for o in outputs) / len(outputs)
            balance += sum(o[3] for o in outputs) / len(outputs)
            if self._mtp_gates:
                mtp_loads = torch.cat([o[0] for o in outputs], dim=1)  # [MTP MoE layers, sequences, E]
                loads.update(zip(self._mtp_gates, mtp_loads, strict=True))
        return PipelineStep(loads, main, mtp, balance)

    @torch.no_grad()
    def main_loss(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """The main model's loss on x, y (every rank of the pipeline passes the same): a forward through the stages
        in order, hidden states sent point to point; the value on the rank of the last stage, None elsewhere."""
        n_stages = stage_count(self.pp, self.schedule)
        mine = dict(zip(stage_indices(self.rank, self.pp, self.schedule), self.modules, strict=True))
        peer = [dist.get_global_rank(self.group, stage_owner(s, self.pp, self.schedule)) for s in range(n_stages)]
        shape = (*x.shape, self.model.config.hidden_size)
        h, loss = None, None
        for s in range(n_stages):
            mod = mine.get(s)
            if mod is None:
                continue
            if s > 0 and (s - 1) not in mine:
                h = torch.empty(shape, dtype=torch.float32, device=self.ctx.device)
                dist.recv(h, peer[s - 1], group=self.group)
            h = mod(x.to(self.ctx.device) if s == 0 else h)
            if mod.last:
                pos = self.model.positions(h.shape[1], device=h.device)
                out = self.model.output(h, pos, y.to(h.device), [], mtp=False, return_logits=False)
                loss = float(out.main_loss)
            elif (s + 1) not in mine:
                dist.send(h.float().contiguous(), peer[s + 1], group=self.group)
        for m in self.modules:
            m.calls.clear()
            m.outputs.clear()
        return loss


def _clean_fqn(name: str) -> str:
    """A parameter name without the activation-checkpoint wrapper's component (as get_state_dict writes it)."""
    return name.replace("_checkpoint_wrapped_module.", "")
