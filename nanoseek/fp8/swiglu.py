"""SwiGLU that keeps its inputs in FP8 for the backward and recomputes its output (DeepSeek-V3 §3.3, low-precision
activation memory): y = silu(g) * u; saved: g and u in E4M3 with 1x128 tiles; backward, from the dequantised g, u:
    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),    du = dy * silu(g).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize_tiles, quantize_tiles


class _Fp8SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, pow2: bool) -> torch.Tensor:  # type: ignore[override]
        shape = gate.shape
        g2, u2 = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])
        ctx.save_for_backward(*quantize_tiles(g2, pow2_scale=pow2), *quantize_tiles(u2, pow2_scale=pow2))
        ctx.shape, ctx.dtype = shape, gate.dtype
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        gq, gs, uq, us = ctx.saved_tensors
        g, u = dequantize_tiles(gq, gs).view(ctx.shape), dequantize_tiles(uq, us).view(ctx.shape)
        sig = torch.sigmoid(g)
        dy = dy.float()
        dg = dy * u * sig * (1 + g * (1 - sig))
        du = dy * g * sig
        return dg.to(ctx.dtype), du.to(ctx.dtype), None


def fp8_swiglu(gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """silu(gate) * up, with gate and up saved for the backward in FP8 (1x128 tiles along the last dim)."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return F.silu(gate) * up  # nothing to save
    return _Fp8SwiGLUFn.apply(gate, up, pow2_scale)
