"""A cluster planner in closed form: what a model costs on a pipeline x expert x data parallel cluster, per GPU and per
token, beside what DeepSeek-V3 reports for its own run (V3 §3.1-3.3, Table 1).

    memory per GPU   BF16 weights, FP32 gradients, and (ZeRO-1, sharded over the data-parallel copies of each
                     weight) FP32 master weights and BF16 AdamW moments (V3 §3.3.4); activations per micro-batch
                     x micro-batches in flight (1F1B: PP; DualPipe / DualPipeV: PP + 1)
    FLOPs per token  3 x the forward (nanoseek.model.stats: 2 x active matmul weights + attention at the context)
    EP bytes / token dispatch in FP8 (+ one fp32 scale per 128 values), combine in BF16; node-limited routing sends a
                     token once to each of its at most M remote nodes over IB, then over NVLink within the node
    bubble           per the DualPipe repository: 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe and DualPipeV
                     (PP/2-1)(F&B+B-3W), in units of a forward chunk F with B = 2F, W = F and F&B = F + B
    GPU-hours        tokens x FLOPs per token / (MFU x peak)

Activation bytes per token and layer (BF16 2 B; a cached GEMM input 1 B with `fp8_cache`, else 2 B; `recompute`:
the RMSNorms, the MLA up-projections and the SwiGLU output are recomputed in the backward, V3 §3.2.3):
residual   the block input (H, BF16), from which the recomputed norms start
attention  the compressed q and kv (q_lora + kv_lora + rope), the attention output o (heads x v, BF16 for the
           attention backward and as the output projection's input) and its log-sum-exp (heads x 4 B); without
           recompute also the norm outputs (2 H), the normed latents and q, k, v (heads x (2 qk head + v), BF16)
MoE        the K dispatched rows (K x H), the SwiGLU inputs (K x 2I routed + 2 I_s shared) and the gate's affinities
           (E x 4 B); without recompute also the norm output (H) and the down-projection inputs (K x I + I_s)
dense MLP  the SwiGLU input (2 I); without recompute the norm output (H) and the down-projection input (I)
An estimate for planning, not a measurement; the other figures are exact for the stated assumptions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..config import POSITIVE, ConfigError, Range, check_fields, param
from ..model.config import ModelConfig
from ..model.stats import attention_params, model_stats, moe_params

GiB = 1024**3

# what DeepSeek-V3 reports for its run (V3 §1, §3.1, Table 1): H800 GPUs, 14.8T tokens
V3_REPORTED = {"total_params": 671e9, "active_params": 37e9, "gpu_hours_per_trillion_tokens": 180e3,
               "pretraining_gpu_hours": 2664e3, "context_extension_gpu_hours": 119e3,
               "post_training_gpu_hours": 5e3, "total_gpu_hours": 2788e3, "tokens": 14.8e12}
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass
class ClusterConfig:
    """The cluster and the run: V3's defaults (2,048 H800 in nodes of 8, PP 16 with DualPipe, EP 64, 4K tokens)."""

    gpus: int = param(2048, POSITIVE)
    gpus_per_node: int = param(8, POSITIVE)
    pp: int = param(16, POSITIVE)  # pipeline ranks
    ep: int = param(64, POSITIVE)  # expert-parallel ranks (within the data-parallel ranks of a stage)
    schedule: Literal["1f1b", "zb1p", "dualpipe", "dualpipev"] = "dualpipe"
    seq_len: int = param(4096, POSITIVE)
    micro_batch: int = param(1, POSITIVE)  # sequences per micro-batch
    global_batch: int = param(15360, POSITIVE)  # sequences per step
    max_nodes: int = param(4, POSITIVE)  # node-limited routing: nodes a token reaches at most (topk_group)
    fp8_cache: bool = True
    recompute: bool = True
    mfu: float = param(0.4, Range(0, 1, lo_open=True))  # of `peak_tflops` (V3 implies ~0.39 by these FLOPs)
    peak_tflops: float = param(989.0, POSITIVE)  # H800 dense BF16 (1,979 for FP8)
    gpu_memory_gib: float = param(80.0, POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.gpus % self.pp:
            raise ConfigError(f"gpus={self.gpus} do not split into pp={self.pp} pipeline ranks")
        if (self.gpus // self.pp) % self.ep:
            raise ConfigError(f"the {self.gpus // self.pp} data-parallel ranks of a stage do not split into "
                              f"ep={self.ep}")
        if self.schedule in ("dualpipe", "dualpipev") and self.pp % 2:
            raise ConfigError(f"{self.schedule} needs an even pp, got {self.pp}")


@dataclass
class ClusterPlan:
    dp: int  # data-parallel ranks per stage
    expert_copies: int  # dp / ep: how many ranks hold each expert
    params_per_gpu: int
    weights_gib: float
    gradients_gib: float
    master_gib: float
    moments_gib: float
    activations_gib: float
    total_gib: float
    activation_bytes_per_token_layer: int
    micro_batches_in_flight: int
    flops_per_token: float  # forward + backward
    ep_dispatch_bytes_per_token: float  # per MoE layer, forward: the K rows (NVLink + IB)
    ep_combine_bytes_per_token: float
    ep_ib_bytes_per_token: float  # per MoE layer, forward, across nodes (dispatch + combine, once per remote node)
    bubble: dict[str, float]  # per schedule: bubble in forward-chunk units
    bubble_fraction: dict[str, float]  # of the step, with this step's micro-batches
    micro_batches: int  # per pipeline per step
    gpu_hours_per_trillion_tokens: float
    implied_v3_mfu: float  # the MFU at which this model's FLOPs give V3's 180K GPU-hours per trillion tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bubble_chunks(schedule: str, stages: int, f: float = 1.0, b: float = 2.0, w: float = 1.0) -> float:
    """Pipeline bubble per the DualPipe repository's table, for `stages` pipeline stages, in the time of one
    stage's chunks (F&B = F + B: the overlap hides communication, not computation)."""
    if schedule == "1f1b":
        return (stages - 1) * (f + b)
    if schedule == "zb1p":
        return (stages - 1) * (f + b - 2 * w)
    if schedule in ("dualpipe", "dualpipev"):
        return (stages / 2 - 1) * ((f + b) + b - 3 * w)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def stages_of(schedule: str, pp: int) -> int:
    """Pipeline stages over `pp` ranks: one per rank, two per rank in DualPipeV's V."""
    return 2 * pp if schedule == "dualpipev" else pp


def activation_bytes(c: ModelConfig, fp8_cache: bool = True, recompute: bool = True, moe: bool = True) -> int:
    """Bytes one token leaves for the backward in one block (module doc)."""
    g = 1 if fp8_cache else 2  # a cached GEMM input
    H, nh = c.hidden_size, c.num_attention_heads
    latents = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim
    attn = latents * g + nh * c.v_head_dim * (2 + g) + 4 * nh
    if not recompute:
        attn += 2 * H * g + latents * g + 2 * nh * (2 * c.qk_head_dim + c.v_head_dim)
    if moe:
        K, inter, shared = c.num_experts_per_tok, c.moe_intermediate_size, c.n_shared_experts * c.moe_intermediate_size
        ffn = K * H * g + (K * 2 * inter + 2 * shared) * g + 4 * c.n_routed_experts
        if not recompute:
            ffn += H * g + (K * inter + shared) * g
    else:
        ffn = 2 * c.intermediate_size * g + (0 if recompute else (H + c.intermediate_size) * g)
    return 2 * H + attn + ffn


def plan(c: ModelConfig, k: ClusterConfig) -> ClusterPlan:
    st = model_stats(c, seq_len=k.seq_len)
    dp = k.gpus // k.pp
    copies = dp // k.ep
    attn = attention_params(c) + 2 * c.hidden_size
    routed, moe_other = moe_params(c)
    n_layers = c.num_hidden_layers + c.num_nextn_predict_layers  # MTP modules are blocks on the last stage
    # the heaviest pipeline rank: its share of the blocks (MoE blocks, the most expensive), plus the embedding, the
    # head and the MTP projections, which V3 keeps on one rank (the first and the last stage share it under
    # DualPipe / DualPipeV)
    share = 2 if k.schedule == "dualpipe" else 1  # DualPipe keeps two copies of each stage's weights
    per_rank = math.ceil(n_layers / k.pp)
    dense_per_gpu = share * per_rank * (attn + moe_other) + 2 * c.vocab_size * c.hidden_size
    dense_per_gpu += c.num_nextn_predict_layers * 2 * c.hidden_size * c.hidden_size
    expert_per_gpu = share * per_rank * routed // k.ep
    params = dense_per_gpu + expert_per_gpu
    weights = 2 * params  # BF16 working copy
    grads = 4 * params  # FP32 gradient accumulation (V3 §3.3.4)
    master = 4 * (dense_per_gpu / dp + expert_per_gpu / copies)  # ZeRO-1 over each weight's data-parallel copies
    moments = 2 * 2 * (dense_per_gpu / dp + expert_per_gpu / copies)  # BF16 first and second moments
    # activations per device, in stage-activations of one micro-batch (the DualPipe table): 1F1B / ZB1P PP,
    # DualPipe / DualPipeV PP + 1 (PP = stages)
    stages = stages_of(k.schedule, k.pp)
    in_flight = stages if k.schedule in ("1f1b", "zb1p") else stages + 1
    act_tok = activation_bytes(c, k.fp8_cache, k.recompute, moe=c.n_moe_layers > 0)
    acts = act_tok * math.ceil(n_layers / stages) * k.seq_len * k.micro_batch * in_flight
    H, K = c.hidden_size, c.num_experts_per_tok
    dispatch = K * (H + 4 * math.ceil(H / 128))  # FP8 rows + scales
    combine = K * 2 * H
    nodes_ep = max(1, k.ep // k.gpus_per_node)
    remote = min(k.max_nodes, nodes_ep) * (1 - 1 / nodes_ep)  # expected remote nodes a token reaches
    ib = remote * ((H + 4 * math.ceil(H / 128)) + 2 * H)
    micro = max(1, k.global_batch // (dp * k.micro_batch))
    # bubbles in F = the forward of one rank's share of the layers (n / pp): DualPipeV's stages are half that
    bubbles = {s: bubble_chunks(s, stages_of(s, k.pp)) * k.pp / stages_of(s, k.pp) for s in SCHEDULES}
    # a step is m micro-batches of F + B = 3 F per rank, whatever the schedule
    fractions = {s: b / (b + 3 * micro) for s, b in bubbles.items()}
    flops = 3 * st.forward_flops_per_token
    hours = 1e12 * flops / (k.mfu * k.peak_tflops * 1e12) / 3600
    implied = 1e12 * flops / (V3_REPORTED["gpu_hours_per_trillion_tokens"] * 3600 * k.peak_tflops * 1e12)
    total = weights + grads + master + moments + acts
    return ClusterPlan(dp, copies, int(params), weights / GiB, grads / GiB, master / GiB, moments / GiB, acts / GiB,
                       total / GiB, act_tok, in_flight, flops, dispatch, combine, ib, bubbles, fractions, micro, hours,
                       implied)


def format_plan(name: str, c: ModelConfig, k: ClusterConfig, p: ClusterPlan) -> str:
    st = model_stats(c, seq_len=k.seq_len)
    v3 = V3_REPORTED
    lines = [
        f"{name} on {k.gpus} GPUs ({k.gpus // k.gpus_per_node} nodes of {k.gpus_per_node}): PP {k.pp} ({k.schedule}),"
        f" EP {k.ep}, DP {p.dp} per stage (each expert on {p.expert_copies} ranks), micro-batch {k.micro_batch} x "
        f"{k.seq_len}, {p.micro_batches} micro-batches per step",
        f"  parameters        {st.total_params / 1e9:.1f}B total, {st.active_params / 1e9:.1f}B active   "
        f"(V3: {v3['total_params'] / 1e9:.0f}B / {v3['active_params'] / 1e9:.0f}B)",
        f"  per GPU           {p.params_per_gpu / 1e9:.2f}B parameters (the heaviest pipeline rank)",
        f"  memory per GPU    weights {p.weights_gib:.1f} + gradients {p.gradients_gib:.1f} + master {p.master_gib:.2f}"
        f" + moments {p.moments_gib:.2f} + activations {p.activations_gib:.1f} = {p.total_gib:.1f} GiB of "
        f"{k.gpu_memory_gib:g}",
        f"                    (activations: {p.activation_bytes_per_token_layer:,} B per token and layer, "
        f"{p.micro_batches_in_flight} micro-batches in flight; fp8_cache={k.fp8_cache}, recompute={k.recompute})",
        f"  FLOPs per token   {p.flops_per_token / 1e9:.0f} GFLOP forward + backward at context {k.seq_len}",
        f"  EP per token      per MoE layer: dispatch {p.ep_dispatch_bytes_per_token / 1024:.1f} KiB (FP8), combine "
        f"{p.ep_combine_bytes_per_token / 1024:.1f} KiB (BF16); across nodes {p.ep_ib_bytes_per_token / 1024:.1f} KiB "
        f"(at most {k.max_nodes} nodes per token)",
        "  bubble            " + ", ".join(f"{s} {p.bubble[s]:.0f} F ({p.bubble_fraction[s]:.1%})" for s in SCHEDULES),
        f"  GPU-hours / 1T    {p.gpu_hours_per_trillion_tokens / 1e3:.0f}K at MFU {k.mfu:.0%} of {k.peak_tflops:g} "
        f"TFLOPS (V3: {v3['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K, i.e. MFU {p.implied_v3_mfu:.1%} by these "
        f"FLOPs); {v3['tokens'] / 1e12:.1f}T tokens: {p.gpu_hours_per_trillion_tokens * v3['tokens'] / 1e12 / 1e6:.2f}M"
        f" (V3: {v3['pretraining_gpu_hours'] / 1e6:.3f}M pre-training, {v3['total_gpu_hours'] / 1e6:.3f}M in all)",
    ]
    return "\n".join(lines)
