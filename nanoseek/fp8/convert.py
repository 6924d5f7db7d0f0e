"""Switch a model's GEMMs to FP8 where DeepSeek-V3 does: attention projections, dense MLPs, shared and routed
experts. Embedding, output head, MoE gate, norms, MTP's eh_proj and the attention core stay in high precision.
Parameter names do not change, so checkpoints are the same with and without FP8."""

from __future__ import annotations

import functools
from collections.abc import Iterator

from torch import nn

from ..model import MLA, MLP, Experts, Transformer
from .gemm import Backend
from .grouped import Fp8GroupedExperts
from .linear import Fp8Linear
from .swiglu import fp8_swiglu


def low_precision_sites(model: Transformer) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """The GEMMs DeepSeek-V3 runs in FP8 (V3 §3.3): (parent, name, child) for every plain nn.Linear of MLA and MLP
    (dense layers, shared experts) and every plain routed-experts module (`Experts`). Modules already swapped for a
    low-precision variant are not listed again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (type(child) is nn.Linear and isinstance(module, (MLA, MLP))) or type(child) is Experts:
                yield module, name, child


def convert_to_fp8(model: Transformer, pow2_scale: bool = False, backend: Backend = "auto") -> Transformer:
    """In place: Linear layers of MLA and MLP/shared experts become Fp8Linear (their GEMMs on `backend`, see
    `gemm.scaled_gemm`); routed experts become Fp8GroupedExperts (FP8 GEMMs, emulated: dequantised tiles through the
    grouped GEMM); every SwiGLU keeps its inputs in FP8 for the backward (`swiglu.fp8_swiglu`). The new modules hold
    the same Parameters under the same names."""
    for parent, name, child in low_precision_sites(model):
        if isinstance(child, Experts):
            setattr(parent, name, Fp8GroupedExperts.from_experts(child, pow2_scale))
        else:
            setattr(parent, name, Fp8Linear.from_linear(child, pow2_scale, backend))
            if isinstance(parent, MLP):  # SwiGLU inputs kept in FP8, its output recomputed in the backward
                parent.act = functools.partial(fp8_swiglu, pow2_scale=pow2_scale)
    return model


def count_fp8_gemms(model: Transformer) -> int:
    """Number of FP8 GEMM sites: Fp8Linear modules, plus two grouped GEMMs per Fp8GroupedExperts."""
    return sum(isinstance(m, Fp8Linear) + 2 * isinstance(m, Fp8GroupedExperts) for m in model.modules())
