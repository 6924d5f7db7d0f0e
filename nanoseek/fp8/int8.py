"""Weight-only int8 inference: each matrix is read as 8-bit codes by a dequantising GEMV, so a decode step reads
about one byte per weight, as llama.cpp reading a Q8_0 GGUF does (34 bytes per 32 weights).

A weight W [out, in] is held as `weight` (int8 [out, in]) and `weight_scale` (bf16 [out]), symmetric per output
channel:  W ≈ q * s,  s = amax|W_row| / 127,  q = round(W / s) in [-127, 127]. Forward for up to GEMV_ROWS rows on
the CPU (decode steps) is one of two kernels; only the int8 codes come from memory in either:

    large matrices (>= FBGEMM_MIN_CODES, a module's own weight), fbgemm's int8 x int8 GEMM (x86):
        x = m (hi + lo / 126) per row, m = amax|x_row| / 63, hi and lo integers in [-63, 63]   (two 7-bit parts)
        y = m (hi (q s)^T + lo (q s)^T / 126)                   one GEMM of 2 rows, int32 sums, fp32 out
    the rest (and every routed expert, read as a view of the stack):
        y = bf16( bf16(x) (q * s)^T )  in x's dtype              torch.ops.aten._weight_int8pack_mm

More rows (prefill chunks, bound by compute) and other devices take the reference: y = x (q * s)^T in x's dtype,
the weight dequantised per forward.

Why these kernels (2-core AMD EPYC, AVX2, torch 2.13, batch 1; `benchmarks/bench_llama.py` for models):
- _weight_int8pack_mm converts the codes to fp32 8 (AVX2) or 16 (AVX512) at a time against bf16 activations:
  ~4-5 G codes/s per core, bound by its arithmetic, not by memory; with fp32 or fp16 activations it runs a scalar
  loop. On small matrices it is the fastest thing here (16-28 us for `small`'s 512-wide ones, two threads).
- fbgemm multiplies bytes by bytes (AVX2 vpmaddubsw) and runs near memory speed on large matrices: the 32000x512
  head of `small`, read cold, 1.6 ms against 3.1 ms (two threads); it costs ~50 us a call whatever the size, hence
  the threshold. Its own dynamic quantisation (per tensor, 7 bits) left 1.3-14% relative error (an outlier
  channel); the two-part split above leaves ~1e-4. Packing is fbgemm's layout, a second copy of the matrix made on
  first use (and again when the codes change in place): the large matrices are held twice, the codes for
  checkpoints and the reference. torch.ao's quantised tensors are deprecated: without them (or on other CPUs)
  every matrix takes the first kernel.
- torch._int_mm (int8 activations) is a scalar loop (15 ms for the head); torch.compile of
  (x * q.float()).sum(-1) * s took 30-34 ms; dequantise-then-GEMM reads the codes and writes and reads fp32.
Numerics: fbgemm's output is the dequantised reference up to the activations' split (~1e-4 relative); the bf16
kernel's differs by the rounding of x and y to bf16 (at most 2^-8 relative each): 0.25% relative per layer,
against ~1% for int8's own rounding of the weights. On the speedrun checkpoints the decode-step top-1 agrees with
the reference's at 98.8-99.3% of held-out positions (the reference with the fp32 model's at 98.9-99.5%): greedy
output is unchanged except where two tokens (or two experts) are within that rounding of each other, and from
there it differs (tests/fp8/test_int8.py; BENCHMARKS.md).

The kernel needs in_features to be a multiple of 16 (rows are loaded 8 or 16 values at a time, aligned); every
preset qualifies, other shapes are refused by name. Int8 modules are for inference: no gradients flow.

Every matrix llama.cpp's Q8_0 file stores in 8 bits becomes int8 here: the attention projections, dense MLPs,
shared experts, routed experts, the output head and MTP's eh_proj. The embedding stays in high precision (a decode
step reads one row of it), as do the norms and the MoE router (F32 in the GGUF too). MLA's absorbed decode
(V2 §2.1.2: W_UK folded into the query, W_UV into the output) multiplies by kv_b_proj's matrix per head: it is
dequantised in each forward (a cache-sized temporary; the int8 codes are what is read from memory).

Routed experts (Int8Experts, V3 §2.1.2) run the GEMV per expert on its tokens' rows, on views of its codes, so a
batch-1 decode step reads the codes of its K routed experts only: a decode step's few tokens one (token, expert)
pair at a time (moe.unrolled_experts; in a compiled step the expert index is a graph integer and the view's offset
is computed in the graph), more rows a loop over the experts that got rows (one custom op). An earlier compiled
form copied each token's experts' codes out (a gather): it cost `small` a third of its step.

    model = quantize_int8(nanoseek.load(path))            # in place; Engine(model) (compile=True too) as usual
    model = nanoseek.load("model-q8_0.gguf", int8=True)   # Q8_0's blocks re-quantised per channel, no fp32 model
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..model import Experts, Transformer
from ..model.moe import swiglu
from .weights import Fp8Experts, Fp8WeightLinear, _FixedDtypeBuffers, _QuantizedLinear, quantized_bytes

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


# fbgemm's int8 x int8 GEMM (torch.ao's quantized linear, x86) for a module's own large matrices, where it runs at
# memory speed; on smaller ones its per-call cost exceeds the bf16 kernel's whole time (measured: tens of us)
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_prepack")
FBGEMM_MIN_CODES = 1 << 20
ACT_MAX = 63.0  # activations as 7-bit integers (fbgemm's AVX2 u8 x s8 pair sums stay below int16's limit)
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight codes -> (their version, fbgemm's packed copy)


def _packed(q: torch.Tensor, s: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's packed form of W = q * s, made on first use and again after q changed in place."""
    hit = _packs.get(q)
    if hit is None or hit[0] != q._version:
        with warnings.catch_warnings():  # torch.ao's quantised tensors are deprecated in favour of torchao
            warnings.simplefilter("ignore")
            zero = torch.zeros(q.shape[0], dtype=torch.long)
            w = torch._make_per_channel_quantized_tensor(q, s.double(), zero, 0)
        hit = (q._version, torch.ops.quantized.linear_prepack(w, None))
        _packs[q] = hit
    return hit[1]


def _int8_fbgemm(xi: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """xi [n, in]: integers in [-ACT_MAX, ACT_MAX] (held in fp32) -> xi (q * s)^T [n, out] in fp32, computed
    exactly in int32 by fbgemm (its input quantisation with scale 1 and zero point 64 is then lossless)."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xi, 1.0, 64, _packed(q, s))


# an operator for torch.compile to call (registered directly: torch.library.custom_op's wrapper cost ~40 us a call)
_lib = torch.library.Library("nanoseek", "FRAGMENT")
_lib.define("int8_fbgemm(Tensor xi, Tensor q, Tensor s) -> Tensor")
_lib.impl("int8_fbgemm", _int8_fbgemm, "CPU")
torch.library.register_fake("nanoseek::int8_fbgemm", lambda xi, q, s: xi.new_empty(xi.shape[0], q.shape[0]),
                            lib=_lib)


def fbgemm_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [rows, in] times W^T for W = q * s by fbgemm, the activations in two 7-bit integer parts per row: with
    m = amax|x_row| / ACT_MAX, x = m (hi + lo / 2 ACT_MAX) up to m / (4 ACT_MAX); both parts go through the one GEMM
    (the weights are read once). y = m (y_hi + y_lo / 2 ACT_MAX) in x's dtype."""
    xf = x.float()
    m = xf.abs().amax(dim=-1, keepdim=True) / ACT_MAX
    m = torch.where(m > 0, m, torch.ones_like(m))
    xn = xf / m
    hi = torch.round(xn)
    lo = torch.round((xn - hi) * (2 * ACT_MAX))
    y = torch.ops.nanoseek.int8_fbgemm(torch.cat((hi, lo)), q, s)
    n = x.shape[0]
    return ((y[:n] + y[n:] * (1 / (2 * ACT_MAX))) * m).to(x.dtype)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, packable: bool = False) -> torch.Tensor:
    """x [..., in] times W^T for W = q * s (q int8 [out, in], s bf16 [out]) -> [..., out] in x's dtype: for up to
    GEMV_ROWS rows on the CPU fbgemm (a large matrix that is `packable`: a module's own weight, not a view) or the
    int8 GEMV, else the dequantised reference (see the module docstring)."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if x.device.type == "cpu" and 0 < rows <= GEMV_ROWS:
        if packable and FBGEMM and q.numel() >= FBGEMM_MIN_CODES:
            return fbgemm_matmul(x.reshape(rows, k), q, s).view(*x.shape[:-1], q.shape[0])
        if x.dtype in (torch.float32, torch.bfloat16):
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
        y = int8_matmul(x, self.weight, self.weight_scale, packable=True)  # fbgemm for a large matrix
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

    per_token_decode = True  # MoE runs a decode step's few tokens through `expert` (moe.unrolled_experts)

    def expert(self, x: torch.Tensor, e: int | torch.SymInt) -> torch.Tensor:
        """Expert e alone on the rows x [n, H]: a GEMV pair over views of its codes (no copy, also in a compiled
        step, where e is an unbacked integer and the view's offset is computed in the graph)."""
        h = int8_matmul(x, self.gate_up_proj[e], self.gate_up_proj_scale[e])
        return int8_matmul(swiglu(h[:, : self.inter], h[:, self.inter :]), self.down_proj[e], self.down_proj_scale[e])

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (counts[e] rows for expert e, in order) -> [N, H]."""
        return int8_experts(x_sorted, counts, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                            self.down_proj_scale)

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
    return quantized_bytes(model, (Int8Linear, Int8Experts), torch.int8)
