"""Routed experts in FP8 / emulated BF16 as modules swapped in for `Experts` (as Fp8Linear is for nn.Linear):
same parameters under the same names, and the FP8 GEMMs counted are the ones that run (V3 §3.3)."""

import ast
import inspect

import pytest
import torch
from conftest import tiny_config

import nanoseek.fp8.grouped as grouped
import nanoseek.model.moe as moe
from nanoseek.fp8 import (
    Bf16EmulatedExperts,
    Fp8GroupedExperts,
    Fp8Linear,
    convert_to_fp8,
    count_fp8_gemms,
    emulate_bf16_gemms,
    fp8_grouped_linear,
    fp8_linear,
    fp8_swiglu,
)
from nanoseek.model import Experts, Transformer

COUNTS = torch.tensor([70, 0, 130, 56])  # an expert without tokens; groups not multiples of 128


def _experts(hidden: int = 192, inter: int = 160) -> Experts:
    cfg = tiny_config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=len(COUNTS), n_group=1,
                      topk_group=1, num_experts_per_tok=2)
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    return ex


def _run(ex: Experts, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of (x, gate_up_proj, down_proj) for a fixed upstream gradient."""
    for t in (x, ex.gate_up_proj, ex.down_proj):
        t.grad = None
    y = ex(x, COUNTS)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), [t.grad.clone() for t in (x, ex.gate_up_proj, ex.down_proj)]


def test_experts_is_plain_high_precision_without_fp8_flags_or_imports():
    ex = Experts(tiny_config())
    assert not any(hasattr(ex, a) for a in ("fp8", "fp8_pow2_scale", "round_operands"))
    tree = ast.parse(inspect.getsource(moe))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any("fp8" in m for m in imported), imported  # no model -> fp8 import cycle


@pytest.mark.parametrize("convert", ["fp8", "bf16"])
def test_conversion_swaps_modules_over_the_same_parameters(convert):
    cfg = tiny_config(hidden_size=128, q_lora_rank=128)
    m = Transformer(cfg).eval()
    plain = [mod for mod in m.modules() if type(mod) is Experts]
    assert len(plain) == 3  # two main MoE layers and the MTP module's
    params = {k: p for k, p in m.named_parameters()}
    keys = list(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=1.0)  # built before the swap
    convert_to_fp8(m, pow2_scale=True) if convert == "fp8" else emulate_bf16_gemms(m)
    cls = Fp8GroupedExperts if convert == "fp8" else Bf16EmulatedExperts
    routed = [mod for mod in m.modules() if isinstance(mod, Experts)]
    assert len(routed) == 3 and all(type(mod) is cls and not mod.training for mod in routed)
    assert list(m.state_dict()) == keys
    assert all(p is params[k] for k, p in m.named_parameters())  # the same objects: the optimizer keeps working
    for old, new in zip(plain, routed, strict=True):
        assert new.gate_up_proj is old.gate_up_proj and new.down_proj is old.down_proj
    n_linear = sum(isinstance(mod, Fp8Linear) for mod in m.modules())
    assert count_fp8_gemms(m) == (n_linear + 2 * 3 if convert == "fp8" else 0)
    if convert == "fp8":
        assert all(mod.pow2_scale for mod in routed)
        convert_to_fp8(m)  # converting again changes nothing
        assert [mod for mod in m.modules() if isinstance(mod, Experts)] == routed
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    m.train()(x[:, :-1], labels=x[:, 1:], return_logits=False).loss.backward()
    before = routed[0].gate_up_proj.detach().clone()
    opt.step()
    assert not torch.equal(before, routed[0].gate_up_proj)


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_experts_equal_the_emulated_fp8_reference(pow2):
    """Bit for bit the composition the old `Experts.fp8` path ran on the CPU (FP8 grouped GEMM, FP8-saved SwiGLU,
    FP8 grouped GEMM), forward and backward; and within fp32 summation order of per-expert FP8 Linear layers."""
    torch.manual_seed(1)
    ex = _experts()
    x = torch.randn(int(COUNTS.sum()), 192, requires_grad=True)
    y, grads = _run(Fp8GroupedExperts.from_experts(ex, pow2), x)

    class Reference(Experts):
        def forward(self, x_sorted, counts):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = fp8_grouped_linear(x_sorted, self.gate_up_proj, offs, pow2).chunk(2, dim=-1)
            return fp8_grouped_linear(fp8_swiglu(gate, up, pow2), self.down_proj, offs, pow2)

    y_ref, grads_ref = _run(Reference.from_experts(ex), x)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    with torch.no_grad():  # independent: FP8 Linear per expert (same tiles and blocks)
        per_expert = []
        for e, xe in enumerate(torch.split(x, COUNTS.tolist())):
            gate, up = fp8_linear(xe, ex.gate_up_proj[e], pow2_scale=pow2).chunk(2, dim=-1)
            per_expert.append(fp8_linear(torch.nn.functional.silu(gate) * up, ex.down_proj[e], pow2_scale=pow2))
    torch.testing.assert_close(y, torch.cat(per_expert), rtol=1e-5, atol=1e-5)
    y_hp, _ = _run(ex, x)  # and it is not the high-precision module
    assert 1e-3 < ((y - y_hp).norm() / y_hp.norm()).item() < 0.1


def test_fp8_experts_without_a_grouped_gemm_run_fp8_per_expert(monkeypatch):
    """Where torch has no grouped GEMM for the device/dtype the FP8 experts still run FP8 (one GEMM per expert over
    the same quantised operands), never the high-precision GEMMs."""
    torch.manual_seed(2)
    ex = Fp8GroupedExperts.from_experts(_experts())
    x = torch.randn(int(COUNTS.sum()), 192, requires_grad=True)
    y, grads = _run(ex, x)
    monkeypatch.setattr(grouped, "grouped_mm_ok", lambda t: False)
    monkeypatch.setattr(torch, "_grouped_mm", None)  # not reached
    y_loop, grads_loop = _run(ex, x)
    torch.testing.assert_close(y_loop, y, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_loop, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_loop[1][1].abs().max() == 0  # the expert without tokens gets no gradient


def test_fp8_experts_that_cannot_run_raise(monkeypatch):
    ex = _experts()
    fp8 = Fp8GroupedExperts.from_experts(ex)
    x = torch.randn(int(COUNTS.sum()), 192)
    with pytest.raises(RuntimeError, match="FP8 routed experts cannot run"):
        fp8(x.double().to(torch.float8_e4m3fn), COUNTS)  # an input dtype the quantisation does not take
    monkeypatch.setattr(grouped, "_float8_ok", lambda device_type: False)  # a device without float8
    with pytest.raises(RuntimeError, match="FP8 routed experts cannot run"):
        Fp8GroupedExperts.from_experts(ex)  # at conversion
    with pytest.raises(RuntimeError, match="FP8 routed experts cannot run"):
        fp8(x, COUNTS)  # at the call
    m = Transformer(tiny_config())
    with pytest.raises(RuntimeError, match="FP8 routed experts cannot run"):
        convert_to_fp8(m)


def test_bf16_experts_round_like_the_emulated_linear():
    torch.manual_seed(3)
    ex = _experts(hidden=64, inter=32)
    x = torch.randn(int(COUNTS.sum()), 64, requires_grad=True)
    y, grads = _run(Bf16EmulatedExperts.from_experts(ex), x)
    r = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    ref = []
    with torch.no_grad():
        for e, xe in enumerate(torch.split(x, COUNTS.tolist())):
            gate, up = r(r(xe) @ r(ex.gate_up_proj[e]).T).chunk(2, dim=-1)
            ref.append(r(r(torch.nn.functional.silu(gate) * up) @ r(ex.down_proj[e]).T))
    torch.testing.assert_close(y, torch.cat(ref), rtol=2**-8, atol=1e-6)
    assert all(torch.equal(g, r(g)) for g in grads)  # bf16 gradients too
