"""Rotary position embedding with YaRN context extension, on interleaved pairs (x[2j], x[2j+1])."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope head and the factor applied to cos/sin (V3 §2.1.1 decoupled RoPE, §4.3 YaRN).

    inv_freq = 1 / theta^(2j/d); with YaRN the frequencies below the correction range are divided by `factor`
    through the ramp `smooth = 1 - clamp((j - low) / (high - low), 0, 1)`.
    """
    d = cfg.qk_rope_head_dim
    theta = cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast") or 32.0)
    beta_slow = float(rs.get("beta_slow") or 1.0)

    def corr(rotations: float) -> float:  # dimension index whose wavelength fits `rotations` times in orig
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth
    # cos/sin factor: mscale(factor, mscale) / mscale(factor, mscale_all_dim); 1 for V3 (both 1.0)
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor)
    return inv_freq, float(attn_factor)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle `pos * inv_freq_j`, shape positions.shape + [d/2], fp32."""
    inv_freq, attn_factor = rope_inv_freq(cfg, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos() * attn_factor, angles.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    x: [B, S, H, d]; cos/sin: [S, d/2] or [B, S, d/2]. Output keeps the interleaved layout.
    """
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if torch.compiler.is_compiling():  # inductor generates no code for complex ops: the same product, in reals
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    # (x0 + i x1) * (cos + i sin) on the interleaved pairs
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
