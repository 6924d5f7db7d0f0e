"""Closed-form sizes of a config: parameters (total, active, MTP), KV-cache bytes, forward FLOPs per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig


@dataclass
class ModelStats:
    total_params: int  # main model (embedding + blocks + final norm + head), as in "671B"
    active_params: int  # per token: all but the routed experts not chosen
    mtp_params: int  # MTP modules, excluding the shared embedding and head
    mtp_params_on_disk: int  # with the per-module embedding / head copies of the checkpoint layout
    routed_expert_params: int
    kv_cache_bytes_naive: int  # per token, all layers, full per-head K and V
    kv_cache_bytes_latent: int  # per token, all layers, c_kv + k_pe only
    kv_cache_bytes_per_elem: int
    forward_flops_per_token: int  # 2 * active matmul params + attention scores/values at `seq_len`
    seq_len: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def attention_params(c: ModelConfig) -> int:
    h, H = c.hidden_size, c.num_attention_heads
    n = 0
    if c.q_lora_rank:
        n += h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    else:
        n += h * H * c.qk_head_dim
    n += h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    n += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    n += H * c.v_head_dim * h
    if c.attention_bias:
        n += c.q_lora_rank or 0
        n += c.kv_lora_rank + c.qk_rope_head_dim + h
    return n


def moe_params(c: ModelConfig) -> tuple[int, int]:
    """(routed expert params, other MoE params: gate + shared experts) of one MoE layer."""
    routed = c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    other = c.n_routed_experts * c.hidden_size + c.n_shared_experts * 3 * c.hidden_size * c.moe_intermediate_size
    return routed, other


def model_stats(c: ModelConfig, seq_len: int = 4096, bytes_per_elem: int = 2) -> ModelStats:
    h = c.hidden_size
    emb = c.vocab_size * h
    norms = 2 * h
    attn = attention_params(c)
    dense = 3 * h * c.intermediate_size
    routed, moe_other = moe_params(c)
    n_moe, n_dense = c.n_moe_layers, c.first_k_dense_replace
    blocks = c.num_hidden_layers * (attn + norms) + n_dense * dense + n_moe * (routed + moe_other)
    total = emb + blocks + h + emb  # embedding, blocks, final norm, untied head
    routed_total = n_moe * routed
    active_routed = n_moe * routed * c.num_experts_per_tok // c.n_routed_experts
    active = total - routed_total + active_routed

    mtp_ffn = (routed + moe_other) if c.num_hidden_layers >= c.first_k_dense_replace else dense
    mtp_one = attn + norms + mtp_ffn + 2 * h * h + 3 * h  # block, eh_proj, enorm/hnorm/shared_head.norm
    D = c.num_nextn_predict_layers
    mtp = D * mtp_one
    kv_naive = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_elem
    kv_latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_elem
    # matmul FLOPs: 2 per matrix weight touched (the embedding lookup and the norms' scales are not matmuls), plus
    # q.k and p.v over the average causal context (seq_len + 1) / 2
    norm_scales = c.num_hidden_layers * (2 * h + (c.q_lora_rank or 0) + c.kv_lora_rank) + h
    matmul = 2 * (active - emb - norm_scales)
    ctx = (seq_len + 1) / 2
    attn_core = c.num_hidden_layers * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * ctx
    return ModelStats(
        total_params=total, active_params=active, mtp_params=mtp, mtp_params_on_disk=mtp + D * 2 * emb,
        routed_expert_params=routed_total, kv_cache_bytes_naive=kv_naive, kv_cache_bytes_latent=kv_latent,
        kv_cache_bytes_per_elem=bytes_per_elem, forward_flops_per_token=int(matmul + attn_core), seq_len=seq_len,
    )


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
    for div, suffix in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def format_stats(name: str, c: ModelConfig, s: ModelStats) -> str:
    lines = [
        f"{name}",
        f"  layers {c.num_hidden_layers} ({c.first_k_dense_replace} dense), hidden {c.hidden_size}, "
        f"heads {c.num_attention_heads}, experts {c.n_routed_experts} routed + {c.n_shared_experts} shared, "
        f"top-{c.num_experts_per_tok}, gate {c.scoring_func}",
        f"  parameters        {_human(s.total_params)} total, {_human(s.active_params)} active per token",
        f"  MTP modules       {c.num_nextn_predict_layers}: {_human(s.mtp_params)} "
        f"({_human(s.mtp_params_on_disk)} on disk with embedding/head copies)",
        f"  KV cache / token  naive {_bytes(s.kv_cache_bytes_naive)}, latent {_bytes(s.kv_cache_bytes_latent)} "
        f"({s.kv_cache_bytes_naive / s.kv_cache_bytes_latent:.1f}x smaller; "
        f"{8 * s.kv_cache_bytes_per_elem}-bit values)",
        f"  forward FLOPs     {_human(s.forward_flops_per_token)} per token at context {s.seq_len}",
    ]
    return "\n".join(lines)
