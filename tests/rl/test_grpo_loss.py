"""GRPO loss pieces against values worked by hand."""

import math

import pytest
import torch

from nanoseek.rl.grpo_loss import (
    aggregate,
    all_equal_fraction,
    clipped_objective,
    group_advantages,
    grpo_loss,
    kl_k3,
)


def test_group_advantages_by_hand():
    # group 1: [1, 0, 0, 1]: mean 0.5, deviations +-0.5, Bessel std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.57735
    # group 2: [3, 1]     : mean 2,   deviations +-1,   Bessel std sqrt((1 + 1) / 1) = sqrt(2)
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)  # 0.866025
    torch.testing.assert_close(a, torch.tensor([[s, -s, -s, s]]))
    b = group_advantages(torch.tensor([[3.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(b, torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2)]]))
    # flat [B*G] input with group_size, default eps 1e-4 in the denominator; an all-equal group gets 0
    flat = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    e = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(flat, torch.tensor([e, -e, -e, e, 0.0, 0.0, 0.0, 0.0]))
    # Dr. GRPO: only the mean is removed
    torch.testing.assert_close(
        group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale_std=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]])
    )
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=2)


def test_all_equal_fraction():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert all_equal_fraction(r, group_size=4) == pytest.approx(2 / 3)  # [1,1,1,1] and [.5,.5,.5,.5] are constant
    assert all_equal_fraction(r.view(6, 2)) == pytest.approx(5 / 6)  # only [1, 0] differs


def test_kl_k3_by_hand():
    # logp = log .5, ref = log .25: d = ref - logp = log .5; exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # logp = log .25, ref = log .5: d = log 2;        2 - 0.693147 - 1 = 0.306853;  equal -> 0
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 1 - math.log(2), 0.0]))


def test_clipped_objective_both_sides_asymmetric():
    # eps_low 0.2 -> lower clip 0.8; eps_high 0.28 -> upper clip 1.28
    rho = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 1.25, 0.75]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0, -1.0]])
    old = torch.zeros_like(rho)
    logp = torch.log(rho).requires_grad_()
    obj, clipped = clipped_objective(logp, old, adv, eps_low=0.2, eps_high=0.28)
    expected = [
        1.28,  # rho 1.5, A +1: min(1.5, 1.28) -> clipped high
        -1.5,  # rho 1.5, A -1: min(-1.5, -1.28) = -1.5, unclipped (pessimistic side)
        0.5,  # rho 0.5, A +1: min(0.5, 0.8) = 0.5, unclipped
        -0.8,  # rho 0.5, A -1: min(-0.5, -0.8) -> clipped low
        2.2,  # rho 1.1, A +2: inside the range
        1.25,  # rho 1.25, A +1: inside [0.8, 1.28] (a symmetric eps 0.2 would give 1.2)
        -0.8,  # rho 0.75, A -1: min(-0.75, -0.8) -> clipped low (eps_low 0.28 would give -0.75)
    ]
    torch.testing.assert_close(obj, torch.tensor([expected]))
    assert clipped.tolist() == [[True, False, False, True, False, False, True]]
    # d(rho A)/d logp = rho A where unclipped, 0 where clipped
    obj.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.5, 0.5, 0.0, 2.2, 1.25, 0.0]]))
    # symmetric default: eps_high = eps_low
    obj_sym, _ = clipped_objective(torch.log(rho), old, adv, eps_low=0.2)
    assert obj_sym[0, 5].item() == pytest.approx(1.2)
    assert obj_sym[0, 6].item() == pytest.approx(-0.8)


MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregations_on_ragged_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])  # padding values must not count
    # grpo: per-sequence means (1+2+3)/3 = 2 and 4/1 = 4, then their mean: 3
    assert aggregate(per_token, MASK, "grpo").item() == pytest.approx(3.0)
    # dapo: (1+2+3+4) / 4 active tokens = 2.5
    assert aggregate(per_token, MASK, "dapo").item() == pytest.approx(2.5)
    # dr_grpo: 10 / (B=2 * T=3) = 1.6667; with max_len 5: 10 / (2 * 5) = 1.0
    assert aggregate(per_token, MASK, "dr_grpo").item() == pytest.approx(10 / 6)
    assert aggregate(per_token, MASK, "dr_grpo", max_len=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(per_token, MASK, "mean")


@pytest.mark.parametrize(
    "aggregation, loss, g1, g2",
    [
        # A = [1, -0.5]; with rho = 1 each token's objective is A_i, loss = -aggregate(A)
        ("grpo", -(1.0 - 0.5) / 2, -1 / (2 * 3), 0.5 / (2 * 1)),  # -mean_i A_i; grad -A_i / (B n_i)
        ("dapo", -(3 * 1.0 - 0.5) / 4, -1 / 4, 0.5 / 4),  # -sum A / N; grad -A_i / N
        ("dr_grpo", -(3 * 1.0 - 0.5) / 6, -1 / 6, 0.5 / 6),  # -sum A / (B T); grad -A_i / (B T)
    ],
)
def test_mu1_loss_value_and_nonzero_gradient(aggregation, loss, g1, g2):
    logp = torch.log(torch.tensor([[0.3, 0.6, 0.2], [0.9, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -0.5])
    value, metrics = grpo_loss(logp, None, logp.detach(), adv, MASK, beta=0.04, aggregation=aggregation)
    assert value.item() == pytest.approx(loss)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["kl"] == pytest.approx(0.0)
    assert metrics["clip_frac"] == 0.0
    value.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[g1, g1, g1], [g2, 0.0, 0.0]]))


def test_kl_term_and_clip_metrics():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    old = logp - torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 1.0]]))  # rho 1.5 and 0.5 on the first tokens
    ref = logp + math.log(2)  # k3 = 2 - log 2 - 1 = 0.306853 on every token
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logp, old, ref, adv, MASK, beta=0.1, eps_low=0.2, eps_high=0.28, aggregation="dapo")
    # objectives: seq 1: 1.28 (clipped high), 1, 1; seq 2: -0.8 (clipped low); dapo: -(1.28 + 2 - 0.8) / 4 = -0.62
    k3 = 1 - math.log(2)
    assert m["pg_loss"] == pytest.approx(-0.62)
    assert loss.item() == pytest.approx(-0.62 + 0.1 * k3)
    assert m["kl"] == pytest.approx(k3)
    assert m["clip_frac"] == pytest.approx(2 / 4)
    assert m["clip_frac_high"] == pytest.approx(1 / 4) and m["clip_frac_low"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, adv, MASK, beta=0.1)
