"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

q = W_UQ RMSNorm(W_DQ x)   (or a plain W_Q x without query compression)
[c_kv; k_pe] = W_DKV x,    c_kv <- RMSNorm(c_kv),   [k_nope; v] = W_UKV c_kv   (per head)
score = ([q_nope; rope(q_pe)] . [k_nope; rope(k_pe)]) * scale,  out = W_O concat_h(softmax(score) v)

Two equivalent forms: `naive` expands K/V per head; `absorb` folds W_UK into the query and W_UV into the
output so attention runs on the latent (kv_lora_rank) plus the shared rope key only.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


class KVCacheView(Protocol):
    """One layer's slice of an inference cache (see nanoseek.infer.cache): stores the new entries at their
    positions and returns every cached entry the batch may attend to."""

    latent: bool

    def update_latent(self, kv: torch.Tensor) -> torch.Tensor: ...

    def update_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class InferenceCache(Protocol):
    """One forward's handle on an inference cache: the layer views and T, the number of leading cache positions
    any token of the batch may attend to (keys beyond a token's own position are masked)."""

    T: int

    def layer(self, i: int) -> KVCacheView: ...


class MLA(nn.Module):
    """Multi-head latent attention; attribute names follow the checkpoint (`self_attn.*`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope = cfg.qk_nope_head_dim
        self.qk_rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.scale = cfg.softmax_scale
        bias = cfg.attention_bias
        h = cfg.hidden_size
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=bias)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,S,H,dn], roped q_pe [B,S,H,dr]."""
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_dim).split([self.qk_nope, self.qk_rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The cacheable part: kv = [RMSNorm(c_kv); rope(k_pe)] [B,S,R+dr] (the layout of kv_a_proj_with_mqa)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1)

    def expand_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Naive form: per-head K [B,T,H,dn+dr] and V [B,T,H,dv] from the latent."""
        B, T, _ = kv.shape
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope + self.v_dim).split(
            [self.qk_nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, T, self.n_heads, self.qk_rope)), dim=-1)
        return k, v

    def attend_naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """softmax(q.k * scale) v over expanded heads (k, v from `expand_kv`); mask is bool [.., S, T]
        (True = attend) or None = causal. Returns [B,S,H,dv]."""
        q = torch.cat((q_nope, q_pe), dim=-1)
        if self.v_dim < self.qk_dim:
            # zero-pad V to the q/k head size: the flash kernels need equal sizes (else SDPA's math path keeps
            # the S x S weights for backward); the padded output columns are exactly zero and are dropped
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]

    def kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_UKV [H*(dn+dv), R] as a matrix (a kv_b_proj holding FP8 weights dequantises it here)."""
        dequantize = getattr(self.kv_b_proj, "dequantize", None)
        return dequantize(dtype) if dequantize is not None else self.kv_b_proj.weight

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Weight-absorbed form: score = [q_nope W_UK; q_pe] . [c_kv; k_pe], out = (p c_kv) W_UV^T per head.
        Only the latent kv [B,T,R+dr] is read. Returns [B,S,H,dv]."""
        w = self.kv_b_weight(kv.dtype).view(self.n_heads, self.qk_nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope], w[:, self.qk_nope :]
        q = torch.cat((torch.matmul(q_nope.transpose(1, 2), w_uk), q_pe.transpose(1, 2)), dim=-1)  # [B,H,S,R+dr]
        scores = torch.matmul(q, kv.unsqueeze(1).transpose(-1, -2)).float() * self.scale  # [B,H,S,T]
        S, T = scores.shape[-2:]
        if mask is None:
            mask = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(T - S)
        p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(kv.dtype)
        o_lat = torch.matmul(p, kv[..., None, :, : self.kv_lora_rank])  # [B,H,S,R]
        return torch.matmul(o_lat, w_uv.transpose(1, 2)).transpose(1, 2)  # [B,S,H,dv]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
        absorb: bool = False, cache: KVCacheView | None = None,
    ) -> torch.Tensor:
        """With a `cache` (inference) the new keys are written into it and attention reads all cached ones;
        the cache decides the form: a latent cache stores (c_kv, k_pe) and runs absorbed, a naive one (K, V)."""
        B, S, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        kv = self.latent(x, cos, sin)
        if cache is not None:
            absorb = cache.latent
        if absorb:
            if cache is not None:
                kv = cache.update_latent(kv)
            out = self.attend_absorbed(q_nope, q_pe, kv, mask)
        else:
            k, v = self.expand_kv(kv)
            if cache is not None:
                k, v = cache.update_kv(k, v)
            out = self.attend_naive(q_nope, q_pe, k, v, mask)
        return self.o_proj(out.reshape(B, S, self.n_heads * self.v_dim))

