"""FP8 (E4M3) fine-grained quantisation: 1x128 activation tiles, 128x128 weight blocks, FP8 GEMMs."""

from .bf16 import Bf16EmulatedExperts, Bf16EmulatedLinear, emulate_bf16_gemms, round_bf16
from .convert import convert_to_fp8, count_fp8_gemms
from .gemm import BACKENDS, resolve_backend, scaled_gemm
from .grouped import Fp8GroupedExperts, fp8_grouped_linear
from .linear import Fp8Linear, fp8_linear
from .quant import (
    BLOCK,
    FP8_MAX,
    dequantize_tiles,
    dequantize_weight_block,
    quantize_tiles,
    quantize_weight_block,
)
from .swiglu import fp8_swiglu

__all__ = [
    "BACKENDS", "BLOCK", "Bf16EmulatedExperts", "Bf16EmulatedLinear", "FP8_MAX", "Fp8GroupedExperts", "Fp8Linear",
    "emulate_bf16_gemms", "round_bf16",
    "convert_to_fp8", "count_fp8_gemms", "dequantize_tiles",
    "dequantize_weight_block", "fp8_grouped_linear", "fp8_linear", "fp8_swiglu", "quantize_tiles",
    "quantize_weight_block", "resolve_backend", "scaled_gemm",
]
