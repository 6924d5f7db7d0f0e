"""FP8 (E4M3) fine-grained quantisation."""

from .quant import BLOCK, FP8_MAX, dequantize_weight_block, quantize_weight_block

__all__ = ["BLOCK", "FP8_MAX", "dequantize_weight_block", "quantize_weight_block"]
