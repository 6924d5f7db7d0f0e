"""Redundant experts (V3 §3.4): replicate the most loaded experts and place the replicas so that every GPU carries
about the same load, from an expert-load matrix [layers, experts] (e.g. a moving average of observed loads).

    hierarchical  (the number of nodes divides the number of expert groups; prefill)
                  expert groups -> nodes, balanced, whole groups per node (group-limited routing stays node-limited)
                  -> replicas within each node (one more for the expert with the highest load per replica, until
                  the node's slots are full) -> replicas -> the node's GPUs, balanced, equally many per GPU
    global        (otherwise; decode, large EP) the same over one node holding every GPU

Serving with a plan (`install_plan`): every MoE layer's dispatch sends each (token, expert) pair to one of the
expert's replicas in turn, over physical slots holding copies of the experts' weights; the outputs do not change.

Packing is largest-first onto the lightest bin that still has room, then improved by pairwise swaps between the
heaviest bin and the others while a swap lowers the heavier of the two. Physical slot r lives on GPU
r // (replicas / GPUs); a replica carries its expert's load divided by the expert's replica count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model import Transformer
from ..model.moe import Experts, MoE, dispatch_combine


@dataclass
class Plan:
    """phy2log [L, R]: the logical expert of each physical slot; log2phy [L, E, max replicas]: the slots of each
    expert (-1 padded); logcnt [L, E]: replicas per expert."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    def gpu_load(self, load: torch.Tensor, num_gpus: int) -> torch.Tensor:
        """[L, GPUs] load each GPU carries under this plan (each expert's load split evenly over its replicas)."""
        per_replica = load.double().gather(1, self.phy2log) / self.logcnt.double().gather(1, self.phy2log)
        return per_replica.view(load.shape[0], num_gpus, -1).sum(-1)


def unbalanced_gpu_load(load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, GPUs] load of the plain placement: no replicas, experts split over the GPUs in order (expert e on GPU
    e * GPUs // E)."""
    L, E = load.shape
    gpu = (torch.arange(E) * num_gpus // E).expand(L, E)
    return torch.zeros(L, num_gpus, dtype=torch.float64).scatter_add_(1, gpu, load.double())


def balanced_packing(weights: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each item: len(weights) / n_bins items per bin, loads as even as the heuristic finds."""
    n = len(weights)
    if n % n_bins:
        raise ValueError(f"{n} items do not split into {n_bins} equal bins")
    per = n // n_bins
    bins = np.full(n, -1)
    load, count = np.zeros(n_bins), np.zeros(n_bins, dtype=int)
    for i in np.argsort(-weights, kind="stable"):  # largest first, onto the lightest bin with room
        open_bins = np.flatnonzero(count < per)
        b = open_bins[np.argmin(load[open_bins])]
        bins[i], load[b], count[b] = b, load[b] + weights[i], count[b] + 1
    for _ in range(4 * n):  # swaps out of the heaviest bin while they lower it
        hi = int(np.argmax(load))
        mine = np.flatnonzero(bins == hi)
        best, best_peak = None, load[hi]
        for b in range(n_bins):
            if b == hi:
                continue
            theirs = np.flatnonzero(bins == b)
            delta = weights[mine][:, None] - weights[theirs][None, :]  # moved from hi to b, minus the way back
            peak = np.maximum(load[hi] - delta, load[b] + delta)
            k = np.unravel_index(np.argmin(peak), peak.shape)
            if peak[k] < best_peak - 1e-9:
                best, best_peak = (mine[k[0]], theirs[k[1]], b, delta[k]), peak[k]
        if best is None:
            break
        i, j, b, d = best
        bins[i], bins[j] = b, hi
        load[hi] -= d
        load[b] += d
    return bins


def replicate(weights: np.ndarray, n_slots: int) -> np.ndarray:
    """Replica count per expert: one each, then one more at a time for the highest load per replica."""
    if n_slots < len(weights):
        raise ValueError(f"{n_slots} slots cannot hold {len(weights)} experts")
    cnt = np.ones(len(weights), dtype=int)
    for _ in range(n_slots - len(weights)):
        cnt[np.argmax(weights / cnt)] += 1
    return cnt


def _plan_layer(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """phy2log of one layer."""
    E = len(w)
    group_of = np.arange(E) // (E // num_groups)
    node_of_group = balanced_packing(np.bincount(group_of, weights=w, minlength=num_groups), num_nodes)
    slots_per_node, gpus_per_node = num_replicas // num_nodes, num_gpus // num_nodes
    phy2log = []
    for node in range(num_nodes):
        experts = np.flatnonzero(node_of_group[group_of] == node)
        cnt = replicate(w[experts], slots_per_node)
        replicas = np.repeat(experts, cnt)  # logical expert of each replica
        gpu = balanced_packing(np.repeat(w[experts] / cnt, cnt), gpus_per_node)
        for g in range(gpus_per_node):
            phy2log.extend(sorted(replicas[gpu == g].tolist()))
    return np.array(phy2log)


def rebalance(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> Plan:
    """The replication and placement plan for an expert-load matrix [layers, experts]: hierarchical when the nodes
    divide the expert groups, global otherwise."""
    load = torch.as_tensor(load)
    if load.dim() == 1:
        load = load[None]
    L, E = load.shape
    if num_replicas % num_gpus or num_gpus % num_nodes or E % num_groups:
        raise ValueError(f"replicas ({num_replicas}) must split over GPUs ({num_gpus}), GPUs over nodes "
                         f"({num_nodes}) and experts ({E}) into groups ({num_groups})")
    if num_groups % num_nodes:  # global: one node of every GPU, groups ignored
        num_groups, num_nodes = 1, 1
    w = load.double().cpu().numpy()
    phy2log = torch.from_numpy(np.stack([_plan_layer(w[i], num_replicas, num_groups, num_nodes, num_gpus)
                                         for i in range(L)])).long()
    logcnt = torch.zeros(L, E, dtype=torch.long).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    log2phy = torch.full((L, E, int(logcnt.max())), -1, dtype=torch.long)
    for i in range(L):
        seen = [0] * E
        for r, e in enumerate(phy2log[i].tolist()):
            log2phy[i, e, seen[e]] = r
            seen[e] += 1
    return Plan(phy2log, log2phy, logcnt)


# ---- serving with a plan: each (token, expert) pair goes to one of the expert's replicas ----------------------
class ReplicatedExperts(Experts):
    """The physical expert slots of one MoE layer under a plan: slot r holds a copy of expert phy2log[r]'s weights
    (taken when the plan is installed: for inference, whose weights do not change)."""

    def __init__(self, experts: Experts, phy2log: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.n_experts, self.inter = len(phy2log), experts.inter
        w1, w2 = experts.weights()
        idx = phy2log.to(w1.device)
        self.gate_up_proj = nn.Parameter(w1.detach()[idx], requires_grad=False)
        self.down_proj = nn.Parameter(w2.detach()[idx], requires_grad=False)


class ReplicaDispatch:
    """`MoE.dispatch` for one layer under a plan (phy2log [R], log2phy [E, M], logcnt [E] of that layer): the n-th
    (token, expert e) pair of a batch goes to replica n mod logcnt[e] of e, so each replica gets an equal share of its
    expert's tokens (V3 §3.4: the redundant experts of inference); the outputs are the unreplicated layer's."""

    def __init__(self, experts: Experts, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        self.physical = ReplicatedExperts(experts, phy2log)
        self.log2phy, self.logcnt = log2phy, logcnt
        self.slot_load = torch.zeros(len(phy2log), dtype=torch.long)  # tokens each slot received since install

    def slots(self, idx: torch.Tensor) -> torch.Tensor:
        """The physical slot of each (token, expert) pair of idx [T, K] (logical experts)."""
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.logcnt))
        starts = counts.cumsum(0) - counts
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # n-th pair of its expert
        cnt, table = self.logcnt.to(flat.device), self.log2phy.to(flat.device)
        return table[flat, nth % cnt[flat]].view_as(idx)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int,
                 experts: Experts) -> torch.Tensor:
        slot = self.slots(idx)
        self.slot_load += torch.bincount(slot.reshape(-1).cpu(), minlength=len(self.slot_load))
        return dispatch_combine(x, slot, weights, self.physical.n_experts, self.physical)


def install_plan(model: Transformer, plan: Plan) -> list[ReplicaDispatch]:
    """Route the main model's MoE layers (row i of the plan: the i-th MoE layer) through their replicas. Each
    layer's dispatch is replaced in one assignment, so a forward running meanwhile computes the same outputs."""
    moes = [b.mlp for b in model.model.layers if isinstance(b.mlp, MoE)]
    if plan.phy2log.shape[0] != len(moes):
        raise ValueError(f"the plan has {plan.phy2log.shape[0]} layers; the model has {len(moes)} MoE layers")
    out = []
    for i, moe in enumerate(moes):
        d = ReplicaDispatch(moe.experts, plan.phy2log[i], plan.log2phy[i], plan.logcnt[i])
        moe.dispatch = d
        out.append(d)
    return out


def remove_plan(model: Transformer) -> None:
    """Back to the plain dispatch (every expert once)."""
    for b in model.model.layers:
        if isinstance(b.mlp, MoE) and isinstance(b.mlp.dispatch, ReplicaDispatch):
            b.mlp.dispatch = dispatch_combine
