"""BF16 GEMMs emulated in fp32: the baseline that FP8 training is measured against, runnable on any CPU.

A BF16 tensor-core GEMM under autocast reads bf16 operands, accumulates in fp32 and writes bf16; in the backward
the incoming gradient is bf16 and so are the gradients it produces for the bf16 copies of activation and weight.
`round_bf16` rounds to the nearest bf16 in the forward and rounds the gradient the same way in the backward, so

    y = round(round(x) round(W)^T)

in fp32 GEMMs has exactly that arithmetic in all three GEMMs (Fprop, Dgrad, Wgrad), up to the accumulation order.
`emulate_bf16_gemms` applies it at the sites `convert_to_fp8` switches to FP8 (attention projections, dense MLPs,
shared and routed experts), so a BF16 arm and an FP8 arm of a study differ in those GEMMs' operand format only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Experts, Transformer
from ..model.moe import compute_dtype, grouped_linear, swiglu
from .convert import low_precision_sites


class _RoundBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g.to(torch.bfloat16).to(g.dtype)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (kept in x's dtype); its gradient is rounded to bf16 too."""
    return _RoundBf16.apply(x)


class Bf16EmulatedLinear(nn.Linear):
    """nn.Linear whose GEMMs see bf16 operands and write bf16 outputs, computed in fp32 (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(round_bf16(x), round_bf16(self.weight))
        y = round_bf16(y)
        return y + self.bias if self.bias is not None else y

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Bf16EmulatedLinear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                  dtype=lin.weight.dtype)
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        return new


class Bf16EmulatedExperts(Experts):
    """Routed experts (`Experts`, same parameters) whose two grouped GEMMs see bf16 operands and write bf16 outputs,
    computed in the high-precision grouped GEMM (see module doc); swapped in by `emulate_bf16_gemms`."""

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order)."""
        offs = counts.cumsum(0).to(torch.int32)
        x = x_sorted.to(compute_dtype(x_sorted))
        r = round_bf16
        w1, w2 = self.weights()
        gate, up = r(grouped_linear(r(x), r(w1), counts, offs)).chunk(2, dim=-1)
        return r(grouped_linear(r(swiglu(gate, up)), r(w2), counts, offs))


def emulate_bf16_gemms(model: Transformer) -> Transformer:
    """In place: the GEMMs that FP8 training quantises run as emulated BF16 GEMMs instead. Parameters are shared
    with the original modules, so an optimizer built before the call keeps working."""
    for parent, name, child in low_precision_sites(model):
        if isinstance(child, Experts):
            setattr(parent, name, Bf16EmulatedExperts.from_experts(child))
        else:
            setattr(parent, name, Bf16EmulatedLinear.from_linear(child))
    return model
