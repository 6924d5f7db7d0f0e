"""The emulated BF16 baseline (nanoseek.fp8.bf16): bf16 operands and outputs, fp32 accumulation, in all three GEMMs."""

import pytest
import torch
from conftest import tiny_config

from nanoseek.fp8 import Bf16EmulatedExperts, Bf16EmulatedLinear, convert_to_fp8, emulate_bf16_gemms, round_bf16
from nanoseek.model import Experts, Transformer
from nanoseek.model.config import ConfigError
from nanoseek.train import TrainConfig


def _is_bf16(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).float())


def test_round_bf16_rounds_value_and_gradient():
    x = torch.randn(64, requires_grad=True)
    y = round_bf16(x)
    assert _is_bf16(y) and not _is_bf16(x.detach())
    assert torch.equal(y, x.detach().bfloat16().float())
    g = torch.randn(64)
    y.backward(g)
    assert torch.equal(x.grad, g.bfloat16().float())


def test_linear_matches_a_bf16_gemm_with_fp32_accumulation():
    """Against an independent reference: the same GEMMs on bf16 copies, accumulated in fp64 and rounded once."""
    lin = torch.nn.Linear(160, 96, bias=False)
    emu = Bf16EmulatedLinear.from_linear(lin)
    assert emu.weight is lin.weight  # parameters shared: an existing optimizer keeps working
    x = torch.randn(37, 160, requires_grad=True)
    y = emu(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    def ref(a, b):  # bf16 operands, wide accumulation, bf16 result
        return (a.bfloat16().double() @ b.bfloat16().double()).bfloat16().float()

    xb, wb, dyb = x.detach(), lin.weight.detach(), dy.bfloat16().float()
    torch.testing.assert_close(y, ref(xb, wb.T), rtol=2**-8, atol=1e-6)  # within one bf16 ulp (summation order)
    torch.testing.assert_close(x.grad, ref(dyb, wb), rtol=2**-8, atol=1e-6)  # Dgrad
    torch.testing.assert_close(lin.weight.grad, ref(dyb.T, xb), rtol=2**-8, atol=1e-6)  # Wgrad
    assert _is_bf16(y) and _is_bf16(x.grad) and _is_bf16(lin.weight.grad)
    # and it is not the fp32 GEMM
    assert (y - x.detach() @ wb.T).abs().max() > 1e-4


def test_experts_run_bf16_gemms():
    cfg = tiny_config()
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    x = torch.randn(40, cfg.hidden_size)
    counts = torch.tensor([5, 0, 7, 3, 10, 5, 6, 4])
    y32 = ex(x, counts)
    y16 = Bf16EmulatedExperts.from_experts(ex)(x, counts)
    assert _is_bf16(y16) and not _is_bf16(y32)
    rel = (y16 - y32).norm() / y32.norm()
    assert 1e-4 < rel < 2e-2


def test_model_bf16_emulation_is_close_to_fp32_and_much_closer_than_fp8():
    """Whole-model gradients at init: the BF16 baseline is a ~0.5% perturbation of fp32, FP8 a ~10% one (E4M3 keeps 3
    mantissa bits to bf16's 7: 16x the rounding error per operand)."""
    cfg = tiny_config(hidden_size=128, q_lora_rank=128, kv_lora_rank=64, num_nextn_predict_layers=0,
                      initializer_range=0.02, first_k_dense_replace=3)  # dense: no routing flips
    x = torch.randint(0, cfg.vocab_size, (2, 32))

    def grads(convert):
        torch.manual_seed(0)
        m = Transformer(cfg)
        m.init_weights()
        if convert is not None:
            convert(m)
        out = m(x, labels=x)
        out.loss.backward()
        return out.loss.item(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    l32, g32 = grads(None)
    l16, g16 = grads(emulate_bf16_gemms)
    l8, g8 = grads(convert_to_fp8)
    e16, e8 = ((g16 - g32).norm() / g32.norm()).item(), ((g8 - g32).norm() / g32.norm()).item()
    assert 0 < abs(l16 - l32) / l32 < 1e-3
    assert 1e-5 < e16 < 0.02
    assert e8 > 5 * e16


def test_train_config_rejects_two_formats():
    with pytest.raises(ConfigError, match="emulate_bf16"):
        TrainConfig(fp8=True, emulate_bf16=True)
