"""`parallelize(model, ctx)`: an unmodified Transformer spread over the mesh of a ParallelContext (torchtitan's seam).

    expert parallelism   routed experts -> DTensors Shard(0) on "ep"; MoE.dispatch -> all-to-all (parallel/expert.py),
                         one dispatch per MoE layer; with `redundant`, replica slots (parallel/redundant.py)
    activation ckpt      each block (main and MTP) recomputed in the backward (optional)
    FSDP2                experts: fully_shard over "dp"; each block and the root: over the "dp" x "ep" ranks
    pipeline             (pp > 1) the roots are a rank's stage modules, see nanoseek.parallel.pipeline

Gradients: FSDP averages the dense gradients over the dp x ep ranks, which is the gradient of the mean of the ranks'
losses. An expert's gradient already sums, through the all-to-all, the contributions of every ep rank's tokens; the
experts' reduce-scatter over "dp" therefore divides by dp x ep, not by dp.
Departure from V3 (ZeRO-1 data parallelism, §3.2): parameters are sharded too (ZeRO-3, FSDP2), optionally kept
gathered between forward and backward (`reshard_after_forward=false`, ZeRO-2-like).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model import Transformer
from ..model.moe import MoE
from .expert import ExpertParallelDispatch, Traffic
from .launch import ParallelContext
from .redundant import ExpertReplicas


def _blocks(model: Transformer) -> list[nn.Module]:
    return [*model.model.layers, *model.mtp]


def _part_blocks(part: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(main blocks, MTP blocks) of a pipeline stage module (nanoseek.parallel.pipeline)."""
    return list(part.layers), list(part.mtp) if getattr(part, "last", False) else []


def apply_expert_parallel(model: Transformer, ctx: ParallelContext,
                          blocks: list[nn.Module] | None = None) -> ExpertReplicas | None:
    """Split every MoE layer's routed experts (of `blocks`, default all) over the ep ranks and route its tokens
    with all-to-all; with `redundant` replica slots per rank, through them (returned: the plan's keeper, which the
    trainer feeds with the expert loads)."""
    cfg, pc = model.config, ctx.cfg
    args = (ctx.ep_group, cfg.n_routed_experts, ctx.ep_nodes, pc.fp8_dispatch, cfg.n_group)
    replicas = ExpertReplicas(*args, pc.redundant, pc.replan_every) if pc.redundant else None
    gate_index = {id(g): i for i, g in enumerate(model.moe_gates())}
    ep_mesh = ctx.mesh["ep"]
    for block in _blocks(model) if blocks is None else blocks:
        moe = block.mlp
        if not isinstance(moe, MoE):
            continue
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                                    requires_grad=p.requires_grad))
        if replicas is None:
            moe.dispatch = ExpertParallelDispatch(*args)
        else:
            moe.dispatch = replicas.add(gate_index[id(moe.gate)], moe.experts)
    return replicas


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block (main and MTP) in the backward."""
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(layer)
    for i, mtp in enumerate(model.mtp):
        model.mtp[i] = checkpoint_wrapper(mtp)


def parallelize(model: Transformer, ctx: ParallelContext, parts: list[nn.Module] | None = None) -> Transformer:
    """In place: expert parallelism (ep > 1), activation checkpointing (if asked) and FSDP2 over ctx's mesh.
    `parts`: a pipeline rank's stage modules (nanoseek.parallel.pipeline, built after activation checkpointing):
    only their blocks are parallelized, and each part, not the model, is an FSDP root."""
    pc = ctx.cfg
    if parts is None:
        if pc.activation_checkpoint:
            apply_activation_checkpointing(model)
        main, mtp = list(model.model.layers), list(model.mtp)
    else:
        split = [_part_blocks(p) for p in parts]
        main, mtp = [b for m, _ in split for b in m], [b for _, t in split for b in t]
    if pc.ep > 1:
        apply_expert_parallel(model, ctx, main + mtp)
    # on CUDA: bf16 compute, fp32 gradient reduction; on the CPU everything stays fp32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if ctx.device.type == "cuda" else MixedPrecisionPolicy())
    # Experts.forward returns a view (grouped_linear's gradient-contiguity identity); nothing writes into it in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view")
    # (see below: under pipeline parallelism blocks stay gathered through the step)
    reshard_blocks = pc.reshard_after_forward and parts is None
    for block in main + mtp:
        moe = block.mlp
        if pc.ep > 1 and isinstance(moe, MoE):
            fully_shard(moe.experts, mesh=ctx.mesh["dp"], reshard_after_forward=reshard_blocks, mp_policy=mp)
            # an expert's gradient sums every data rank's tokens (through the all-to-all): divide by all of them
            moe.experts.set_gradient_divide_factor(float(ctx.data_world))  # type: ignore[operator]
            # sum, then divide (gloo has no pre-scaled sum); not at dp = 1, where torch 2.13 would divide twice
            if pc.dp > 1:
                moe.experts.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        # an MTP module's output norm is applied after its forward (Transformer.logits): it stays gathered. Under
        # pipeline parallelism every block stays gathered from its first micro-batch's forward to the step's gradient
        # reduction (as torchtitan does, saving an all-gather per micro-batch); with DualPipeV it must: a micro-batch's
        # deferred weight gradient (its W step) runs after the next micro-batch's forward, and a block resharded by
        # that forward loses it (torch 2.13)
        reshard = reshard_blocks and not any(block is b for b in mtp)
        fully_shard(block, mesh=ctx.dense_mesh, reshard_after_forward=reshard, mp_policy=mp)
    for root in [model] if parts is None else parts:
        # DualPipeV's rank 0 holds the first and the last stage, both with the embedding (MTP embeds with it): the
        # first stage's FSDP root owns it; the last stage keeps it as a parameter, so that its deferred weight
        # gradient (the schedule's W step) still reaches the embedding
        ignored = ({model.model.embed_tokens.weight} if parts is not None and getattr(root, "last", False)
                   and not root.first and any(p.first for p in parts) and hasattr(root, "embed_tokens") else None)
        fully_shard(root, mesh=ctx.dense_mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    return model


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """A model built on the meta device and parallelized: allocate each rank's shards on `device` and initialise
    them (`Transformer.init_weights` on the DTensor shards). No rank ever holds the whole model. Every parameter is
    sharded (none replicated), so each rank draws its shards from its own seed (DTensor's random ops on the CPU
    would give every shard the same values); the values differ from a single process's initialisation."""
    model.to_empty(device=device)
    torch.manual_seed(seed + 1_000_003 * dist.get_rank())
    model.init_weights()


def expert_traffic(model: nn.Module) -> Traffic | None:
    """The all-to-all traffic of the model's expert-parallel dispatches since the last call (None without EP)."""
    seen: dict[int, ExpertParallelDispatch] = {}
    for m in model.modules():
        d = getattr(m, "dispatch", None)
        if isinstance(m, MoE) and isinstance(d, ExpertParallelDispatch):
            seen[id(d)] = d
    if not seen:
        return None
    total = Traffic()
    for d in seen.values():
        t = d.take()
        for k, v in t.to_dict().items():
            setattr(total, k, max(getattr(total, k), v) if k == "max_nodes_per_token" else getattr(total, k) + v)
    return total


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ctx: ParallelContext,
                   params: list[nn.Parameter] | None = None, counted_elsewhere: tuple[nn.Parameter, ...] = ()) -> float:
    """torch.nn.utils.clip_grad_norm_ for a parallelized model, whose gradients are shards on two meshes (dense
    over a stage's dp x ep ranks, experts over dp x ep) and, under pipeline parallelism, split between stages: every
    element lives on exactly one rank, so the squared norm is the sum of the local squares over all ranks.
    `params`: this rank's (default: the model's); `counted_elsewhere`: those of them whose gradient another rank
    holds too (a pipeline's second copy of a tied embedding): clipped here, counted there.
    Returns the total norm before clipping."""
    grads, skip = [], {id(p) for p in counted_elsewhere}
    for p in model.parameters() if params is None else params:
        if p.grad is None:
            continue
        if not isinstance(p.grad, DTensor):
            raise TypeError("clip_grad_norm expects a model parallelized by nanoseek.parallel (DTensor gradients)")
        grads.append((p.grad.to_local(), id(p) not in skip))
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for g, counted in grads:
        if counted:
            sq += g.double().pow(2).sum()
    total = math.sqrt(ctx.all_reduce(sq).item())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g, _ in grads:
            g.mul_(coef)
    return total
