"""Block-scaled FP8 (E4M3) weights, in the layout of the DeepSeek-V3 FP8 release.

A weight W [out, in] is stored as W_q = W / s per 128x128 block in float8_e4m3fn plus
`weight_scale_inv` = s of shape [ceil(out/128), ceil(in/128)], with s = amax(block) / 448.
Dequantisation: W = W_q * s (edge blocks are simply smaller).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
AMAX_FLOOR = 1e-4  # activations and weights (V3 §3.3.2): a near-zero tile does not blow its scale up
# Gradients are small by construction (the loss is a mean over every token of the batch: a per-element dy of 1e-8
# is typical at 4K tokens per step and ~1e-11 at V3's 60M), so the activation floor would fix their scale at
# 1e-4/448 and push whole tiles into E4M3's subnormals or to zero. Their floor only guards an all-zero tile.
GRAD_AMAX_FLOOR = 1e-30


def _expand_scale(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    rows, cols = shape[-2:]
    return scale.repeat_interleave(block, -2)[..., :rows, :].repeat_interleave(block, -1)[..., :cols]


def quantize_weight_block(
    w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/b), ceil(in/b)])."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    wf = w.float()
    padded = wf.new_zeros(nr * block, nc * block)
    padded[:rows, :cols] = wf
    tiles = padded.view(nr, block, nc, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(amax_floor)
    scale = amax / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nr * block, nc * block)
    return q[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_weight_block(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    """float8 weight [..., out, in] times its per-block scale [..., ceil(out/b), ceil(in/b)] -> `dtype`."""
    rows, cols = q.shape[-2:]
    want = (*q.shape[:-2], -(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for weight {(rows, cols)}"
        )
    return (q.float() * _expand_scale(scale_inv.float(), q.shape, block)).to(dtype)


def quantize_tiles(
    x: torch.Tensor, tile: int = BLOCK, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations per 1 x `tile` tile along the last dim: x [M, K] -> (fp8 [M, K], scale fp32 [M, ceil(K/tile)]).

    scale = max(amax(tile), amax_floor) / 448 (floor 1e-4 for activations, `GRAD_AMAX_FLOOR` for gradients),
    optionally rounded up to a power of two (`2^ceil(log2 s)`); a last tile
    narrower than `tile` (K not a multiple) is scaled by its own amax.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    n_t = -(-k // tile)
    xf = x.float()
    if k % tile:
        xf = torch.nn.functional.pad(xf, (0, n_t * tile - k))
    tiles = xf.view(m, n_t, tile)
    scale = tiles.abs().amax(dim=-1).clamp_min(amax_floor) / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, n_t * tile)[:, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_tiles`, in fp32."""
    return q.float() * scale.repeat_interleave(tile, dim=1)[:, : q.shape[1]]


def fake_quantize_tiles(x: torch.Tensor, tile: int = BLOCK, pow2_scale: bool = False,
                        amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """x through 1 x `tile` FP8 quantisation and back (fp32): the values an FP8 GEMM sees."""
    return dequantize_tiles(*quantize_tiles(x, tile, pow2_scale, amax_floor), tile)
