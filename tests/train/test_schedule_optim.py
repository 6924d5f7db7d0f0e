"""Schedules (closed forms), optimizer groups, BF16-moment AdamW, MaxVio, overrides."""

import math

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import ConfigError, Transformer
from nanoseek.train import TrainConfig, apply_overrides, batch_at, bias_speed_at, lr_at, mtp_lambda_at
from nanoseek.train.metrics import max_violation
from nanoseek.train.optim import AdamWBF16, optimizer_from_tensors, optimizer_to_tensors, param_groups


def test_lr_shape_v3():
    c = TrainConfig(steps=1000, lr=1.0, warmup_frac=0.02, constant_until=0.676, cosine_until=0.966,
                    tail_until=0.989, min_lr_ratio=0.1, final_lr_ratio=0.0332)
    assert lr_at(c, 0) == pytest.approx(1 / 20)
    assert lr_at(c, 19) == pytest.approx(1.0)
    assert lr_at(c, 300) == 1.0 and lr_at(c, 675) == 1.0
    mid = (676 + 966) / 2
    assert lr_at(c, int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) / 1000 - 0.676)
                                                                            / 0.29)), rel=1e-9)
    assert lr_at(c, 966) == pytest.approx(0.1) and lr_at(c, 988) == pytest.approx(0.1)
    assert lr_at(c, 989) == pytest.approx(0.0332) and lr_at(c, 999) == pytest.approx(0.0332)
    lrs = [lr_at(c, s) for s in range(676, 966)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # cosine is monotone


def test_batch_ramp_mtp_lambda_and_bias_freeze():
    c = TrainConfig(steps=1000, batch_size=15, micro_batch_size=5, batch_ramp_frac=0.1, batch_ramp_start_ratio=0.2)
    assert batch_at(c, 0) == 3
    assert batch_at(c, 50) == 9
    assert batch_at(c, 100) == 15 and batch_at(c, 999) == 15
    assert [batch_at(c, s) for s in range(100)] == sorted(batch_at(c, s) for s in range(100))
    assert mtp_lambda_at(c, 0) == 0.3 and mtp_lambda_at(c, 700) == 0.1
    assert bias_speed_at(c, 0) == 0.001 and bias_speed_at(c, 970) == 0.0


def test_param_groups_no_decay_on_norms_biases_embeddings():
    m = Transformer(tiny_config(attention_bias=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in nd and "model.norm.weight" in nd
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.bias" in nd
    assert "lm_head.weight" in d and "model.layers.1.mlp.experts.gate_up_proj" in d
    assert len(d) + len(nd) == len(list(m.parameters()))
    decay2, _ = param_groups(m, 0.1, decay_embeddings=True)
    assert any(names[id(p)] == "model.embed_tokens.weight" for p in decay2["params"])


def test_adamw_bf16_moments_tracks_fp32_adamw():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 32))
    w2 = torch.nn.Parameter(w1.detach().clone())
    w0 = w1.detach().clone()
    o1 = torch.optim.AdamW([w1], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o2 = AdamWBF16([w2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 32)
        w1.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o2.state[w2]["exp_avg"].dtype == torch.bfloat16
    d1, d2 = (w1 - w0).detach(), (w2 - w0).detach()
    assert (d1 - d2).norm() / d1.norm() < 0.02  # the same trajectory up to bf16 rounding of the moments
    # state round trip through tensors + JSON
    t, meta = optimizer_to_tensors(o2)
    t = {k: v.clone() for k, v in t.items()}  # as if written to disk
    w3 = torch.nn.Parameter(w2.detach().clone())
    o3 = AdamWBF16([w3], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer_from_tensors(o3, t, meta)
    g = torch.randn(64, 32)
    w2.grad, w3.grad = g.clone(), g.clone()
    o2.step()
    o3.step()
    assert torch.equal(w2, w3)


def test_max_violation():
    load = torch.tensor([[[4.0, 0.0, 2.0, 2.0], [0.0, 4.0, 2.0, 2.0]]])  # 1 layer, 2 sequences
    batch, seq = max_violation(load)
    assert batch == pytest.approx(0.0)  # summed over the batch every expert has 4
    assert seq == pytest.approx(1.0)  # each sequence: max 4, mean 2


def test_overrides():
    m, t = apply_overrides(tiny_config(), TrainConfig(), ["steps=7", "hidden_size=32", "model.n_group=2",
                                                          "lr=1e-3", "betas=[0.9,0.99]"])
    assert (t.steps, t.lr, t.betas, m.hidden_size, m.n_group) == (7, 1e-3, (0.9, 0.99), 32, 2)
    with pytest.raises(ConfigError, match="hiddn_size"):
        apply_overrides(tiny_config(), TrainConfig(), ["hiddn_size=3"])
    with pytest.raises(ConfigError, match="topk_group > n_group"):
        apply_overrides(tiny_config(), TrainConfig(), ["n_group=1"])
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        apply_overrides(tiny_config(), TrainConfig(), ["steps=-1"])
