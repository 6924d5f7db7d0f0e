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

Training (`rebalance_owned`, nanoseek.parallel.redundant) plans differently: each GPU keeps its own experts, whose
weights the optimizer updates there, and adds a fixed number of replicas of other GPUs' experts (greedy, then a
local search). Both route with `replica_slots`: the n-th pair of an expert to its replica n mod count.
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
    return plan_of(np.stack([_plan_layer(w[i], num_replicas, num_groups, num_nodes, num_gpus) for i in range(L)]), E)


def plan_of(phy2log: np.ndarray, num_experts: int) -> Plan:
    """The Plan (log2phy, logcnt) of a slot table phy2log [layers, slots]."""
    p2l = torch.as_tensor(phy2log).long()
    L, E = p2l.shape[0], num_experts
    logcnt = torch.zeros(L, E, dtype=torch.long).scatter_add_(1, p2l, torch.ones_like(p2l))
    log2phy = torch.full((L, E, int(logcnt.max())), -1, dtype=torch.long)
    for i in range(L):
        seen = [0] * E
        for r, e in enumerate(p2l[i].tolist()):
            log2phy[i, e, seen[e]] = r
            seen[e] += 1
    return Plan(p2l, log2phy, logcnt)


def owned_capacity(num_experts: int, num_gpus: int, num_nodes: int = 1) -> int:
    """The most replica slots a GPU can usefully hold under `rebalance_owned`: one for every expert of its node that
    another GPU owns."""
    return num_experts // num_gpus * (num_gpus // num_nodes - 1)


def _owned_layer(w: np.ndarray, num_gpus: int, redundant: int, node_of_gpu: np.ndarray) -> list[list[int]]:
    """The replicas each GPU adds to its own experts, for one layer's loads w [E]."""
    E, G = len(w), num_gpus
    owner = np.arange(E) // (E // G)
    holds = np.zeros((E, G), dtype=bool)
    holds[np.arange(E), owner] = True
    allowed = node_of_gpu[owner][:, None] == node_of_gpu[None, :]  # replicas stay on their owner's node
    cnt = np.ones(E)
    load = np.bincount(owner, weights=w, minlength=G).astype(np.float64)
    free = np.full(G, redundant)
    extra: list[list[int]] = [[] for _ in range(G)]
    gpus = np.arange(G)
    for _ in range(G * redundant):
        ok = allowed & ~holds & (free > 0)[None, :]
        share = w / (cnt + 1)  # a replica's load after one more of its expert
        shed = w / cnt - share  # what each current holder gives up
        held = np.where(holds, load[None, :], -np.inf)
        others = np.where(holds, -np.inf, load[None, :])  # the GPUs an addition of e leaves alone, but for b
        top2 = np.sort(others, axis=1)[:, -2:]
        rest = np.where(gpus[None, :] == others.argmax(1)[:, None], top2[:, :1], top2[:, 1:])
        peak = np.maximum(np.maximum((held.max(1) - shed)[:, None], load[None, :] + share[:, None]), rest)
        peak = np.where(ok, peak, np.inf)
        # ties on the peak: the addition that lowers the sum of squared loads most
        sq = (-2 * shed * np.where(holds, load[None, :], 0).sum(1) + holds.sum(1) * shed**2)[:, None] + (
            2 * share[:, None] * load[None, :] + share[:, None] ** 2)
        best = peak.min()
        e, b = np.unravel_index(np.argmin(np.where(peak <= best + 1e-9 * max(1.0, best), sq, np.inf)), peak.shape)
        load[holds[e]] -= shed[e]
        load[b] += share[e]
        holds[e, b], cnt[e], free[b] = True, cnt[e] + 1, free[b] - 1
        extra[b].append(int(e))
    return _improve_owned(w, holds, allowed, extra)


def _improve_owned(w: np.ndarray, holds: np.ndarray, allowed: np.ndarray, extra: list[list[int]],
                   rounds: int = 8) -> list[list[int]]:
    """Local search after the greedy: replace one replica by another expert while that lowers the heaviest GPU's
    load (then the sum of squared loads)."""
    E, G = holds.shape

    def loads(h: np.ndarray) -> np.ndarray:
        return (h * (w / h.sum(1))[:, None]).sum(0)

    cur = loads(holds)
    key = (cur.max(), (cur**2).sum())
    onehot = np.eye(G)
    for _ in range(rounds):
        changed = False
        for g in range(G):
            for k, e0 in enumerate(extra[g]):
                h = holds.copy()
                h[e0, g] = False
                base, cnt = loads(h), h.sum(1)
                share, shed = w / (cnt + 1), w / cnt - w / (cnt + 1)
                new = base[None, :] - shed[:, None] * h + share[:, None] * onehot[g][None, :]  # [E candidates, G]
                peak, sq = new.max(1), (new**2).sum(1)
                ok = allowed[:, g] & ~h[:, g]
                tol = 1e-9 * max(1.0, key[0])
                better = ok & ((peak < key[0] - tol) | ((peak <= key[0] + tol) & (sq < key[1] - tol * key[1])))
                if not better.any():
                    continue
                e = int(np.flatnonzero(better)[np.lexsort((sq[better], peak[better]))[0]])
                h[e, g] = True
                holds, extra[g][k], key, changed = h, e, (peak[e], sq[e]), True
        if not changed:
            break
    return extra


def rebalance_owned(load: torch.Tensor, num_gpus: int, redundant: int, num_nodes: int = 1) -> Plan:
    """Redundant experts beside fixed owners (expert-parallel training, nanoseek.parallel.redundant): GPU g keeps its
    own experts [g E/G, (g+1) E/G) in its first E/G slots (their weights stay where the optimizer updates them) and
    `redundant` replicas of other GPUs' experts -- of its own node, so node-limited routing stays node-limited -- in
    the rest. Replicas are added one at a time, each where it lowers the heaviest GPU's load most (ties: the sum of
    squared loads), a replica carrying its expert's load over its replica count; no GPU holds an expert twice."""
    load = torch.as_tensor(load)
    if load.dim() == 1:
        load = load[None]
    L, E = load.shape
    if E % num_gpus or num_gpus % num_nodes:
        raise ValueError(f"experts ({E}) must split over GPUs ({num_gpus}) and GPUs over nodes ({num_nodes})")
    cap = owned_capacity(E, num_gpus, num_nodes)
    if not 0 <= redundant <= cap:
        raise ValueError(f"redundant={redundant} replica slots per GPU: a GPU can hold 0 to {cap} (the experts of its "
                         f"node that other GPUs own: {E} experts over {num_gpus} GPUs on {num_nodes} node(s))")
    local, node_of_gpu = E // num_gpus, np.arange(num_gpus) * num_nodes // num_gpus
    w = load.double().cpu().numpy()
    rows = []
    for i in range(L):
        extra = _owned_layer(w[i], num_gpus, redundant, node_of_gpu)
        rows.append([e for g in range(num_gpus) for e in [*range(g * local, (g + 1) * local), *sorted(extra[g])]])
    return plan_of(np.array(rows), E)


def replica_slots(idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The physical slot of each (token, expert) pair of idx [T, K] (logical experts) under one layer's plan
    (log2phy [E, M], logcnt [E]): the n-th pair of expert e goes to replica (n + offset) mod logcnt[e], so each replica
    gets an equal share of its expert's pairs (within one; `offset`, e.g. the rank, spreads the remainders of several
    senders over the replicas)."""
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(logcnt))
    starts = counts.cumsum(0) - counts
    nth = torch.empty_like(flat)
    nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # n-th pair of its expert
    cnt, table = logcnt.to(flat.device), log2phy.to(flat.device)
    return table[flat, (nth + offset) % cnt[flat]].view_as(idx)


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
        return replica_slots(idx, self.log2phy, self.logcnt)

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
