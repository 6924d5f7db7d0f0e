"""Weight-only int8 inference: each matrix is read as 8-bit codes by a dequantising GEMV, so a decode step reads
about one byte per weight, as llama.cpp reading a Q8_0 GGUF does (34 bytes per 32 weights).

A weight W [out, in] is held as `weight` (int8 [out, in]) and `weight_scale` (bf16 [out]), symmetric per output
channel:  W ≈ q * s,  s = amax|W_row| / 127,  q = round(W / s) in [-127, 127]. Forward for up to GEMV_ROWS rows on
the CPU (decode steps) is torch's int8 weight-only kernel:

    y = bf16( bf16(x) (q * s)^T )  in x's dtype          torch.ops.aten._weight_int8pack_mm

which converts the codes to fp32 8 (AVX2) or 16 (AVX512) at a time, multiplies by the scale and accumulates in fp32
against the activations rounded to bf16; only the int8 codes come from memory. More rows (prefill chunks, bound by
compute) and other devices take the reference: y = x (q * s)^T in x's dtype, the weight dequantised per forward.

Why this kernel (2-core AMD EPYC, AVX2, torch 2.13, batch 1, one thread; `benchmarks/bench_llama.py` for models):
- with bf16 activations it turns ~4-5 G codes/s into fp32 products per core, so it is bound by its arithmetic, not
  by memory: on matrices larger than the caches 2-3x faster than the fp32 GEMV (the 32000x512 head of `small`:
  3.6 ms against 9.9 ms), as fast as it on matrices that stay in them;
- with fp32 or fp16 activations the same op runs a scalar loop (slower than the fp32 GEMV);
- torch._int_mm (int8 activations) is a scalar loop too (15 ms for the head); torch.compile of
  (x * q.float()).sum(-1) * s fuses into one loop over the codes, but inductor's int8 loads and single accumulator
  took 30-34 ms; dequantise-then-GEMM reads the codes and writes and reads fp32 (used only for prefill).
Numerics: the rounding of x and y to bf16 (at most 2^-8 relative each) is all that separates the output from the
dequantised fp32 reference: 0.25% relative per layer, against ~1% for int8's own rounding of the weights. On the
speedrun checkpoints the decode-step top-1 agrees with the reference's at 98.8-99.3% of held-out positions (the
reference with the fp32 model's at 98.9-99.5%): greedy output is unchanged except where two tokens (or two
experts) are within that rounding of each other, and from there it differs (tests/fp8/test_int8.py; BENCHMARKS.md).

The kernel needs in_features to be a multiple of 16 (rows are loaded 8 or 16 values at a time, aligned); every
preset qualifies, other shapes are refused by name. Int8 modules are for inference: no gradients flow.

Every matrix llama.cpp's Q8_0 file stores in 8 bits becomes int8 here: the attention projections, dense MLPs,
shared experts, routed experts, the output head and MTP's eh_proj. The embedding stays in high precision (a decode
step reads one row of it), as do the norms and the MoE router (F32 in the GGUF too). MLA's absorbed decode
(V2 §2.1.2: W_UK folded into the query, W_UV into the output) multiplies by kv_b_proj's matrix per head: it is
dequantised in each forward (a cache-sized temporary; the int8 codes are what is read from memory).

Routed experts (Int8Experts, V3 §2.1.2) run the GEMV per expert on its tokens' rows, so a batch-1 decode step reads
the codes of its K routed experts only: eagerly a loop over the experts that got rows, on views of their codes (one
custom op); in a compiled decode step with few rows each row's expert codes are gathered (a cache-sized copy, under
moe.GATHER_LIMIT codes in all, as the fp32 decode gathers) and the GEMVs unrolled, so that the graph holds no
data-dependent Python (the custom op's Python round trip cost `tiny` half its compiled speed).

    model = quantize_int8(nanoseek.load(path))            # in place; Engine(model) (compile=True too) as usual
    model = nanoseek.load("model-q8_0.gguf", int8=True)   # Q8_0's blocks re-quantised per channel, no fp32 model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Experts, Transformer
from ..model.moe import GATHER_LIMIT, swiglu
from .weights import Fp8Experts, Fp8WeightLinear, _FixedDtypeBuffers, _QuantizedLinear

INT8_MAX = 127
SCALE_DTYPE = torch.bfloat16  # the kernel takes the scales in the activations' dtype
GEMV_ROWS = 64  # up to this many rows the int8 kernel (measured faster); beyond, dequantise + one fp32 GEMM
IN_MULTIPLE = 16  # in_features must be a multiple of this (the kernel's aligned 8/16-value loads)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (the last dimension is reduced): W [..., out, in] -> (q int8 [..., out, in],
    s bf16 [..., out]) with s = amax|W_row| / 127 (rounded to bf16; 1 for an all-zero row), q = round(W / s)
    clamped to [-127, 127]."""
    if not w.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    wf = w.detach().float()
    s = (wf.abs().amax(dim=-1) / INT8_MAX).to(SCALE_DTYPE)
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(wf / s.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = q * s (s per row, broadcast along the last dimension), computed in fp32 and cast to `dtype`."""
    return (q.float() * s.float().unsqueeze(-1)).to(dtype)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., in] times W^T for W = q * s (q int8 [out, in], s bf16 [out]) -> [..., out] in x's dtype: the int8
    GEMV for up to GEMV_ROWS rows on the CPU, else the dequantised reference (see the module docstring)."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if x.device.type == "cpu" and 0 < rows <= GEMV_ROWS and x.dtype in (torch.float32, torch.bfloat16):
        # a fresh bf16 copy: the kernel loads the rows with aligned vector loads
        xb = x.reshape(rows, k).to(torch.bfloat16, copy=True)
        return torch.ops.aten._weight_int8pack_mm(xb, q, s).view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    return F.linear(x, dequantize_rows(q, s, x.dtype))


def _check_in_features(in_features: int, what: str) -> None:
    if in_features % IN_MULTIPLE:
        raise ValueError(f"{what} = {in_features} is not a multiple of {IN_MULTIPLE}, which the int8 GEMV kernel "
                         f"needs (torch.ops.aten._weight_int8pack_mm loads 8-16 values at a time)")


class Int8Linear(_QuantizedLinear):
    """Inference Linear over a per-channel int8 weight: y = x (q * s)^T + b (see the module docstring).

    Buffers `weight` (int8 [out, in]) and `weight_scale` (bf16 [out]); the optional bias stays in high precision.
    `dequantize()` gives the reference weight q * s."""

    _fixed = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_in_features(in_features, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    quantize = staticmethod(quantize_rows)  # W -> q, s per output channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight W = q * s in `dtype` (also what MLA's absorbed form multiplies by, see kv_b_weight)."""
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.weight_scale)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"int8 per-channel"


@torch.library.custom_op("nanoseek::int8_experts", mutates_args=())
def int8_experts(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                 down: torch.Tensor, down_scale: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over int8 weights: rows of x [N, H] grouped by expert (counts[e] rows for expert e, in order)
    -> [N, H]; one GEMV pair per expert that has rows, on views of its codes (no gather of the weights)."""
    out = torch.empty_like(x)
    inter = down.shape[-1]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = x[start : start + n]
            h = int8_matmul(rows, gate_up[e], gate_up_scale[e])
            out[start : start + n] = int8_matmul(swiglu(h[:, :inter], h[:, inter:]), down[e], down_scale[e])
            start += n
    return out


@int8_experts.register_fake
def _(x, counts, gate_up, gate_up_scale, down, down_scale):
    return torch.empty_like(x)


class Int8Experts(_FixedDtypeBuffers):
    """The routed experts of `Experts` (same forward contract) with int8 weights and per-row scales.

    gate_up_proj  int8 [E, 2I, H]  rows [0, I) gate, [I, 2I) up (as Experts);  gate_up_proj_scale  bf16 [E, 2I]
    down_proj     int8 [E, H, I];                                              down_proj_scale     bf16 [E, H]
    """

    _fixed = ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale")

    def __init__(self, n_experts: int, hidden: int, inter: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_in_features(hidden, "hidden_size")
        _check_in_features(inter, "moe_intermediate_size")
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        E = n_experts
        self.register_buffer("gate_up_proj", torch.empty(E, 2 * inter, hidden, dtype=torch.int8, device=device))
        self.register_buffer("gate_up_proj_scale", torch.empty(E, 2 * inter, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("down_proj", torch.empty(E, hidden, inter, dtype=torch.int8, device=device))
        self.register_buffer("down_proj_scale", torch.empty(E, hidden, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_experts(cls, experts: Experts) -> Int8Experts:
        """Quantise every expert's matrices per row (structure only on the meta device)."""
        w1, w2 = experts.weights()
        E, I2, H = w1.shape
        new = cls(E, H, I2 // 2, device=w1.device)
        if w1.device.type != "meta":
            with torch.no_grad():
                for name, w in (("gate_up_proj", w1), ("down_proj", w2)):
                    for e in range(E):  # one expert at a time: no fp32 copy of all of them
                        q, s = quantize_rows(w[e])
                        getattr(new, name)[e] = q
                        getattr(new, name + "_scale")[e] = s
        return new

    def expert_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantised reference (gate_up [E, 2I, H], down [E, H, I]) = q * s."""
        return (dequantize_rows(self.gate_up_proj, self.gate_up_proj_scale, dtype),
                dequantize_rows(self.down_proj, self.down_proj_scale, dtype))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order) -> [N, H]."""
        per_row = self.gate_up_proj[0].numel() + self.down_proj[0].numel()
        if torch.compiler.is_compiling() and x_sorted.shape[0] * per_row <= GATHER_LIMIT:
            return self._gathered(x_sorted, counts)
        return int8_experts(x_sorted, counts, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                            self.down_proj_scale)

    def _gathered(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The compiled decode step's form, without data-dependent Python: each row's expert codes copied out
        (a cache-sized copy of the K chosen experts per token) and one GEMV pair per row, unrolled in the graph."""
        n = x_sorted.shape[0]
        expert = torch.repeat_interleave(torch.arange(self.n_experts, device=counts.device), counts, output_size=n)
        gate_up, gate_up_scale = self.gate_up_proj[expert], self.gate_up_proj_scale[expert]
        down, down_scale = self.down_proj[expert], self.down_proj_scale[expert]
        xb = x_sorted.to(torch.bfloat16)
        out = []
        for j in range(n):
            h = torch.ops.aten._weight_int8pack_mm(xb[j : j + 1], gate_up[j], gate_up_scale[j]).float()
            a = swiglu(h[:, : self.inter], h[:, self.inter :]).to(torch.bfloat16)
            out.append(torch.ops.aten._weight_int8pack_mm(a, down[j], down_scale[j]))
        return torch.cat(out).to(x_sorted.dtype)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, int8 per-channel"


def quantize_int8(model: Transformer) -> Transformer:
    """In place: every nn.Linear (attention, dense MLPs, shared experts, lm_head, MTP's eh_proj) becomes an Int8Linear
    and the routed experts Int8Experts, each weight quantised per output channel. The embedding, norms and MoE gates
    are untouched. On a meta-device model only the structure changes. ValueError naming the layer for a shape the
    kernel cannot take, TypeError for FP8 weight modules (quantise the high-precision model). Returns `model`."""
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            where = f"{path}.{name}" if path else name
            if isinstance(child, (Fp8WeightLinear, Fp8Experts)):
                raise TypeError(f"{where} holds FP8 weights: load the model without keep_fp8 to quantise it to int8")
            try:
                if isinstance(child, nn.Linear):  # also a training Fp8Linear (its master weights)
                    setattr(module, name, Int8Linear.from_linear(child))
                elif isinstance(child, Experts):  # also the training variants (same parameters)
                    setattr(module, name, Int8Experts.from_experts(child))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return model


def int8_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by the int8 modules' codes and scales, bytes the same weights take in fp32)."""
    held = dense = 0
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Experts)):
            for name in m._fixed:
                t = m._buffers[name]
                held += t.numel() * t.element_size()
                if t.dtype == torch.int8:
                    dense += t.numel() * 4
    return held, dense
