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
Each micro-batch's loss enters with weight 1 / micro-batches (the loss function's value and the balance losses' injected
gradient), so a step equals the single-process step on the whole batch; the schedule's own gradient scaling is off,
since it would scale a parameter once per stage that holds it (the embedding of DualPipeV's rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ..model import Transformer
from ..model.stats import attention_params, moe_params

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
        # the last stage, per micro-batch: the MTP modules' loads and the parts of the loss (main, MTP losses)
        self.outputs: list[tuple[torch.Tensor | None, float, list[float]]] = []

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


def build_pipeline(model: Transformer, pp_group: dist.ProcessGroup, schedule: str, n_microbatches: int,
                   mtp_loss_weight: float | None = None, device: torch.device | str = "cpu",
                   ) -> tuple[object, list[PipelineStageModule]]:
    """(the schedule, this rank's stage modules). Call `schedule.step(ids)` on the rank holding stage 0,
    `schedule.step(target=labels, losses=out)` where the last stage is (both, on DualPipeV's rank 0; `sum(out)` is
    the step's loss without the balance losses of the stages, see `PipelineStageModule.take`) and
    `schedule.step()` elsewhere; then `sync_tied_embedding`, clip and step the optimizer over the stages' params."""
    pp, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    n_stages = pp * (2 if schedule in MULTI else 1)
    edges = [0, *stage_bounds(len(model.model.layers), n_stages, output_cost(model)), len(model.model.layers)]
    modules, stages = [], []
    for s in stage_indices(rank, pp, schedule):
        mod = PipelineStageModule(model, edges[s], edges[s + 1], n_microbatches)
        modules.append(mod)
        stages.append(PipelineStage(mod, s, n_stages, torch.device(device), group=pp_group))
    last = next((m for m in modules if m.last), None)

    def loss_fn(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos = model.positions(h.shape[1], device=h.device)
        out = model.output(h, pos, labels, [], return_logits=False, mtp_loss_weight=mtp_loss_weight)
        if last is not None:  # the MTP modules' MoE loads, and the parts of the loss, for the last stage's record
            load = out.expert_load.detach() if out.expert_load is not None else None
            last.outputs.append((load, float(out.main_loss), [float(x) for x in out.mtp_losses]))
        return out.loss / n_microbatches  # the schedule's `losses` then sum to the step's loss

    cls = SCHEDULES[schedule]
    sched = cls(stages if schedule in MULTI else stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return sched, modules


def sync_tied_embedding(model: Transformer, modules: list[PipelineStageModule], pp_group: dist.ProcessGroup,
                        schedule: str) -> None:
    """Where the first and the last stage sit on different ranks and both use the embedding (MTP), sum its two
    copies' gradients (every rank joins; a rank without either adds zeros). Under DualPipeV both are on rank 0:
    one copy, nothing to do."""
    if not len(model.mtp) or schedule == "dualpipev" or dist.get_world_size(pp_group) == 1:
        return
    emb = model.model.embed_tokens.weight
    on_rank = [m for m in modules if m.first or m.last]
    g = emb.grad if on_rank and emb.grad is not None else torch.zeros_like(emb)
    dist.all_reduce(g, group=pp_group)
    if on_rank:
        emb.grad = g


def stage_parameters(modules: list[PipelineStageModule]) -> list[nn.Parameter]:
    """The parameters this rank trains (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())
