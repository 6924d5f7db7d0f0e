"""The FP8 GEMM backends (nanoseek.fp8.gemm): the CPU emulation, torch._scaled_mm per 128-slice (runs on the CPU
too, so it is checked here against the emulation), and hand-written references for the Dgrad and Wgrad GEMMs."""

import pytest
import torch

from nanoseek.fp8 import Fp8Linear, quantize_tiles, quantize_weight_block, resolve_backend, scaled_gemm
from nanoseek.model.config import ConfigError
from nanoseek.train import TrainConfig


def _reference(a_q, a_s, b_q, b_s, b_blocks):
    """float64: for each 128-slice of K, the raw FP8 products times the row scale of A and of B."""
    m, k = a_q.shape
    n = b_q.shape[0]
    out = torch.zeros(m, n, dtype=torch.float64)
    for c in range(-(-k // 128)):
        sl = slice(128 * c, 128 * (c + 1))
        prod = a_q[:, sl].double() @ b_q[:, sl].double().T
        sb = b_s[:, c].double().repeat_interleave(128)[:n] if b_blocks else b_s[:, c].double()
        out += prod * a_s[:, c].double()[:, None] * sb[None, :]
    return out


@pytest.mark.parametrize("backend", ["emulate", "rowwise"])
@pytest.mark.parametrize("b_blocks", [True, False])
@pytest.mark.parametrize(("m", "n", "k"), [(9, 140, 300), (64, 256, 256), (1, 16, 44)])
def test_scaled_gemm_equals_reference(backend, b_blocks, m, n, k):
    torch.manual_seed(m + n + k)
    a_q, a_s = quantize_tiles(torch.randn(m, k) * 3)
    b = torch.randn(n, k) * 0.02
    b_q, b_s = quantize_weight_block(b) if b_blocks else quantize_tiles(b)
    got = scaled_gemm(a_q, a_s, b_q, b_s, b_blocks=b_blocks, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), _reference(a_q, a_s, b_q, b_s, b_blocks), rtol=1e-5, atol=1e-6)
    half = scaled_gemm(a_q, a_s, b_q, b_s, b_blocks=b_blocks, backend=backend, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_backward_gemms_equal_hand_written_references():
    """Dgrad = dy (1x128 tiles along out) times W's 128x128 blocks; Wgrad = dy^T x, both re-tiled 1x128 along the
    tokens, x re-quantised from its saved FP8 copy."""
    torch.manual_seed(5)
    x = torch.randn(200, 300, requires_grad=True)
    lin = Fp8Linear(300, 140)
    dy = torch.randn(200, 140)
    lin(x).backward(dy)
    wq, ws = quantize_weight_block(lin.weight.detach())
    dyq, dys = quantize_tiles(dy)
    ref_dx = torch.zeros(200, 300, dtype=torch.float64)
    for c in range(2):  # slices of the 140 output features
        sl = slice(128 * c, 128 * (c + 1))
        w_rows = wq[sl].double() * ws[c].double().repeat_interleave(128)[None, :300]
        ref_dx += (dyq[:, sl].double() @ w_rows) * dys[:, c].double()[:, None]
    torch.testing.assert_close(x.grad.double(), ref_dx, rtol=1e-5, atol=1e-6)

    xq, xs = quantize_tiles(x.detach())
    x_seen = xq.float() * xs.repeat_interleave(128, 1)[:, :300]  # the FP8 copy saved by the forward, in fp32
    xtq, xts = quantize_tiles(x_seen.T.contiguous())
    dytq, dyts = quantize_tiles(dy.T.contiguous())
    ref_dw = _reference(dytq, dyts, xtq, xts, b_blocks=False)
    torch.testing.assert_close(lin.weight.grad.double(), ref_dw, rtol=1e-5, atol=5e-5)  # fp32 sums over 200 tokens


def test_rowwise_backend_trains_like_the_emulation():
    torch.manual_seed(6)
    x = torch.randn(130, 256)
    dy = torch.randn(130, 192)
    grads = {}
    for backend in ("emulate", "rowwise"):
        lin = Fp8Linear(256, 192, backend=backend)
        torch.manual_seed(7)
        torch.nn.init.normal_(lin.weight, std=0.05)
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(dy)
        grads[backend] = (y.detach(), xi.grad, lin.weight.grad)
    for a, b in zip(grads["emulate"], grads["rowwise"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backend_choice_and_errors():
    assert resolve_backend("cpu") == "emulate"
    a_q, a_s = quantize_tiles(torch.randn(4, 128))
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        scaled_gemm(a_q, a_s, a_q, a_s, b_blocks=False, backend="cutlass")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="A \\[M, K\\] and B \\[N, K\\]"):
        scaled_gemm(a_q, a_s, a_q[:, :64], a_s, backend="emulate")
    with pytest.raises(ValueError, match="blockwise FP8 backend needs a GPU"):
        scaled_gemm(a_q, a_s, a_q, a_s, b_blocks=False, backend="blockwise")
    with pytest.raises(ConfigError, match="fp8_backend"):
        TrainConfig(fp8_backend="fast")


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a GPU with FP8 tensor cores")
def test_cuda_backend_matches_the_emulation():
    dev = torch.device("cuda")
    backend = resolve_backend(dev)
    assert backend in ("blockwise", "rowwise")
    torch.manual_seed(8)
    x = torch.randn(512, 1024, device=dev, requires_grad=True)
    lin = Fp8Linear(1024, 768, device=dev)
    dy = torch.randn(512, 768, device=dev)
    lin(x).backward(dy)
    ref = Fp8Linear(1024, 768, device=dev, backend="emulate")
    ref.weight = lin.weight
    xr = x.detach().clone().requires_grad_()
    gw = lin.weight.grad.clone()
    lin.weight.grad = None
    ref(xr).backward(dy)
    for got, want in ((x.grad, xr.grad), (gw, ref.weight.grad)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 output of the block-scaled kernel
