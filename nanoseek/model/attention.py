"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

q = W_UQ RMSNorm(W_DQ x)   (or a plain W_Q x without query compression)
[c_kv; k_pe] = W_DKV x,    c_kv <- RMSNorm(c_kv),   [k_nope; v] = W_UKV c_kv   (per head)
score = ([q_nope; rope(q_pe)] . [k_nope; rope(k_pe)]) * scale,  out = W_O concat_h(softmax(score) v)

Two equivalent forms: `naive` expands K/V per head; `absorb` folds W_UK into the query and W_UV into the
output so attention runs on the latent (kv_lora_rank) plus the shared rope key only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


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

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cacheable part: normalised latent c_kv [B,S,R] and the roped shared key k_pe [B,S,dr]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Naive form: per-head K [B,T,H,dn+dr] and V [B,T,H,dv] from the latent."""
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope + self.v_dim)
        k_nope, v = kv.split([self.qk_nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, T, self.n_heads, self.qk_rope)), dim=-1)
        return k, v

    def attend_naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """softmax(q.k * scale) v over expanded heads; mask is bool [.., S, T] (True = attend) or None = causal."""
        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if self.v_dim < self.qk_dim:
            # zero-pad V to the q/k head size: the flash kernels need equal sizes (else SDPA's math path keeps
            # the S x S weights for backward); the padded output columns are exactly zero and are dropped
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.scale,
        )
        return out.transpose(1, 2)[..., : self.v_dim]  # [B,S,H,dv]

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Weight-absorbed form: q_nope W_UK against c_kv, output through W_UV; only c_kv and k_pe are read."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope], w[:, self.qk_nope :]
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        scores = torch.einsum("bshr,btr->bhst", q_lat, c_kv) + torch.einsum("bshr,btr->bhst", q_pe, k_pe)
        scores = scores.float() * self.scale
        S, T = scores.shape[-2:]
        if mask is None:
            mask = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(T - S)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhst,btr->bshr", p, c_kv)
        return torch.einsum("bshr,hdr->bshd", o_lat, w_uv)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        attend = self.attend_absorbed if absorb else self.attend_naive
        out = attend(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.reshape(B, S, self.n_heads * self.v_dim))
