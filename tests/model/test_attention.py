"""MLA forms, RoPE/YaRN closed forms and the softmax scale (V3 §2.1.1, §4.3)."""

import math

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import MLA, Transformer, preset
from nanoseek.model.rope import apply_rope, rope_cos_sin, rope_inv_freq


def _random_mla(cfg) -> MLA:
    attn = MLA(cfg)
    for p in attn.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    return attn


@pytest.mark.parametrize("q_lora", [48, None])
def test_naive_and_absorbed_attention_agree(q_lora):
    cfg = tiny_config(q_lora_rank=q_lora)
    attn = _random_mla(cfg)
    x = torch.randn(2, 23, cfg.hidden_size)
    cos, sin = rope_cos_sin(cfg, torch.arange(23))
    naive = attn(x, cos, sin, absorb=False)
    absorbed = attn(x, cos, sin, absorb=True)
    assert (naive - absorbed).abs().max().item() <= 1e-5
    assert naive.abs().max().item() > 0.1


def test_absorbed_with_explicit_mask_matches_prefix():
    """Attention over a prefix of keys with a rectangular mask equals the causal result at those queries."""
    cfg = tiny_config()
    attn = _random_mla(cfg)
    x = torch.randn(1, 10, cfg.hidden_size)
    cos, sin = rope_cos_sin(cfg, torch.arange(10))
    full = attn(x, cos, sin, absorb=True)
    q_nope, q_pe = attn.query(x[:, 6:], cos[6:], sin[6:])
    kv = attn.latent(x, cos, sin)
    mask = torch.ones(4, 10, dtype=torch.bool).tril(6)
    k, v = attn.expand_kv(kv)
    for o in (attn.attend_absorbed(q_nope, q_pe, kv, mask), attn.attend_naive(q_nope, q_pe, k, v, mask)):
        out = attn.o_proj(o.reshape(1, 4, -1))
        assert (out - full[:, 6:]).abs().max().item() <= 1e-5


def test_full_model_naive_vs_absorbed():
    cfg = tiny_config()
    m = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert (m(x).logits - m(x, absorb=True).logits).abs().max().item() <= 1e-5


def test_v3_softmax_scale():
    # 1/sqrt(192) * (0.1 ln 40 + 1)^2 = 0.135234 (V3 §4.3)
    assert preset("v3").softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert tiny_config(rope_scaling=None).softmax_scale == pytest.approx(24 ** -0.5)


def test_yarn_inv_freq_closed_form():
    cfg = preset("v3")
    d, theta, factor, orig = 64, 10000.0, 40.0, 4096
    inv_freq, attn_factor = rope_inv_freq(cfg)

    def corr(r):
        return d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    assert (low, high) == (10, 23)
    for j in range(d // 2):
        base = theta ** (-2 * j / d)
        smooth = 1 - min(max((j - low) / (high - low), 0.0), 1.0)
        expected = base / factor * (1 - smooth) + base * smooth
        assert inv_freq[j].item() == pytest.approx(expected, rel=1e-5)
    assert attn_factor == 1.0  # mscale == mscale_all_dim: cos/sin are not scaled


def test_rope_rotates_interleaved_pairs():
    cfg = tiny_config(rope_scaling=None)
    d = cfg.qk_rope_head_dim
    x = torch.randn(1, 5, 1, d)
    cos, sin = rope_cos_sin(cfg, torch.arange(5))
    y = apply_rope(x, cos, sin)
    pos, j = 3, 2
    ang = pos * cfg.rope_theta ** (-2 * j / d)
    a, b = x[0, pos, 0, 2 * j], x[0, pos, 0, 2 * j + 1]
    assert y[0, pos, 0, 2 * j].item() == pytest.approx((a * math.cos(ang) - b * math.sin(ang)).item(), abs=1e-6)
    assert y[0, pos, 0, 2 * j + 1].item() == pytest.approx((b * math.cos(ang) + a * math.sin(ang)).item(), abs=1e-6)
    # rotations preserve norms and relative positions: <R_m q, R_n k> depends on m - n only
    q, k = torch.randn(d), torch.randn(d)
    qq = apply_rope(q.expand(1, 5, 1, d).contiguous(), cos, sin)[0, :, 0]
    kk = apply_rope(k.expand(1, 5, 1, d).contiguous(), cos, sin)[0, :, 0]
    assert (qq[3] @ kk[1]).item() == pytest.approx((qq[4] @ kk[2]).item(), rel=1e-5)
