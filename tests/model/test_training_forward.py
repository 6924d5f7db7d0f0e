"""The training forward: main / MTP / balance losses, expert loads, MTP alignment, gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from nanoseek.model import Transformer


def _batch(cfg, B=2, S=16):
    data = torch.randint(0, cfg.vocab_size, (B, S + 1))
    return data[:, :-1], data[:, 1:]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_loss_parts_and_combination(depth):
    cfg = tiny_config(num_nextn_predict_layers=depth, mtp_loss_weight=0.3, aux_loss_alpha=1e-2)
    m = Transformer(cfg).train()
    x, y = _batch(cfg)
    out = m(x, labels=y)
    main = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
    torch.testing.assert_close(out.main_loss, main)
    assert len(out.mtp_losses) == depth
    for k, (lg, loss) in enumerate(zip(out.mtp_logits, out.mtp_losses, strict=True), start=1):
        assert lg.shape == (2, 16 - k, cfg.vocab_size)
        torch.testing.assert_close(loss, F.cross_entropy(lg.reshape(-1, cfg.vocab_size), y[:, k:].reshape(-1)))
    mtp = 0.3 / depth * sum(out.mtp_losses) if depth else 0.0
    torch.testing.assert_close(out.loss, main + mtp + out.balance_loss)
    if depth:  # a scheduled lambda overrides the config's
        late = m(x, labels=y, mtp_loss_weight=0.1)
        torch.testing.assert_close(late.loss, late.main_loss + 0.1 / depth * sum(late.mtp_losses) + late.balance_loss)
    assert out.balance_loss.item() > 0
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace + depth
    assert out.expert_load.shape == (n_moe, 2, cfg.n_routed_experts)
    assert torch.all(out.expert_load.sum(dim=(1, 2)) == torch.tensor(
        [2 * 16 * cfg.num_experts_per_tok] * (n_moe - depth)
        + [2 * (16 - k) * cfg.num_experts_per_tok for k in range(1, depth + 1)], dtype=torch.float32))


def test_mtp_alignment_is_causal_plus_one():
    """MTP depth k at position i sees tokens t_0..t_{i+k} and nothing later."""
    cfg = tiny_config(num_nextn_predict_layers=2)
    m = Transformer(cfg).eval()
    x, y = _batch(cfg, B=1, S=20)
    with torch.no_grad():
        a = m(x, labels=y)
        x2, y2 = x.clone(), y.clone()
        p = 10  # change token t_10 (input position 10, label position 9)
        x2[0, p] = (x2[0, p] + 1) % cfg.vocab_size
        y2[0, p - 1] = x2[0, p]
        b = m(x2, labels=y2)
    for k in (1, 2):
        diff = (a.mtp_logits[k - 1] - b.mtp_logits[k - 1]).abs().amax(dim=-1)[0]
        assert torch.all(diff[: p - k] < 1e-5), k  # positions i with i + k < p are untouched
        assert diff[p - k] > 1e-3, k  # position i = p - k embeds t_p


def test_gradients_reach_every_parameter_but_not_the_bias():
    cfg = tiny_config(num_nextn_predict_layers=1)
    m = Transformer(cfg).train()
    x, y = _batch(cfg)
    m(x, labels=y).loss.backward()
    names = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert names == []
    assert all("e_score_correction_bias" not in n for n, _ in m.named_parameters())
    assert m.moe_gates()[0].e_score_correction_bias.dtype == torch.float32


def test_ignore_index_and_eval_mode():
    cfg = tiny_config()
    m = Transformer(cfg).train()
    x, y = _batch(cfg)
    y = y.clone()
    y[:, :5] = -100
    out = m(x, labels=y)
    assert torch.isfinite(out.loss)
    out_eval = m.eval()(x, labels=y)
    assert out_eval.balance_loss.item() == 0.0  # the balance loss is a training-time term


def test_fused_loss_equals_materialised_logits():
    """return_logits=False (chunked linear cross-entropy) gives the same losses and gradients."""
    from nanoseek.model.loss import linear_cross_entropy

    cfg = tiny_config(num_nextn_predict_layers=1)
    m = Transformer(cfg).train()
    x, y = _batch(cfg, S=24)
    y = y.clone()
    y[0, :3] = -100
    ref = m(x, labels=y)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out = m(x, labels=y, return_logits=False)
    assert out.logits is None and out.mtp_logits == []
    torch.testing.assert_close(out.main_loss, ref.main_loss)
    torch.testing.assert_close(out.mtp_losses[0], ref.mtp_losses[0])
    (2 * out.loss).backward()  # a non-unit upstream gradient is applied too
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 2 * ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)
    # small chunks, and no gradient under no_grad
    h, w = torch.randn(50, 8), torch.randn(11, 8)
    lab = torch.randint(0, 11, (50,))
    with torch.no_grad():
        a = linear_cross_entropy(h, w, lab, chunk=7)
    torch.testing.assert_close(a, F.cross_entropy(h @ w.T, lab))
