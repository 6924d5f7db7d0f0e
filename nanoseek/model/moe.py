"""DeepSeekMoE: a router (Gate), fine-grained routed experts run as one grouped GEMM, and shared experts.

y = sum_{i in TopK} g_i * Expert_i(x) + Shared(x)          (V3 §2.1.2, DeepSeekMoE)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .config import ModelConfig


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x), with checkpoint names gate/up/down_proj."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = swiglu  # FP8 training swaps in fp8_swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Gate(nn.Module):
    """Router. Affinity s = sigmoid(x W^T) (or softmax) in fp32; selection on s + b, with group limiting;
    weights are the unbiased s at the chosen experts, normalised (optional) and scaled."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.score_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            # b: bias for auxiliary-loss-free balancing, updated outside the optimizer (V3 §2.1.2)
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # ---- rollout routing replay (RL; nanoseek.rl.grpo, nanoseek.infer.engine): see `forward`
        self.replay: torch.Tensor | None = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T,K] fp32, expert indices [T,K]) from affinities [T,E]."""
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.e_score_correction_bias is None:
                group_score = grouped.amax(dim=-1)  # V2: best expert of the group
            else:
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of the top-2
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        idx = choice.topk(self.top_k, dim=-1).indices
        return self.weights_at(scores, idx), idx

    def weights_at(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Gate weights [T,K] fp32 of the experts `idx` [T,K] from affinities [T,E]."""
        w = scores.gather(1, idx)
        # V3's sigmoid gate normalises the chosen affinities for any K (V3 §2.1.2, g_i = g'_i / sum_j g'_j; so do
        # DeepSeek's inference code and transformers' DeepseekV3), making a top-1 weight exactly `scale`; V2's
        # softmax gate normalises only for K > 1 (its reference code's guard).
        if self.norm_topk_prob and (self.top_k > 1 or self.score_func == "sigmoid"):
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.scores(x)
        w, idx = self.route(s)
        # ---- rollout routing replay: `replay` [T,K] (set by `routing_hooks`) forces these experts on the next
        # forwards (rows of -1 keep the router's own choice); the weights are the current affinities at them, so
        # the router still gets gradients. (Recording the experts used is a forward hook: `routing_hooks`.)
        if self.replay is not None:
            if self.replay.shape != idx.shape:
                raise ValueError(f"routing replay holds {tuple(self.replay.shape)} expert indices for "
                                 f"{tuple(idx.shape)} routed tokens")
            idx = torch.where((self.replay < 0).any(-1, keepdim=True), idx, self.replay)
            w = self.weights_at(s, idx)
        return w, idx, s


def grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs the expert GEMMs for x's device and dtype (CPU fp32, CUDA bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped GEMM backward needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g.contiguous()


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm as an opaque op for torch.compile (its fake kernel accepts fp32 on the CPU)."""
    return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's on CUDA (bf16 tensor cores; the fp32 residual stream and
    master weights are cast as autocast casts a Linear's), else x's own."""
    dev = x.device.type
    if dev == "cuda" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert; rows of group e are multiplied by w[e]^T.  x [N, in], w [E, out, in]."""
    dt = compute_dtype(x)
    x, w = x.to(dt), w.to(dt)
    if grouped_mm_ok(x):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # compiled inference (Engine)
            return _grouped_mm_op(x, w, offs)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
    # fallback (no grouped GEMM for this device/dtype): one GEMM per contiguous expert slice
    chunks = torch.split(x, counts.tolist())
    return torch.cat([c @ w[e].T for e, c in enumerate(chunks)], dim=0)


class Experts(nn.Module):
    """All routed experts as stacked weights: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I],
    in high precision. Low-precision variants (nanoseek.fp8: FP8 training, the emulated BF16 baseline) are
    subclasses swapped in for this module by `from_experts`, over the same parameters."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.inter = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, 2 * self.inter, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, self.inter))

    @classmethod
    def from_experts(cls, experts: Experts) -> Self:
        """A `cls` module over the very Parameters of `experts` (same names, same objects: checkpoints and an
        optimizer built before the swap do not notice), in the same train/eval mode."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_experts, new.inter = experts.n_experts, experts.inter
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        return new.train(experts.training)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) of the experts this process holds: under expert parallelism the parameters
        are DTensors split along the expert dimension (nanoseek.parallel) and this is the local part."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if isinstance(w1, DTensor):
            return w1.to_local(), w2.to_local()  # type: ignore[union-attr]
        return w1, w2

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order)."""
        w1, w2 = self.weights()
        offs = counts.cumsum(0).to(torch.int32)
        x_sorted = x_sorted.to(compute_dtype(x_sorted))
        gate, up = grouped_linear(x_sorted, w1, counts, offs).chunk(2, dim=-1)
        return grouped_linear(swiglu(gate, up), w2, counts, offs)


GATHER_LIMIT = 1 << 22  # gathered-expert path while the copied weights stay under 4M values (16 MiB fp32)
UNROLL_LIMIT = 128  # per-pair path (int8 experts) up to this many (token, expert) pairs (one GEMV pair each)


def gathered_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
    """sum_k weights[t,k] * Expert_idx[t,k](x_t) by indexing each token's experts' weights: for the few tokens of
    a decode step, cheaper than sorting and a grouped GEMM over mostly empty groups (gpt-fast's MoE decode)."""
    gate, up = torch.einsum("th,tkoh->tko", x, experts.gate_up_proj[idx]).chunk(2, dim=-1)
    y = torch.einsum("tki,tkhi->tkh", swiglu(gate, up), experts.down_proj[idx])
    return torch.einsum("tk,tkh->th", weights.to(y.dtype), y)


def unrolled_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """The same sum, one `experts.expert(x_t, e)` per (token, expert) pair with e read as an integer: each expert's
    weights are read where they lie. In a compiled step e is an unbacked integer (the Engine lets dynamo capture
    `.item()`), so the graph passes each GEMV a view at an offset computed from the index: no copy of the weights,
    which gathering them costs (a step of `small` with int8 experts spent a third of its time copying codes). Int8
    experts decode with it where nanoseek's int8 kernel is not built; for fp32 experts on this CPU (MKL) the gathered
    einsum measured faster (`tiny` compiled 623 vs 458 tok/s with a GEMV per pair)."""
    T, K = idx.shape
    ys = []
    for t in range(T):
        for k in range(K):
            e = idx[t, k].item()
            torch._check(e >= 0)
            torch._check(e < experts.n_experts)
            ys.append(experts.expert(x[t : t + 1], e))
    y = torch.cat(ys).view(T, K, -1)
    return torch.einsum("tk,tkh->th", weights.to(y.dtype), y)


class _PermuteTokens(torch.autograd.Function):
    """x[order // K]: each token's row copied to its K slots, in expert order. The backward gathers each token's K
    slot gradients through the inverse permutation and sums them over K in a fixed order. (x[order // K]'s own
    backward is index_put(accumulate=True), whose CPU kernel adds with racing atomic float adds when multi-threaded:
    the gradients, and so training, differed from run to run.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (order,) = ctx.saved_tensors
        slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return g.index_select(0, slot).view(-1, ctx.k, g.shape[-1]).sum(dim=1), None, None


def sort_by_expert(x: torch.Tensor, idx: torch.Tensor, n_experts: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted, order, counts): each token's row copied to its K slots, the slots in expert order (counts[e] rows
    for expert e), and the order that `combine` undoes."""
    K = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    x_sorted = _PermuteTokens.apply(x, order, K) if torch.is_grad_enabled() and x.requires_grad else x[order // K]
    return x_sorted, order, counts


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t,k] * y[slot of (t,k)]: the expert outputs back in token order, weighted by the gate."""
    T, K = weights.shape
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(T, K, -1)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)


def dispatch_combine(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int,
    expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """permute -> experts -> unpermute.  x [T,H], idx/weights [T,K]; returns sum_k weights * Expert_idx(x).

    The single seam for expert parallelism: `MoE.dispatch` is this function, which nanoseek.parallel swaps for an
    all-to-all version with the same signature.
    """
    x_sorted, order, counts = sort_by_expert(x, idx, n_experts)
    return combine(expert_fn(x_sorted, counts), order, weights)


@dataclass
class MoEStats:
    load: torch.Tensor  # [B, E] tokens routed to each expert, per sequence
    balance_loss: torch.Tensor  # scalar, alpha * mean_seq sum_i f_i P_i


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.alpha = cfg.aux_loss_alpha
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        )
        # permute -> experts -> unpermute; expert parallelism swaps in nanoseek.parallel.ExpertParallelDispatch
        self.dispatch: Callable[..., torch.Tensor] = dispatch_combine

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, H = x.shape
        xf = x.reshape(-1, H)
        w, idx, s = self.gate(xf)
        shared = self.shared_experts
        if self._per_token(idx):
            # high precision: one einsum over the gathered weights (measured faster, eager and compiled, than a GEMV
            # per pair); experts that declare a per-token decode (int8 codes): theirs, the shared expert with them
            if type(self.experts) is Experts:
                y = gathered_experts(xf, idx, w, self.experts)
            else:
                y = self.experts.decode(xf, idx, w, self.shared_experts)
                shared = None
        else:
            y = self.dispatch(xf, idx, w, self.n_experts, self.experts)
        if shared is not None:
            y = y + shared(xf)
        with torch.no_grad():
            load = torch.zeros(B, self.n_experts, device=x.device, dtype=torch.float32)
            load.scatter_add_(1, idx.view(B, S * self.top_k), torch.ones(B, S * self.top_k, device=x.device))
        return y.view(B, S, H), MoEStats(load, self.balance_loss(s.view(B, S, -1)))

    def _per_token(self, idx: torch.Tensor) -> bool:
        """Inference on few tokens (decode) with plain high-precision experts (not a swapped-in training subclass) or
        experts that declare a per-token decode (int8: `decode(x, idx, weights, shared_expert)`), all of them in this
        process (not expert-parallel)."""
        e = self.experts
        if torch.is_grad_enabled() or self.dispatch is not dispatch_combine:
            return False
        if type(e) is Experts:
            return idx.numel() * e.gate_up_proj[0].numel() * 3 // 2 <= GATHER_LIMIT
        return getattr(e, "per_token_decode", False) and idx.numel() <= UNROLL_LIMIT

    def balance_loss(self, s: torch.Tensor) -> torch.Tensor:
        """Complementary sequence-wise loss: alpha * sum_i f_i P_i per sequence, mean over sequences.

        f_i = E/(K T) * #tokens whose (unbiased) top-K contains i,  P_i = mean_t s_i,t / sum_j s_j,t.
        """
        if not (self.training and self.alpha > 0):
            return s.new_zeros(())
        B, S, E = s.shape
        with torch.no_grad():
            top = s.topk(self.top_k, dim=-1).indices.view(B, -1)
            f = torch.zeros(B, E, device=s.device).scatter_add_(1, top, torch.ones_like(top, dtype=torch.float32))
            f = f * (E / (self.top_k * S))
        p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.alpha * (f * p).sum(dim=-1).mean()


@contextmanager
def routing_hooks(gates: Sequence[Gate], replay: Sequence[torch.Tensor | None] | None = None, record: bool = False,
                  ) -> Iterator[list[list[torch.Tensor]]]:
    """Within the block, gate g uses the experts replay[g] ([T,K] per forward; None or rows of -1: its own choice)
    and, with `record`, appends the experts [T,K] each forward used to the g-th list it yields. Rollouts record,
    training forwards replay (rollout routing replay: the trainer runs the experts that generated the tokens)."""
    replay = list(replay) if replay is not None else [None] * len(gates)
    if len(replay) != len(gates):
        raise ValueError(f"routing replay for {len(replay)} MoE layers, the model routes in {len(gates)}")
    logs: list[list[torch.Tensor]] = [[] for _ in gates]
    handles = []
    for g, r, log in zip(gates, replay, logs, strict=True):
        g.replay = r
        if record:  # the experts the forward used: Gate.forward's second output
            handles.append(g.register_forward_hook(lambda _m, _a, out, log=log: log.append(out[1].detach())))
    try:
        yield logs
    finally:
        for h in handles:
            h.remove()
        for g in gates:
            g.replay = None


@torch.no_grad()
def update_bias(gate: Gate, load: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean_load - load_i) (load summed over the batch)."""
    if gate.e_score_correction_bias is None:
        return
    load = load.float().reshape(-1, load.shape[-1]).sum(0)
    gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
