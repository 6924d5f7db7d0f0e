"""FP8 grouped GEMM for the routed experts (tokens sorted by expert), emulated, and `Fp8GroupedExperts`, the
module `convert_to_fp8` swaps in for `Experts` (DeepSeek-V3 §3.3: the routed experts' GEMMs run in FP8).

Fprop/Dgrad quantise activations per 1x128 tile along the reduction dim and each expert's weight per 128x128
block; Wgrad re-tiles dy and x along the (sorted) token dim in tiles of 128 consecutive tokens. The dequantised
operands go through the same grouped GEMM as the high-precision path (`torch._grouped_mm` where it runs for the
device and dtype, else one GEMM per expert over the same operands), accumulating in fp32 on the CPU.
"""

from __future__ import annotations

import functools
from typing import Self

import torch

from ..model.moe import Experts, compute_dtype, grouped_mm_ok
from .quant import (
    GRAD_AMAX_FLOOR,
    dequantize_tiles,
    dequantize_weight_block,
    fake_quantize_tiles,
    quantize_tiles,
    quantize_weight_block,
)
from .swiglu import fp8_swiglu


def _qdq_experts(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Each expert's [out, in] matrix through 128x128 block quantisation, all experts at once: rows are padded
    to a multiple of 128 so that no block straddles two experts."""
    E, out, inp = w.shape
    pad = (-out) % 128
    wp = torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w
    flat = wp.reshape(E * (out + pad), inp)
    deq = dequantize_weight_block(*quantize_weight_block(flat, pow2_scale=pow2))
    return deq.view(E, out + pad, inp)[:, :out]


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of group g of a [N, k] times b[g] [k, n] -> [N, n]: `torch._grouped_mm` where it runs for a's device and
    dtype, else one GEMM per group (the same products; only the kernel differs)."""
    if grouped_mm_ok(a):
        return torch._grouped_mm(a, b, offs=offs)
    return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(_bounds(offs))])


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
        return _gmm(dequantize_tiles(xq, xs).to(dt), wd.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xq, xs, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        pow2, dt = ctx.pow2, ctx.dt
        wd = _qdq_experts(w, pow2).to(dt)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = fake_quantize_tiles(dy, pow2_scale=pow2, amax_floor=GRAD_AMAX_FLOOR)
            dx = _gmm(dyq.to(dt), wd, offs)
        if ctx.needs_input_grad[1]:
            dy_t = fake_quantize_tiles(dy.T.contiguous(), pow2_scale=pow2,
                                       amax_floor=GRAD_AMAX_FLOOR).T  # tiles of 128 tokens per output channel
            x_t = fake_quantize_tiles(dequantize_tiles(xq, xs).T.contiguous(), pow2_scale=pow2).T
            x_t, dy_t = x_t.to(dt).contiguous(), dy_t.to(dt).contiguous()
            if grouped_mm_ok(x_t):  # dW[g] = dy_g^T x_g as the grouped GEMM's own weight gradient
                with torch.enable_grad():
                    wv = wd.detach().requires_grad_()
                    y = torch._grouped_mm(x_t, wv.transpose(1, 2), offs=offs)
                    (dw,) = torch.autograd.grad(y, wv, grad_outputs=dy_t)
            else:
                dw = torch.stack([dy_t[s:e].T @ x_t[s:e] for s, e in _bounds(offs)])
            dw = dw.to(w.dtype)
        return dx, dw, None, None


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """Rows of x sorted by expert; rows of group e times w[e]^T, with FP8 operands.  x [N, in], w [E, out, in]."""
    return _Fp8GroupedFn.apply(x, w, offs, pow2_scale)


@functools.cache
def _float8_ok(device_type: str) -> bool:
    """Whether tensors on this kind of device can be cast to float8_e4m3fn and back (the quantisation needs it)."""
    try:
        torch.ones(1, device=device_type).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def check_fp8_experts(device: torch.device, dtype: torch.dtype) -> None:
    """Raise unless FP8 routed experts can run for tensors of this device and dtype (no silent high-precision
    fallback: `count_fp8_gemms` counts these GEMMs as FP8)."""
    if device.type == "meta":  # a model being planned (built on meta, materialised later): checked when it runs
        return
    if not (dtype.is_floating_point and dtype.itemsize >= 2 and _float8_ok(device.type)):
        raise RuntimeError(
            f"FP8 routed experts cannot run for {dtype} tensors on {device}: the FP8 quantisation needs "
            "floating-point tensors of 16 bits or more on a device with float8_e4m3fn support (CPU, CUDA); "
            "run this model without FP8 (or with the emulated BF16 baseline) instead")


class Fp8GroupedExperts(Experts):
    """Routed experts whose two grouped GEMMs -- Fprop, Dgrad and Wgrad -- take FP8 operands (1x128 activation
    tiles, 128x128 blocks of each expert's weight; V3 §3.3) and whose SwiGLU keeps its inputs in FP8 for the
    backward. Swapped in for `Experts` by `convert_to_fp8` over the same parameters (gate_up_proj, down_proj).
    Emulated: the dequantised operands go through the grouped GEMM, on any device (an FP8 `backend` applies to
    the Linear layers only). Raises at construction or call where the quantisation cannot run."""

    pow2_scale: bool = False

    @classmethod
    def from_experts(cls, experts: Experts, pow2_scale: bool = False) -> Self:
        p = experts.gate_up_proj
        check_fp8_experts(p.device, p.dtype)
        new = super().from_experts(experts)
        new.pow2_scale = pow2_scale
        return new

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order)."""
        x = x_sorted.to(compute_dtype(x_sorted))
        check_fp8_experts(x.device, x.dtype)
        offs = counts.cumsum(0).to(torch.int32)
        pow2 = self.pow2_scale
        w1, w2 = self.weights()
        gate, up = fp8_grouped_linear(x, w1, offs, pow2).chunk(2, dim=-1)
        return fp8_grouped_linear(fp8_swiglu(gate, up, pow2), w2, offs, pow2)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, inter={self.inter}, fp8 (1x128 tiles, 128x128 blocks), " \
               f"pow2_scale={self.pow2_scale}"
