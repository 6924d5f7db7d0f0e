"""Weight-only int8 inference: each matrix is read as 8-bit codes by a dequantising GEMV, so a decode step reads
about one byte per weight, as llama.cpp reading a Q8_0 GGUF does (34 bytes per 32 weights).

A weight W [out, in] is held as `weight` (int8 [out, in]) and `weight_scale` (bf16 [out]), symmetric per output
channel:  W ≈ q * s,  s = amax|W_row| / 127,  q = round(W / s) in [-127, 127]. Forward for up to GEMV_ROWS rows on
the CPU (decode steps) is an integer GEMV; only the int8 codes come from memory:

    x = m (hi + lo / 127) per row, m = amax|x_row| / 127, hi and lo integers     (two signed 8-bit parts)
    y = s m (hi q^T + lo q^T / 127)          bytes times bytes, int32 sums       nanoseek::int8_gemv (int8_gemv.cpp)

More rows (prefill chunks, bound by compute) and other devices take the reference: y = x (q * s)^T in x's dtype,
the weight dequantised per forward.

Why this kernel (2-core AMD EPYC, AVX2, torch 2.13, batch 1; `benchmarks/bench_llama.py` for models):
- It is llama.cpp's kind of dot product (vpmaddubsw on bytes, 32 products an instruction), in ~290 lines of C++
  built on first use by torch.utils.cpp_extension (g++ and ninja, ~20 s once, cached under TORCH_EXTENSIONS_DIR)
  and called as a torch operator (a graph node under torch.compile). Four weight rows share each activation load
  and the rows ahead are prefetched: `small`'s 32000x512 head, read from memory, 0.8 ms (~20 GB/s, two threads);
  its 512-wide matrices 13-20 us each, ~6 us of it the call.
- What torch offers was slower: _weight_int8pack_mm converts the codes to fp32 8 at a time against bf16
  activations (~4.6 G codes/s per core, arithmetic-bound: 27-56 us for the same matrices, 1.9 ms the head);
  fbgemm's int8 GEMM (torch.ao, deprecated) costs ~50 us a call and kept a packed second copy of each matrix;
  torch._int_mm is a scalar loop; torch.compile of (x * q.float()).sum(-1) * s took 30-34 ms for the head.
  _weight_int8pack_mm stays as the fallback where the kernel cannot be built (no compiler or ninja, not x86 with
  AVX2; a warning says which): its output is bf16(bf16(x) (q * s)^T).
Numerics: the split of the activations errs by at most m / 254 per value (~6e-5 of the output's scale, measured),
summed exactly in int32; against ~1% for int8's own rounding of the weights. On the speedrun checkpoints greedy
output is the dequantised reference's except where two tokens (or two experts) are within that rounding of each
other, and from there it differs (tests/fp8/test_int8.py; BENCHMARKS.md).

The fallback needs in_features to be a multiple of 16 (rows loaded 8 or 16 values at a time, aligned); every
preset qualifies, other shapes are refused by name. Int8 modules are for inference: no gradients flow.

Every matrix llama.cpp's Q8_0 file stores in 8 bits becomes int8 here: the attention projections, dense MLPs,
shared experts, routed experts, the output head and MTP's eh_proj. The embedding stays in high precision (a decode
step reads one row of it), as do the norms and the MoE router (F32 in the GGUF too). MLA's absorbed decode
(V2 §2.1.2: W_UK folded into the query, W_UV into the output) multiplies by kv_b_proj's matrix per head: it is
dequantised in each forward (a cache-sized temporary; the int8 codes are what is read from memory).

Routed experts (Int8Experts, V3 §2.1.2) read the codes of the experts a token chose where they lie, so a batch-1
decode step reads its K routed experts only. A decode step's few tokens: nanoseek::int8_moe, every (token, expert)
pair's gate_up GEMV, SwiGLU and down GEMV in one call a layer (llama.cpp's mul_mat_id), the expert index read in
the kernel; the fallback runs a GEMV pair per pair on views of the codes (moe.unrolled_experts; in a compiled step
the expert index is a graph integer, the view's offset computed in the graph). More rows: a loop over the experts
that got rows (one custom op). An earlier compiled form copied each token's experts' codes out (a gather): it cost
`small` a third of its step.

    model = quantize_int8(nanoseek.load(path))            # in place; Engine(model) (compile=True too) as usual
    model = nanoseek.load("model-q8_0.gguf", int8=True)   # Q8_0's blocks re-quantised per channel, no fp32 model
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Experts, Transformer
from ..model.moe import swiglu, unrolled_experts
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


# nanoseek::int8_gemv: the operator is declared here (with its shape for torch.compile), its CPU kernel is
# int8_gemv.cpp, built and loaded by gemv_kernel() on first use
_lib = torch.library.Library("nanoseek", "FRAGMENT")
_lib.define("int8_gemv(Tensor x, Tensor q, Tensor s) -> Tensor")
_lib.define("int8_moe(Tensor x, Tensor idx, Tensor w, Tensor gate_up, Tensor gate_up_s, Tensor down, Tensor down_s, "
            "Tensor sh_gate, Tensor sh_gate_s, Tensor sh_up, Tensor sh_up_s, Tensor sh_down, Tensor sh_down_s) "
            "-> Tensor")  # sh_*: the shared expert's matrices, or empty
torch.library.register_fake("nanoseek::int8_gemv", lambda x, q, s: x.new_empty(x.shape[0], q.shape[0]), lib=_lib)
torch.library.register_fake("nanoseek::int8_moe", lambda x, *args: torch.empty_like(x), lib=_lib)
_GEMV: bool | None = None  # built and loaded / not available / not tried yet


def gemv_kernel() -> bool:
    """Whether nanoseek's int8 GEMV kernel is loaded: built by torch.utils.cpp_extension on the first call (x86 with
    AVX2, g++ and ninja; NANOSEEK_INT8_KERNEL=0 turns it off). Otherwise a warning says why and int8_matmul uses
    torch's _weight_int8pack_mm."""
    global _GEMV
    if _GEMV is None:
        _GEMV = False
        why = None
        if os.environ.get("NANOSEEK_INT8_KERNEL", "1") == "0":
            return False
        if platform.machine().lower() not in ("x86_64", "amd64") or \
                torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            why = f"this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) lacks AVX2"
        else:
            try:
                from torch.utils import cpp_extension

                cpp_extension.load(name="nanoseek_int8_gemv", sources=[str(Path(__file__).with_name("int8_gemv.cpp"))],
                                   extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                   is_python_module=False)
                _GEMV = True
            except Exception as e:  # no compiler, no ninja, a failed build: the portable kernel still works
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        if why:
            warnings.warn(f"nanoseek's int8 GEMV kernel is not available ({why}); int8 matrices use torch's "
                          f"_weight_int8pack_mm (slower, bf16 activations)", stacklevel=2)
    return _GEMV


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., in] times W^T for W = q * s (q int8 [out, in], s bf16 [out]) -> [..., out] in x's dtype: for up to
    GEMV_ROWS rows of fp32 or bf16 on the CPU an int8 GEMV (nanoseek's kernel, else torch's), else the dequantised
    reference (see the module docstring)."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if x.device.type == "cpu" and 0 < rows <= GEMV_ROWS and x.dtype in (torch.float32, torch.bfloat16):
        if gemv_kernel():
            return torch.ops.nanoseek.int8_gemv(x.reshape(rows, k), q, s).view(*x.shape[:-1], q.shape[0])
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


_NO_SHARED = (torch.empty(0, 0, dtype=torch.int8), torch.empty(0, dtype=SCALE_DTYPE)) * 3


def _mlp_codes(mlp: nn.Module | None) -> tuple[torch.Tensor, ...] | None:
    """(gate, its scales, up, ..., down, ...) of a SwiGLU MLP of Int8Linear matrices without bias, else None."""
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if mlp is None or not all(isinstance(m, Int8Linear) and m.bias is None for m in parts):
        return None
    return tuple(t for m in parts for t in (m.weight, m.weight_scale))


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

    per_token_decode = True  # MoE runs a decode step's few tokens through `decode`

    def decode(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, shared: nn.Module | None = None,
               ) -> torch.Tensor:
        """sum_k weights[t, k] Expert_idx[t, k](x_t) (+ shared(x_t), the MoE's shared expert, when given) for a
        decode step's few tokens x [T, H] (idx, weights [T, K]): nanoseek's kernel, every product (the shared expert's
        too where it is int8) in one call; else a GEMV pair per (token, expert) on views of the codes
        (moe.unrolled_experts)."""
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and gemv_kernel():
            codes = _mlp_codes(shared)
            y = torch.ops.nanoseek.int8_moe(x, idx, weights, self.gate_up_proj, self.gate_up_proj_scale,
                                            self.down_proj, self.down_proj_scale, *(codes or _NO_SHARED))
            return y + shared(x) if shared is not None and codes is None else y
        y = unrolled_experts(x, idx, weights, self)
        return y if shared is None else y + shared(x)

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
    gemv_kernel()  # built now (once), not inside a compiled step's first trace
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
