"""FP8 weight-only inference: weights stay in memory as in the DeepSeek-V3 FP8 release and are dequantised per
128x128 block in each forward.

A weight W [out, in] is held as `weight` (float8_e4m3fn [out, in]) and `weight_scale_inv` (fp32
[ceil(out/128), ceil(in/128)]) with  W ≈ q * scale_inv  per 128x128 block (edge blocks are smaller). Activations
stay in high precision: forward is  y = x dequant(q, scale_inv)^T (+ b)  in the activation dtype.

The FP8 layers are those the V3 release stores in FP8 (and `save(..., fp8=True)` writes in FP8): the attention
projections, the dense MLPs, the shared experts and the routed experts. The embedding, the output head, the MoE
gate, the norms and MTP's eh_proj stay in high precision.

    model = quantize_model_weights(nanoseek.load(path))        # quantise an already-loaded model in place
    model = nanoseek.load(path, keep_fp8=True)                 # or load FP8 checkpoint weights as they are
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLA, MLP, Experts, Transformer
from ..model.moe import grouped_linear
from .quant import BLOCK, dequantize_weight_block, quantize_weight_block

FP8_DTYPE = torch.float8_e4m3fn
_BITS = {torch.float8_e4m3fn: torch.uint8, torch.float32: torch.int32,  # same-size integer views
         torch.bfloat16: torch.int16, torch.int8: torch.int8}  # (the last two: nanoseek.fp8.int8)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = q * scale_inv per 128x128 block, computed in fp32 and cast to `dtype` (bit-identical to
    `dequantize_weight_block`; without materialising the expanded scales when no block is ragged)."""
    rows, cols = q.shape[-2:]
    nr, nc = scale_inv.shape[-2:]
    if rows != nr * BLOCK or cols != nc * BLOCK:
        return dequantize_weight_block(q, scale_inv, dtype)
    lead = q.shape[:-2]
    w = q.float().reshape(*lead, nr, BLOCK, nc, BLOCK) * scale_inv.float()[..., :, None, :, None]
    return w.reshape(*lead, rows, cols).to(dtype)


class _FixedDtypeBuffers(nn.Module):
    """Buffers in `_fixed` keep their dtype through `.to(dtype)`, `.half()`, ...: FP8 codes and fp32 scales
    are not values to cast (casting the codes would drop the scale). Device moves and `to_empty` apply."""

    _fixed: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        dtypes = {name: self._buffers[name].dtype for name in self._fixed}
        for name, dt in dtypes.items():  # integer views of the same bits: dtype casts skip them
            self._buffers[name] = self._buffers[name].view(_BITS[dt])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dt in dtypes.items():
                self._buffers[name] = self._buffers[name].view(dt)


class _QuantizedLinear(_FixedDtypeBuffers):
    """An inference Linear whose weight is held as `_fixed` = (codes, scales), made by the subclass's
    `quantize(W) -> (codes, scales)`."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> _QuantizedLinear:
        """The quantised copy of `lin`. On the meta device only the structure is made (the loader fills it)."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device,  # type: ignore[call-arg]
                  dtype=lin.bias.dtype if lin.bias is not None else None)
        if w.device.type != "meta":
            with torch.no_grad():
                for name, t in zip(cls._fixed, cls.quantize(w.detach()), strict=True):
                    getattr(new, name).copy_(t)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias)
        return new


class Fp8WeightLinear(_QuantizedLinear):
    """Inference Linear over a block-scaled FP8 weight: y = x (q * scale_inv)^T + b, dequantised per forward.

    Buffers `weight` (float8_e4m3fn [out, in]) and `weight_scale_inv` (fp32 [ceil(out/128), ceil(in/128)]) have
    the names and layout of the FP8 release's `*.weight` / `*.weight_scale_inv`; the optional bias stays in high
    precision. No autograd through the weight (gradients w.r.t. the input still flow)."""

    _fixed = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(
            _blocks(out_features), _blocks(in_features), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    quantize = staticmethod(quantize_weight_block)  # W -> q, scale_inv with scale_inv = amax(block) / 448

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight W = q * scale_inv (per 128x128 block) in `dtype`."""
        return dequantize_blocks(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"fp8 {tuple(self.weight_scale_inv.shape)} blocks of {BLOCK}x{BLOCK}"


class Fp8Experts(_FixedDtypeBuffers):
    """The routed experts of `Experts` (same forward contract) with FP8 weights, per-expert block scales.

    gate_up_proj   float8 [E, 2I, H]   rows [0, I) gate, [I, 2I) up (as Experts)
    down_proj      float8 [E, H, I]
    gate_up_proj_scale_inv  fp32 [E, 2 ceil(I/128), ceil(H/128)]   gate blocks, then up blocks
    down_proj_scale_inv     fp32 [E, ceil(H/128), ceil(I/128)]
    Gate and up are blocked separately (each expert's gate_proj / up_proj has its own scales in the release), so
    with I a multiple of 128 the gate_up scales equal a plain 128x128 blocking of the stacked [2I, H] matrix.
    Forward dequantises (W = q * scale_inv per block) the experts that got tokens, all at once, and runs one
    grouped GEMM over them.
    """

    _fixed = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")

    def __init__(self, n_experts: int, hidden: int, inter: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        E, nh, ni = n_experts, _blocks(hidden), _blocks(inter)
        self.register_buffer("gate_up_proj", torch.empty(E, 2 * inter, hidden, dtype=FP8_DTYPE, device=device))
        self.register_buffer("down_proj", torch.empty(E, hidden, inter, dtype=FP8_DTYPE, device=device))
        self.register_buffer("gate_up_proj_scale_inv", torch.empty(E, 2 * ni, nh, dtype=torch.float32, device=device))
        self.register_buffer("down_proj_scale_inv", torch.empty(E, nh, ni, dtype=torch.float32, device=device))

    @classmethod
    def from_experts(cls, experts: Experts) -> Fp8Experts:
        """Block-quantise every expert's gate, up and down matrix (structure only on the meta device)."""
        E, I2, H = experts.gate_up_proj.shape
        inter, ni = I2 // 2, _blocks(I2 // 2)
        new = cls(E, H, inter, device=experts.gate_up_proj.device)
        if experts.gate_up_proj.device.type == "meta":
            return new
        with torch.no_grad():
            for e in range(E):
                for part, rows in enumerate(((0, inter), (inter, I2))):
                    q, s = quantize_weight_block(experts.gate_up_proj[e, rows[0] : rows[1]].detach())
                    new.gate_up_proj[e, rows[0] : rows[1]] = q
                    new.gate_up_proj_scale_inv[e, part * ni : (part + 1) * ni] = s
                q, s = quantize_weight_block(experts.down_proj[e].detach())
                new.down_proj[e], new.down_proj_scale_inv[e] = q, s
        return new

    def expert_weights(
        self, experts: torch.Tensor, dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised (gate_up [n, 2I, H], down [n, H, I]) of the experts `experts` [n]: W = q * scale_inv."""
        inter, ni = self.inter, _blocks(self.inter)
        q, s = self.gate_up_proj[experts], self.gate_up_proj_scale_inv[experts]
        gate_up = torch.cat((dequantize_blocks(q[:, :inter], s[:, :ni], dtype),
                             dequantize_blocks(q[:, inter:], s[:, ni:], dtype)), dim=1)
        return gate_up, dequantize_blocks(self.down_proj[experts], self.down_proj_scale_inv[experts], dtype)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order) -> [N, H]."""
        active = counts.nonzero().squeeze(1)  # only these experts' weights are dequantised
        n = counts[active]
        offs = n.cumsum(0).to(torch.int32)
        gate_up, down = self.expert_weights(active, x_sorted.dtype)
        gate, up = grouped_linear(x_sorted, gate_up, n, offs).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, down, n, offs)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, fp8 blocks of {BLOCK}x{BLOCK}"


def quantize_model_weights(model: Transformer) -> Transformer:
    """In place: the Linear layers of attention (MLA), dense MLPs and shared experts become Fp8WeightLinear and
    the routed experts Fp8Experts, each weight block-quantised (W ≈ q * scale_inv per 128x128 block) — exactly
    the tensors that `save(model, path, fp8=True)` writes in FP8. Embedding, lm_head, MoE gates, norms and MTP's
    eh_proj are untouched. On a meta-device model only the structure changes. Returns `model`."""
    for module in list(model.modules()):
        if isinstance(module, (MLA, MLP)):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):  # also a training Fp8Linear (convert_to_fp8)
                    setattr(module, name, Fp8WeightLinear.from_linear(child))
        for name, child in list(module.named_children()):
            if isinstance(child, Experts):  # also a training variant (Fp8GroupedExperts, Bf16EmulatedExperts)
                setattr(module, name, Fp8Experts.from_experts(child))
    return model


def quantized_bytes(model: nn.Module, kinds: tuple[type, ...], code_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes held by the `kinds` modules' fixed buffers -- codes and scales --, bytes their `code_dtype` codes would
    take in fp32)."""
    held = dense = 0
    for m in model.modules():
        if isinstance(m, kinds):
            for name in m._fixed:
                t = m._buffers[name]
                held += t.numel() * t.element_size()
                if t.dtype == code_dtype:
                    dense += t.numel() * 4
    return held, dense


def fp8_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by the FP8 modules' weights and scales, bytes the same weights take in fp32)."""
    return quantized_bytes(model, (Fp8WeightLinear, Fp8Experts), FP8_DTYPE)
