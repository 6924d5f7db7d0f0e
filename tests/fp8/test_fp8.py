"""FP8 quantisation bounds and the emulated FP8 GEMMs (Fprop / Dgrad / Wgrad)."""

import math

import pytest
import torch

from nanoseek.fp8 import (
    Fp8Linear,
    dequantize_tiles,
    dequantize_weight_block,
    fp8_linear,
    quantize_tiles,
    quantize_weight_block,
)

E4M3_REL = 2.0**-4  # half of the 3-bit mantissa step: worst relative rounding error of a normal E4M3 value
E4M3_MIN_SUB = 2.0**-9  # smallest E4M3 subnormal: absolute error floor, in units of the scale


@pytest.mark.parametrize("k", [128, 200, 37])
def test_tile_quantisation_error_bounded(k):
    x = torch.randn(17, k) * torch.logspace(-3, 2, 17)[:, None]  # rows of very different magnitudes
    q, s = quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (17, math.ceil(k / 128))
    err = (dequantize_tiles(q, s) - x).abs()
    bound = torch.maximum(x.abs() * E4M3_REL, s.repeat_interleave(128, 1)[:, :k] * E4M3_MIN_SUB / 2)
    assert torch.all(err <= bound * (1 + 1e-6))
    # every tile, the ragged last one included, uses its full range: its largest |value| maps to 448
    n_t = math.ceil(k / 128)
    qa = torch.nn.functional.pad(q.float().abs(), (0, n_t * 128 - k)).view(17, n_t, 128).amax(-1)
    assert torch.all(qa == 448.0)


def test_ragged_edge_tile_has_its_own_scale():
    x = torch.ones(2, 200)
    x[:, 128:] = 1e-2  # the 72-wide edge tile
    _, s = quantize_tiles(x)
    torch.testing.assert_close(s[:, 1], torch.full((2,), 1e-2 / 448))
    w = torch.ones(130, 260)
    w[128:, 256:] = 3.0
    q, ws = quantize_weight_block(w)
    assert ws.shape == (2, 3) and ws[1, 2].item() == pytest.approx(3.0 / 448)
    torch.testing.assert_close(dequantize_weight_block(q, ws), w)  # ones and threes are exact in E4M3


def test_power_of_two_scales():
    x = torch.randn(8, 300) * 7
    _, s = quantize_tiles(x, pow2_scale=True)
    assert torch.all(torch.log2(s) == torch.round(torch.log2(s)))
    _, ws = quantize_weight_block(torch.randn(200, 300), pow2_scale=True)
    assert torch.all(torch.log2(ws) == torch.round(torch.log2(ws)))
    # the rounded-up scale never lets a value overflow 448
    q, s2 = quantize_tiles(x, pow2_scale=True)
    assert torch.isfinite(q.float()).all()


def test_emulated_gemm_equals_block_scaled_reference():
    """y = x W^T computed as FP8 integer-like products per 128-slice, scaled by both scales (hardware order)."""
    torch.manual_seed(1)
    x, w = torch.randn(9, 300), torch.randn(140, 300)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_weight_block(w)
    ref = torch.zeros(9, 140, dtype=torch.float64)
    for c in range(3):
        sl = slice(128 * c, 128 * (c + 1))
        prod = xq[:, sl].double() @ wq[:, sl].double().T  # raw FP8 values, no scales
        w_scale = ws[:, c].double().repeat_interleave(128)[:140]  # per output row: its block's scale
        ref += prod * xs[:, c].double()[:, None] * w_scale[None, :]
    y = fp8_linear(x, w)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and it is a good approximation of the exact product
    exact = x @ w.T
    assert (y - exact).norm() / exact.norm() < 0.05


def test_fp8_linear_gradients_close_to_bf16():
    """Input and weight gradients within 5% (relative Frobenius error) of an fp32 reference, as bf16 is."""
    torch.manual_seed(2)
    x = torch.randn(256, 384, requires_grad=True)
    lin = Fp8Linear(384, 200)
    torch.nn.init.normal_(lin.weight, std=0.05)
    dy = torch.randn(256, 200)
    lin(x).backward(dy)
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    w = lin.weight.detach().clone().requires_grad_()
    (x @ w.T).backward(dy)
    rx, rw = x.grad, w.grad
    xb = x.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    (xb @ wb.T).backward(dy.bfloat16())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(gx, rx) < 0.05 and rel(gw, rw) < 0.05
    assert rel(gx, rx) > rel(xb.grad, rx)  # FP8 is coarser than bf16, as expected
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32


def test_fp8_linear_saves_fp8_activations():
    lin = Fp8Linear(256, 128)
    x = torch.randn(64, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    assert (torch.float8_e4m3fn, (64, 256)) in saved  # the activation, a quarter of its fp32 memory
    assert not any(dt == torch.float32 and shape == (64, 256) for dt, shape in saved)


def test_fp8_grouped_matches_per_expert_fp8_and_fp32():
    from nanoseek.fp8 import fp8_grouped_linear

    torch.manual_seed(3)
    counts = torch.tensor([70, 0, 130, 56])
    x = torch.randn(int(counts.sum()), 192, requires_grad=True)
    w = (torch.randn(4, 160, 192) * 0.05).requires_grad_()
    offs = counts.cumsum(0).to(torch.int32)
    y = fp8_grouped_linear(x, w, offs)
    # forward: exactly per-expert FP8 Linear (same tiles and blocks), up to fp32 summation order
    ref = torch.cat([fp8_linear(xe, w[e]) for e, xe in enumerate(torch.split(x, counts.tolist()))])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    exact = torch.cat([xe @ w[e].T for e, xe in enumerate(torch.split(x, counts.tolist()))])
    exact.backward(dy)
    assert (gx - x.grad).norm() / x.grad.norm() < 0.05
    assert (gw - w.grad).norm() / w.grad.norm() < 0.05
    assert gw[1].abs().max() == 0  # an expert with no tokens gets no gradient


def test_converted_model_trains_and_keeps_checkpoint_names():
    from conftest import tiny_config

    from nanoseek.fp8 import convert_to_fp8, count_fp8_gemms
    from nanoseek.model import Transformer

    # all main layers dense for the logits comparison: in a random MoE, FP8 rounding flips top-k choices
    # (each FP8 GEMM is ~3-5% off in relative terms; through 24 of them the logits end up ~5% off)
    cfg = tiny_config(hidden_size=128, q_lora_rank=128, first_k_dense_replace=3, initializer_range=0.02)
    ref = Transformer(cfg).eval()
    m = Transformer(cfg).eval()
    m.load_state_dict(ref.state_dict())
    keys = list(m.state_dict())
    convert_to_fp8(m)
    assert list(m.state_dict()) == keys
    assert isinstance(m.model.layers[0].self_attn.kv_b_proj, Fp8Linear)
    assert isinstance(m.model.layers[0].mlp.up_proj, Fp8Linear)
    assert m.model.layers[0].mlp.act.func.__name__ == "fp8_swiglu"
    assert type(m.lm_head) is torch.nn.Linear and type(m.mtp[0].eh_proj) is torch.nn.Linear
    assert count_fp8_gemms(m) > 10
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ref(x).logits, m(x).logits
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.05
    m = convert_to_fp8(Transformer(tiny_config(hidden_size=128, q_lora_rank=128)))  # MoE layers too
    out = m.train()(x[:, :-1], labels=x[:, 1:], return_logits=False)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_fp8_swiglu_saves_fp8_inputs_and_recomputes():
    """V3's low-precision activation memory: SwiGLU keeps gate/up in FP8 and recomputes silu(g) * u backward."""
    from nanoseek.fp8 import fp8_swiglu

    torch.manual_seed(9)
    g = (torch.randn(96, 300) * 2).requires_grad_()
    u = torch.randn(96, 300).requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fp8_swiglu(g, u)
    torch.testing.assert_close(y, torch.nn.functional.silu(g) * u)  # the forward output is exact
    assert sorted(saved, key=str) == sorted([(torch.float8_e4m3fn, (96, 300)), (torch.float32, (96, 3))] * 2, key=str)
    dy = torch.randn(96, 300)
    y.backward(dy)
    dg, du = g.grad.clone(), u.grad.clone()
    g.grad = u.grad = None
    (torch.nn.functional.silu(g) * u).backward(dy)
    for got, want in ((dg, g.grad), (du, u.grad)):
        err = ((got - want).norm() / want.norm()).item()
        assert 1e-4 < err < 0.05  # the FP8 rounding of the saved inputs shows, within the E4M3 step
    with torch.no_grad():  # inference: nothing saved, plain SwiGLU
        torch.testing.assert_close(fp8_swiglu(g, u), torch.nn.functional.silu(g) * u)


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_gradients_do_not_depend_on_the_loss_scale(grouped):
    """Gradients are tiny by construction (a mean over every token of the batch; ~1e-8 per element at 4K tokens a
    step): with power-of-two scales, dy * 2^-30 must give exactly the gradients of dy times 2^-30. A gradient tile
    scaled with the activations' amax floor (1e-4) would land in E4M3's subnormals or flush to zero instead."""
    from nanoseek.fp8 import fp8_grouped_linear

    torch.manual_seed(5)
    counts = torch.tensor([100, 156])
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(256, 192, requires_grad=True)
    w = (torch.randn(2, 160, 192) * 0.05).requires_grad_()
    dy = torch.randn(256, 160)

    def grads(c):
        x.grad = w.grad = None
        y = fp8_grouped_linear(x, w, offs, True) if grouped else fp8_linear(x, w[0], pow2_scale=True)
        y.backward(dy * c)
        return x.grad.clone(), w.grad.clone()

    c = 2.0**-30
    (gx1, gw1), (gxc, gwc) = grads(1.0), grads(c)
    assert gxc.abs().max() > 0 and gwc.abs().max() > 0
    torch.testing.assert_close(gxc / c, gx1, rtol=1e-6, atol=0)
    torch.testing.assert_close(gwc / c, gw1, rtol=1e-6, atol=0)
