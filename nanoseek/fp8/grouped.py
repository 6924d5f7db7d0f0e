"""FP8 grouped GEMM for the routed experts (tokens sorted by expert), CPU emulation.

Fprop/Dgrad quantise activations per 1x128 tile along the reduction dim and each expert's weight per 128x128
block; Wgrad re-tiles dy and x along the (sorted) token dim in tiles of 128 consecutive tokens. The dequantised
operands go through the same grouped GEMM as the high-precision path, accumulating in fp32.
"""

from __future__ import annotations

import torch

from .quant import (
    GRAD_AMAX_FLOOR,
    dequantize_tiles,
    dequantize_weight_block,
    fake_quantize_tiles,
    quantize_tiles,
    quantize_weight_block,
)


def _qdq_experts(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Each expert's [out, in] matrix through 128x128 block quantisation, all experts at once: rows are padded
    to a multiple of 128 so that no block straddles two experts."""
    E, out, inp = w.shape
    pad = (-out) % 128
    wp = torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w
    flat = wp.reshape(E * (out + pad), inp)
    deq = dequantize_weight_block(*quantize_weight_block(flat, pow2_scale=pow2))
    return deq.view(E, out + pad, inp)[:, :out]


class _Fp8GroupedFn(torch.autograd.Function):
    """The dequantised operands go through the grouped GEMM in x's dtype (fp32 on the CPU, bf16 on CUDA, where
    FP8 values times their scale round once to bf16)."""

    @staticmethod
    def forward(ctx, x, w, offs, pow2):  # type: ignore[override]
        xq, xs = quantize_tiles(x, pow2_scale=pow2)
        dt = x.dtype
        wd = _qdq_experts(w, pow2).to(dt)
        ctx.save_for_backward(xq, xs, w, offs)
        ctx.pow2, ctx.dt = pow2, dt
        return torch._grouped_mm(dequantize_tiles(xq, xs).to(dt), wd.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xq, xs, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        pow2, dt = ctx.pow2, ctx.dt
        wd = _qdq_experts(w, pow2).to(dt)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = fake_quantize_tiles(dy, pow2_scale=pow2, amax_floor=GRAD_AMAX_FLOOR)
            dx = torch._grouped_mm(dyq.to(dt), wd, offs=offs)
        if ctx.needs_input_grad[1]:
            dy_t = fake_quantize_tiles(dy.T.contiguous(), pow2_scale=pow2,
                                       amax_floor=GRAD_AMAX_FLOOR).T  # tiles of 128 tokens per output channel
            x_t = fake_quantize_tiles(dequantize_tiles(xq, xs).T.contiguous(), pow2_scale=pow2).T
            with torch.enable_grad():
                wv = wd.detach().requires_grad_()
                y = torch._grouped_mm(x_t.to(dt).contiguous(), wv.transpose(1, 2), offs=offs)
                (dw,) = torch.autograd.grad(y, wv, grad_outputs=dy_t.to(dt).contiguous())
            dw = dw.to(w.dtype)
        return dx, dw, None, None


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """Rows of x sorted by expert; rows of group e times w[e]^T, with FP8 operands.  x [N, in], w [E, out, in]."""
    return _Fp8GroupedFn.apply(x, w, offs, pow2_scale)
