"""FP8 GEMMs with fine-grained scales and FP32 accumulation promoted every 128 elements (DeepSeek-V3 §3.3).

All three GEMMs of a Linear take E4M3 operands:
  Fprop  y  = x W^T     x tiles 1x128 along in_features,  W blocks 128x128
  Dgrad  dx = dy W      dy tiles 1x128 along out_features, W blocks 128x128 (the same blocks, transposed use)
  Wgrad  dW = dy^T x    dy^T and x^T re-tiled 1x128 along the tokens (x is saved in FP8 and re-quantised)
This module is the CPU emulation: each 128-wide slice of the reduction dimension is one fp32 GEMM on the
dequantised tiles, and the slices are summed in fp32 — the arithmetic of the hardware recipe, testable on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import (
    BLOCK,
    dequantize_tiles,
    dequantize_weight_block,
    fake_quantize_tiles,
    quantize_tiles,
    quantize_weight_block,
)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, chunk: int = BLOCK) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T on already-dequantised FP8 values, accumulated in fp32 per `chunk` of K."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[1], chunk):
        out += a[:, s : s + chunk] @ b[:, s : s + chunk].T
    return out


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2: bool, out_dtype: torch.dtype):  # type: ignore[override]
        xq, xs = quantize_tiles(x, pow2_scale=pow2)
        wq, ws = quantize_weight_block(weight, pow2_scale=pow2)
        y = fp8_gemm(dequantize_tiles(xq, xs), dequantize_weight_block(wq, ws))
        ctx.save_for_backward(xq, xs, wq, ws)  # activations kept in FP8 for the backward GEMMs
        ctx.pow2, ctx.x_dtype, ctx.w_dtype = pow2, x.dtype, weight.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        xq, xs, wq, ws = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: reduce over out_features
            w = dequantize_weight_block(wq, ws)  # [N, K]
            dx = fp8_gemm(fake_quantize_tiles(dy, pow2_scale=ctx.pow2), w.T.contiguous()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad: reduce over tokens, operands re-tiled along the token dim
            dyt = fake_quantize_tiles(dy.T.contiguous(), pow2_scale=ctx.pow2)
            xt = fake_quantize_tiles(dequantize_tiles(xq, xs).T.contiguous(), pow2_scale=ctx.pow2)
            dw = fp8_gemm(dyt, xt).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pow2_scale: bool = False,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with FP8 Fprop/Dgrad/Wgrad; x [..., in], weight [out, in] (fp32 master weights)."""
    shape = x.shape
    y = _Fp8LinearFn.apply(x.reshape(-1, shape[-1]), weight, pow2_scale, out_dtype or x.dtype)
    y = y.view(*shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 with fine-grained scales (CPU: exact emulation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, pow2_scale: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scale = pow2_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scale)

    @classmethod
    def from_linear(cls, lin: nn.Linear, pow2_scale: bool = False) -> Fp8Linear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, pow2_scale,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        return new
