"""Expert parallelism: the routed experts of each MoE layer split over the ranks of the "ep" mesh dimension (expert e
on ep rank e // (E / ep)), tokens sent to their experts' ranks and the outputs brought back with `all_to_all_single`
(uneven splits), as V3 does across its 64-way EP (V3 §3.2.2).

    sort slots by expert -> exchange counts -> all-to-all rows -> regroup by local expert -> grouped GEMM
    -> undo the regrouping -> all-to-all back -> unsort, weight by the gate and sum (`combine`)

Node-limited routing (V3 §2.1.2): the gate keeps the `topk_group` best of `n_group` expert groups per token. When each
group's experts live on one node, a token's slots reach at most `topk_group` nodes. `ExpertParallelDispatch` places
ep ranks on nodes in order (ranks [0, ep/nodes) on node 0, ...), checks that groups do not straddle nodes, and counts
what each dispatch sends: rows per destination rank, rows that cross a node boundary, and the (token, remote node)
pairs -- what V3's two-hop dispatch (IB once per node, then NVLink) would send across nodes.
Departure from V3: each (token, expert) slot is sent as its own row (no de-duplication per node and NVLink
forwarding), so the cross-node bytes here are rows_cross_node x row bytes, not token_nodes x row bytes.

FP8 dispatch (V3 §3.3): the dispatched activations travel as FP8 with 1x128 scales and are dequantised on arrival; the
combine (and every gradient) travels in BF16. Without it rows travel in their own dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..fp8.quant import BLOCK, dequantize_tiles, quantize_tiles
from ..model.moe import Experts, combine, sort_by_expert
from .overlap import all_to_all


def recomputing() -> bool:
    """Whether this forward is activation checkpointing's recomputation in the backward (not counted twice)."""
    return torch._C._current_graph_task_id() != -1


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single of the rows of a 2-D x (any dtype: sent as bytes; gloo has no bf16 / fp8 all-to-all)."""
    raw = x.contiguous().view(torch.uint8)  # [N, row bytes]
    out = raw.new_empty(sum(out_splits), raw.shape[1])
    all_to_all(out, raw, out_splits, in_splits, group, "rows")  # under DualPipeV's overlap: the turn handed over
    return out.view(x.dtype)


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks and back; the backward sends the gradients the opposite way. `wire`: the dtype rows
    travel in (None: their own)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, wire):  # type: ignore[override]
        ctx.meta = (out_splits, in_splits, group, wire, x.dtype)
        sent = x if wire is None else x.to(wire)
        return _exchange(sent, out_splits, in_splits, group).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        out_splits, in_splits, group, wire, dtype = ctx.meta
        sent = g if wire is None else g.to(wire)
        return _exchange(sent, in_splits, out_splits, group).to(dtype), None, None, None, None


class _Fp8AllToAll(torch.autograd.Function):
    """Dispatch in FP8: rows quantised per 1x128 tile, sent as FP8 + fp32 scales, dequantised on arrival; the
    gradient returns in BF16."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]
        ctx.meta = (out_splits, in_splits, group, x.dtype)
        q, s = quantize_tiles(x.float())
        q, s = _exchange(q, out_splits, in_splits, group), _exchange(s, out_splits, in_splits, group)
        return dequantize_tiles(q, s).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        out_splits, in_splits, group, dtype = ctx.meta
        return _exchange(g.to(torch.bfloat16), in_splits, out_splits, group).to(dtype), None, None, None


@dataclass
class Traffic:
    """What the dispatches of this process sent since the last `take()` (forward passes only)."""

    rows: int = 0  # (token, expert) slots sent to other ranks (the combine returns as many)
    rows_cross_node: int = 0  # of them, to a rank on another node
    token_nodes: int = 0  # (token, remote node) pairs: a two-hop dispatch's cross-node rows
    dispatch_bytes: int = 0  # to other ranks
    combine_bytes: int = 0
    cross_node_bytes: int = 0  # dispatch + combine across nodes
    max_nodes_per_token: int = 0  # most nodes (own included) any token's slots reached
    expert_rows: int = 0  # rows this rank's expert slots computed (its own tokens' included)
    replica_bytes: int = 0  # expert weights sent to other ranks' replica slots (their gradients return as many)
    calls: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ExpertParallelDispatch:
    """`MoE.dispatch` under expert parallelism: same signature as nanoseek.model.moe.dispatch_combine, the experts'
    parameters split over the ep group (Experts.weights() is this rank's part). Tokens go to expert slots, S per
    rank (slot s on rank s // S): here each expert's own (S = E / ep); nanoseek.parallel.redundant's subclass adds
    replica slots (`route`)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, nodes: int = 1, fp8: bool = False,
                 n_group: int = 1) -> None:
        self.group = group
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.ep:
            raise ValueError(f"{n_experts} routed experts do not split over ep={self.ep} ranks")
        if self.ep % nodes:
            raise ValueError(f"ep={self.ep} ranks do not split into {nodes} nodes")
        if nodes > 1 and n_group % nodes:
            raise ValueError(f"node-limited routing places whole expert groups on nodes: n_group={n_group} groups do "
                             f"not split over {nodes} nodes")
        self.n_experts, self.local = n_experts, n_experts // self.ep
        self.nodes, self.fp8 = nodes, fp8
        self.node_of_rank = torch.arange(self.ep) * nodes // self.ep
        self.node = int(self.node_of_rank[self.rank])
        self.traffic = Traffic()

    def take(self) -> Traffic:
        """The traffic counted so far, and reset."""
        t, self.traffic = self.traffic, Traffic()
        return t

    def route(self, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the expert slot of each (token, expert) pair of idx [T, K], slots per rank): each expert's own."""
        return idx, self.local

    def _count(self, slot: torch.Tensor, per_rank: int, send: torch.Tensor, computed: int, row_in: int,
               row_out: int) -> None:
        if recomputing():
            return
        remote = self.node_of_rank != self.node
        others = torch.arange(self.ep) != self.rank
        send = send.cpu()
        node = self.node_of_rank.to(slot.device)[slot // per_rank]  # [T, K] node of each pair's slot
        reached = torch.zeros(slot.shape[0], self.nodes, dtype=torch.bool, device=slot.device)
        reached.scatter_(1, node, True)
        t = self.traffic
        rows, cross = int(send[others].sum()), int(send[remote].sum())
        t.rows += rows
        t.expert_rows += computed
        t.rows_cross_node += cross
        t.token_nodes += int(reached.sum() - reached[:, self.node].sum())
        t.dispatch_bytes += rows * row_in
        t.combine_bytes += rows * row_out
        t.cross_node_bytes += cross * (row_in + row_out)
        t.max_nodes_per_token = max(t.max_nodes_per_token, int(reached.sum(1).max()) if slot.numel() else 0)
        t.calls += 1

    def row_bytes(self, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
        """(dispatch, combine) bytes of one row: FP8 values + one fp32 scale per 128 and a BF16 combine, or the
        activations' own dtype both ways."""
        if self.fp8:
            return hidden + 4 * -(-hidden // BLOCK), 2 * hidden
        return dtype.itemsize * hidden, dtype.itemsize * hidden

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int,
                 experts: Experts) -> torch.Tensor:
        slot, per = self.route(idx)
        x_sorted, order, counts = sort_by_expert(x, slot, self.ep * per)
        recv = torch.empty_like(counts)
        all_to_all(recv, counts, None, None, self.group, "counts")  # [source rank, local slot] row counts
        recv = recv.view(self.ep, per)
        send = counts.view(self.ep, per).sum(1)
        in_splits, out_splits = send.tolist(), recv.sum(1).tolist()
        self._count(slot, per, send, sum(out_splits), *self.row_bytes(x.shape[-1], x_sorted.dtype))
        if self.fp8:
            x_recv = _Fp8AllToAll.apply(x_sorted, out_splits, in_splits, self.group)
        else:
            x_recv = _AllToAll.apply(x_sorted, out_splits, in_splits, self.group, None)
        # the received rows come grouped by source rank, then slot: regroup them by slot for the grouped GEMM
        block = torch.repeat_interleave(torch.arange(recv.numel(), device=x.device), recv.flatten().to(x.device))
        perm = ((block % per) * self.ep + block // per).argsort(stable=True)
        inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        y_local = experts(x_recv.index_select(0, perm), recv.sum(0).to(x.device))
        y_recv = y_local.index_select(0, inverse)
        wire = torch.bfloat16 if self.fp8 else None
        y_sorted = _AllToAll.apply(y_recv, in_splits, out_splits, self.group, wire)
        return combine(y_sorted, order, weights)
