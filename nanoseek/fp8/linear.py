"""FP8 GEMMs with fine-grained scales and FP32 accumulation promoted every 128 elements (DeepSeek-V3 §3.3).

All three GEMMs of a Linear take E4M3 operands:
  Fprop  y  = x W^T     x tiles 1x128 along in_features,  W blocks 128x128
  Dgrad  dx = dy W      dy tiles 1x128 along out_features, W blocks 128x128 (the same blocks, transposed use)
  Wgrad  dW = dy^T x    dy^T and x^T re-tiled 1x128 along the tokens (x is saved in FP8 and re-quantised)
Every GEMM goes through `gemm.scaled_gemm` on the quantised operands and their scales: the exact emulation on
the CPU (one fp32 GEMM per 128-slice of the reduction dimension, summed in fp32), `torch._scaled_mm` on FP8 GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from .gemm import Backend, scaled_gemm
from .quant import GRAD_AMAX_FLOOR, dequantize_tiles, quantize_tiles, quantize_weight_block


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2: bool, out_dtype: torch.dtype,  # type: ignore[override]
                backend: Backend):
        xq, xs = quantize_tiles(x, pow2_scale=pow2)
        wq, ws = quantize_weight_block(weight, pow2_scale=pow2)
        y = scaled_gemm(xq, xs, wq, ws, out_dtype=out_dtype, backend=backend)  # Fprop
        ctx.save_for_backward(xq, xs, wq, ws)  # activations kept in FP8 for the backward GEMMs
        ctx.pow2, ctx.x_dtype, ctx.w_dtype, ctx.backend = pow2, x.dtype, weight.dtype, backend
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        xq, xs, wq, ws = ctx.saved_tensors
        dy = dy.contiguous()
        pow2, backend = ctx.pow2, ctx.backend
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad dx = dy W: reduce over out_features; W^T keeps W's blocks, transposed
            dyq, dys = quantize_tiles(dy, pow2_scale=pow2, amax_floor=GRAD_AMAX_FLOOR)
            dx = scaled_gemm(dyq, dys, wq.T.contiguous(), ws.T.contiguous(), out_dtype=ctx.x_dtype, backend=backend)
        if ctx.needs_input_grad[1]:  # Wgrad dW = dy^T x: reduce over tokens, both operands re-tiled along them
            dytq, dyts = quantize_tiles(dy.T.contiguous(), pow2_scale=pow2, amax_floor=GRAD_AMAX_FLOOR)
            xtq, xts = quantize_tiles(dequantize_tiles(xq, xs).T.contiguous(), pow2_scale=pow2)
            dw = scaled_gemm(dytq, dyts, xtq, xts, b_blocks=False, out_dtype=ctx.w_dtype, backend=backend)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pow2_scale: bool = False,
               out_dtype: torch.dtype | None = None, backend: Backend = "auto") -> torch.Tensor:
    """y = x W^T (+ b) with FP8 Fprop/Dgrad/Wgrad; x [..., in], weight [out, in] (fp32 master weights)."""
    shape = x.shape
    y = _Fp8LinearFn.apply(x.reshape(-1, shape[-1]), weight, pow2_scale, out_dtype or x.dtype, backend)
    y = y.view(*shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 with fine-grained scales (CPU: exact emulation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, pow2_scale: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 backend: Backend = "auto") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scale = pow2_scale
        self.backend: Backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scale, backend=self.backend)

    @classmethod
    def from_linear(cls, lin: nn.Linear, pow2_scale: bool = False, backend: Backend = "auto") -> Fp8Linear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, pow2_scale,
                  device=lin.weight.device, dtype=lin.weight.dtype, backend=backend)
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        return new
