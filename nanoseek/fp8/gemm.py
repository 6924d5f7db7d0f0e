"""One FP8 GEMM with fine-grained scales, three ways to run it.

    C [M, N] = A [M, K] @ B [N, K]^T,   A in E4M3 with 1x128 tiles along K (scales [M, ceil(K/128)]),
                                        B in E4M3 with 128x128 blocks (scales [ceil(N/128), ceil(K/128)])
                                        or with 1x128 tiles along K  (scales [N, ceil(K/128)]).

The products of each 128-wide slice of K are summed in fp32 and scaled by that slice's scales before they join
the fp32 accumulator (DeepSeek-V3 §3.3: promotion every 128 elements). Backends:
  emulate    dequantise each operand tile by tile, one fp32 GEMM per 128-slice, summed in fp32 (any device;
             the reference the other two are checked against)
  rowwise    one `torch._scaled_mm` per 128-slice with row-wise scales (the slice's tile scale per row of A,
             the block/tile scale per row of B), fp32 output, summed in fp32: runs on CPUs (tested here) and on
             CUDA GPUs with FP8 (compute capability >= 8.9)
  blockwise  a single `torch._scaled_mm` with 1x128 / 128x128 scales (torch's CUTLASS kernel on Hopper)
`auto` picks emulate on the CPU; on an FP8-capable GPU it probes blockwise, then rowwise, each against the
emulation on a small problem, and keeps the first that agrees (once per device).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .quant import BLOCK, quantize_tiles, quantize_weight_block

Backend = Literal["auto", "emulate", "rowwise", "blockwise"]
BACKENDS = ("auto", "emulate", "rowwise", "blockwise")


def _expand_rows(scale: torch.Tensor, n: int, block_rows: bool) -> torch.Tensor:
    """Per-row scales [n, n_k] of B from blocks [ceil(n/128), n_k] (repeat each block row 128 times) or tiles."""
    return scale.repeat_interleave(BLOCK, 0)[:n] if block_rows else scale


def _per_slice(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, b_blocks: bool,
               slice_mm) -> torch.Tensor:
    """sum over 128-slices j of K of slice_mm(A_j, sA_j [M, 1], B_j, sB_j [N, 1]), accumulated in fp32."""
    m, k = a.shape
    n = b.shape[0]
    sb_rows = _expand_rows(sb.float(), n, b_blocks)
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for j, s in enumerate(range(0, k, BLOCK)):
        out += slice_mm(a[:, s : s + BLOCK], sa[:, j : j + 1].float(), b[:, s : s + BLOCK], sb_rows[:, j : j + 1])
    return out


def _dequant_mm(aj: torch.Tensor, saj: torch.Tensor, bj: torch.Tensor, sbj: torch.Tensor) -> torch.Tensor:
    return (aj.float() * saj) @ (bj.float() * sbj).T


def _scaled_mm_rowwise(aj: torch.Tensor, saj: torch.Tensor, bj: torch.Tensor, sbj: torch.Tensor) -> torch.Tensor:
    # bj contiguous [N, 128] row-major: bj.T is the column-major mat2 _scaled_mm wants
    return torch._scaled_mm(aj.contiguous(), bj.contiguous().T, scale_a=saj.contiguous(),
                            scale_b=sbj.reshape(1, -1).contiguous(), out_dtype=torch.float32)


def _emulate(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    return _per_slice(a, sa, b, sb, b_blocks, _dequant_mm)


def _rowwise(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    return _per_slice(a, sa, b, sb, b_blocks, _scaled_mm_rowwise)


def _blockwise(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, layout: int = 0) -> torch.Tensor:
    """One block-scaled `_scaled_mm` (bf16 out). torch wants mat2 column-major and B's scales as [K/128, .];
    `layout` 0 passes A's scales outer-dim (M) major as Hopper's kernel reads them, 1 row-major."""
    scale_a = sa.float().t().contiguous().t() if layout == 0 else sa.float().contiguous()
    return torch._scaled_mm(a.contiguous(), b.contiguous().T, scale_a=scale_a, scale_b=sb.float().t().contiguous(),
                            out_dtype=torch.bfloat16)


def scaled_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
                b_blocks: bool = True, out_dtype: torch.dtype = torch.float32,
                backend: Backend = "auto") -> torch.Tensor:
    """A @ B^T for FP8 A [M, K] (1x128 scales along K) and FP8 B [N, K] (128x128 blocks, or 1x128 tiles along K
    when `b_blocks` is False); the result in `out_dtype`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_gemm needs A [M, K] and B [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if backend == "auto":
        backend = resolve_backend(a.device)
    if (backend == "blockwise" or (backend == "rowwise" and a.device.type == "cuda")) and not fp8_supported(a.device):
        raise ValueError(f"the {backend} FP8 backend needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                         f"on {a.device} use 'emulate'" + (" or 'rowwise'" if a.device.type == "cpu" else ""))
    if backend in ("rowwise", "blockwise") and not _shapes_ok(b.shape[0], a.shape[1], backend, a.device):
        backend = "emulate"
    if backend == "blockwise":
        layout = _probe(*_device_key(a.device))[1] if fp8_supported(a.device) else 0
        return _blockwise(a, a_scale, b, b_scale, layout).to(out_dtype)
    if backend == "rowwise":
        return _rowwise(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
    if backend == "emulate":
        return _emulate(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
    raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {BACKENDS}")


def _shapes_ok(n: int, k: int, backend: str, device: torch.device) -> bool:
    """The FP8 tensor-core kernels need K and N in multiples of 16 (CUDA); the block-scaled one whole 128-blocks
    of K. Other shapes (the tiny test models) take the emulation."""
    if device.type != "cuda":
        return True  # the CPU's _scaled_mm (row-wise) takes any shape
    if k % 16 or n % 16:
        return False
    return backend != "blockwise" or k % BLOCK == 0


def fp8_supported(device: torch.device) -> bool:
    """A GPU with FP8 tensor cores (Ada / Hopper and later: compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_backend(device: torch.device | str) -> str:
    """`auto` for tensors on `device`: emulate on the CPU; on an FP8 GPU the first of blockwise / rowwise whose
    result agrees with the emulation on a probe problem."""
    device = torch.device(device)
    if not fp8_supported(device):
        return "emulate"
    return _probe(*_device_key(device))[0]


def _device_key(device: torch.device) -> tuple[str, int]:
    return device.type, torch.cuda.current_device() if device.index is None else device.index


@functools.cache
def _probe(dev_type: str, index: int) -> tuple[str, int]:
    """(backend, blockwise scale layout) that reproduce the emulation on this device; a cached capability check."""
    device = torch.device(dev_type, index)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 512, device=device, generator=gen)
    w = torch.randn(384, 512, device=device, generator=gen)
    (xq, xs), (wq, ws), (yq, ys) = quantize_tiles(x), quantize_weight_block(w), quantize_tiles(w)

    def agrees(fn) -> bool:
        for b, sb, blocks in ((wq, ws, True), (yq, ys, False)):
            ref = _emulate(xq, xs, b, sb, blocks)
            try:
                got = fn(b, sb, blocks).float()
            except RuntimeError:
                return False
            if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()):  # bf16 out: 2^-8
                return False
        return True

    for layout in (0, 1):
        if agrees(lambda b, sb, blocks, lay=layout: _blockwise(xq, xs, b, sb, lay)):
            return "blockwise", layout
    if agrees(lambda b, sb, blocks: _rowwise(xq, xs, b, sb, blocks)):
        return "rowwise", 0
    return "emulate", 0
