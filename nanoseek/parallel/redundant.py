"""Redundant experts in expert-parallel training (`--parallel ep=N,redundant=R,replan_every=S`): each ep rank holds,
beside its own E/N experts, R slots with replicas of other ranks' hot experts, so that the tokens of a hot expert
are computed on several ranks and no rank waits on the most loaded one.

    plan       every rank plans the same from the expert loads the trainer gathers each step (the loads that move
               the auxiliary-loss-free biases): the first plan after the first step, then one every S steps from the
               loads since the last (nanoseek.parallel.eplb.rebalance_owned: owners fixed, replicas where they
               lower the heaviest rank's load; with nodes > 1 on their owner's node, so routing stays node-limited)
    weights    in each forward of a layer, every owner sends the weights of its replicated experts to the ranks
               holding them (all_to_all_single of weight rows in the ep group; `RedundantDispatch.with_replicas`);
               the replica slots compute with those copies, bit for bit the owner's
    tokens     the n-th (token, expert e) pair of a rank goes to replica (n + rank) mod count(e) (the serving rule,
               nanoseek.parallel.eplb.replica_slots), then through the expert-parallel all-to-all as usual
    gradients  the backward of that all-to-all returns each replica's weight gradient to the owner, where it is summed
               into the owner's gradient: the optimizer, the checkpoints and the model are the unreplicated run's
               (the same losses up to the order of float sums; replicas are never parameters, so checkpoints hold
               none, and a resumed run re-plans after its first step)

Cost per MoE layer and forward (each micro-batch; again in activation checkpointing's recomputation): the ep group
moves N x R experts' weights, 3 x hidden x moe_intermediate values each (R experts into every rank), and as many
gradient values back in the backward -- per rank R x 3 H I x bytes each way (V3's sizes in BF16: 88 MB per replica,
beside about 0.7 GB of token rows -- FP8 out, BF16 back -- a rank dispatches and combines per layer for a 4K-token
micro-batch). Each rank also keeps a copy of its own and its replica experts' weights for the backward (E/N + R
experts per layer), and planning takes about 0.2 s per layer at V3's size (256 experts over 64 ranks, R = 1) on the
CPU, every S steps. `Traffic` counts the weight bytes sent (`replica_bytes`) and the rows each rank's slots computed
(`expert_rows`); the trainer logs them as `ep_replica_bytes` and `ep_rows_max_over_mean`.

Departure from V3: V3 deploys redundant experts for inference only (§3.4: prefilling and decoding, re-planned from
the online load every 10 minutes); its training balances the load with the auxiliary-loss-free bias (§2.1.2) and
node-limited routing alone. Here the same idea serves training, where the replicas' weights change every step and
must therefore be sent each step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..model.moe import Experts
from .eplb import Plan, owned_capacity, plan_of, rebalance_owned, replica_slots
from .expert import ExpertParallelDispatch, _AllToAll, recomputing


def check_redundant(n_experts: int, ep: int, nodes: int, redundant: int) -> None:
    """ConfigError (naming `redundant`) unless each ep rank can hold `redundant` distinct replicas of other ranks'
    experts (of its own node when the ep group spans several)."""
    cap = owned_capacity(n_experts, ep, nodes)
    if redundant > cap:
        where = f"of its node's {n_experts // nodes} experts " if nodes > 1 else ""
        raise ConfigError(f"--parallel redundant={redundant}: an ep rank can hold at most {cap} replicas (the experts "
                          f"{where}that other ranks own: {n_experts} routed experts over ep={ep}"
                          + (f" on nodes={nodes}" if nodes > 1 else "") + ")")


class RedundantDispatch(ExpertParallelDispatch):
    """`MoE.dispatch` of one MoE layer with redundant experts: the expert-parallel dispatch over the slots of a plan
    (`set_plan`; before the first, every expert once, on its owner). Attached to the layer's Experts by
    `attach_replicas`, whose `weights()` then return this rank's experts followed by its replicas."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, nodes: int = 1, fp8: bool = False,
                 n_group: int = 1) -> None:
        super().__init__(group, n_experts, nodes, fp8, n_group)
        self.controller: ExpertReplicas | None = None  # the plan's keeper (ExpertReplicas.add)
        self.set_plan(None)

    def set_plan(self, phy2log: torch.Tensor | None) -> None:
        """Route through the slots phy2log [ep x slots per rank] (logical expert of each; a row of
        `rebalance_owned`): rank r's first E/ep slots must hold its own experts, the rest replicas of other ranks'
        experts (None: no replicas)."""
        E, ep, local = self.n_experts, self.ep, self.local
        own = torch.arange(E).view(ep, local)
        p2l = own.flatten() if phy2log is None else torch.as_tensor(phy2log).long().cpu()
        if p2l.numel() % ep:
            raise ValueError(f"{p2l.numel()} expert slots do not split over ep={ep} ranks")
        table = p2l.view(ep, -1).clone()
        if table.shape[1] < local or not torch.equal(table[:, :local], own):
            raise ValueError("each rank's first slots must hold its own experts (rebalance_owned's layout)")
        # a rank's replicas in expert order, so that they arrive grouped by owner (all_to_all_single's order)
        table[:, local:] = table[:, local:].sort(dim=1).values
        replicas = table[:, local:]
        owner = replicas // local
        if (self.node_of_rank[owner] != self.node_of_rank[:, None]).any():
            raise ValueError("a replica on another node than its owner would break node-limited routing")
        plan = plan_of(table.flatten()[None], E)
        self.per_rank = table.shape[1]
        self.log2phy, self.logcnt = plan.log2phy[0], plan.logcnt[0]
        self.recv_splits = torch.bincount(owner[self.rank], minlength=ep).tolist()  # replica rows from each owner
        mine = [replicas[b][owner[b] == self.rank] - self.rank * local for b in range(ep)]  # sent to rank b
        self.send_splits = [len(m) for m in mine]
        self.send_idx = torch.cat(mine)

    def route(self, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        return replica_slots(idx, self.log2phy, self.logcnt, offset=self.rank), self.per_rank

    def with_replicas(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts (w1 [E/ep, 2I, H], w2 [E/ep, H, I]) followed by its replica slots' copies of their
        owners' weights, fetched now; the copies' gradients flow back to the owners' weights."""
        if self.per_rank == self.local:
            return w1, w2
        idx = self.send_idx.to(w1.device)
        rows = torch.cat([w1.index_select(0, idx).flatten(1), w2.index_select(0, idx).flatten(1)], dim=1)
        if not recomputing():
            self.traffic.replica_bytes += rows.numel() * rows.element_size()
        got = _AllToAll.apply(rows, self.recv_splits, self.send_splits, self.group, None)
        r1, r2 = got.split([w1[0].numel(), w2[0].numel()], dim=1)
        return (torch.cat([w1, r1.view(-1, *w1.shape[1:])]), torch.cat([w2, r2.view(-1, *w2.shape[1:])]))


class ReplicaWeights:
    """Mixed into the class of a layer's Experts (`attach_replicas`): `weights()` returns this rank's experts
    followed by the replicas of its redundant slots."""

    _redundant: RedundantDispatch

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = super().weights()  # type: ignore[misc]
        return self._redundant.with_replicas(w1, w2)


_WITH_REPLICAS: dict[type, type] = {}


def attach_replicas(experts: Experts, dispatch: RedundantDispatch) -> None:
    """In place: `experts` (of any Experts class: the FP8 and emulated-BF16 ones call `weights()` too) computes over
    its own and its replica slots (its class becomes a subclass with ReplicaWeights, as FSDP2 swaps classes;
    parameters unchanged)."""
    base = type(experts)
    if base not in _WITH_REPLICAS:
        _WITH_REPLICAS[base] = type(f"Redundant{base.__name__}", (ReplicaWeights, base), {})
    experts.__class__ = _WITH_REPLICAS[base]
    experts._redundant = dispatch  # type: ignore[attr-defined]


class ExpertReplicas:
    """The redundant experts of one rank's MoE layers: their dispatches, and the plan fed by the expert loads of
    every training step (`observe`; every rank sees the same loads and so makes the same plan)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, nodes: int, fp8: bool, n_group: int,
                 redundant: int, replan_every: int) -> None:
        self.ep = dist.get_world_size(group)
        check_redundant(n_experts, self.ep, nodes, redundant)
        self.group, self.n_experts, self.nodes, self.fp8, self.n_group = group, n_experts, nodes, fp8, n_group
        self.redundant, self.replan_every = redundant, replan_every
        self.layers: list[tuple[int, RedundantDispatch]] = []  # (gate index in Transformer.moe_gates(), dispatch)
        self.window: torch.Tensor | None = None  # loads [layers, E] since the last plan
        self.steps = 0  # steps observed since the last plan
        self.plan: Plan | None = None
        self.plans = 0

    def add(self, gate_index: int, experts: Experts) -> RedundantDispatch:
        """A dispatch for the MoE layer of gate `gate_index` (in `Transformer.moe_gates()` order), attached to its
        experts."""
        d = RedundantDispatch(self.group, self.n_experts, self.nodes, self.fp8, self.n_group)
        attach_replicas(experts, d)
        d.controller = self
        self.layers.append((gate_index, d))
        return d

    def observe(self, load: torch.Tensor) -> bool:
        """One step's expert loads [gates, ..., E] (every MoE layer of the model, `moe_gates()` order; the same on
        every rank). Re-plans after the first step and then every `replan_every` steps; True when it did."""
        load = load.detach().double().cpu()
        load = load.reshape(load.shape[0], -1, load.shape[-1]).sum(1)[[i for i, _ in self.layers]]
        self.window = load if self.window is None else self.window + load
        self.steps += 1
        if self.plan is not None and self.steps < self.replan_every:
            return False
        self.replan(self.window)
        self.window, self.steps = None, 0
        return True

    def replan(self, load: torch.Tensor) -> Plan:
        """Plan from loads [this rank's MoE layers, E] and route through the plan from the next forward on."""
        plan = rebalance_owned(load, self.ep, self.redundant, self.nodes)
        for (_, d), row in zip(self.layers, plan.phy2log, strict=True):
            d.set_plan(row)
        self.plan = plan
        self.plans += 1
        return plan


def expert_replicas(model: nn.Module) -> ExpertReplicas | None:
    """The redundant experts `parallelize` attached to the model's MoE layers (None: none)."""
    for m in model.modules():
        if isinstance(m, ReplicaWeights):
            return m._redundant.controller
    return None
