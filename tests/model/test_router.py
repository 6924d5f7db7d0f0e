"""Router (Gate) and MoE cases worked by hand."""

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import MoE
from nanoseek.model.moe import Gate, update_bias


def _gate(**kw) -> Gate:
    cfg = tiny_config(**{"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                         "routed_scaling_factor": 2.5, **kw})
    return Gate(cfg)


# 4 groups of 2 experts; group scores (sum of top-2): g0 1.0, g1 0.9, g2 1.5, g3 0.5
S = torch.tensor([[0.9, 0.1, 0.85, 0.05, 0.8, 0.7, 0.2, 0.3]])


def test_group_masking_excludes_best_expert_of_dropped_group():
    g = _gate()
    w, idx = g.route(S)
    # groups g2 and g0 are kept, so expert 2 (0.85, in g1) loses to expert 4 (0.8, in g2)
    assert sorted(idx[0].tolist()) == [0, 4]
    order = idx[0].argsort()
    torch.testing.assert_close(w[0][order], torch.tensor([0.9, 0.8]) / 1.7 * 2.5)


def test_without_groups_plain_topk():
    g = _gate(topk_method="noaux_tc")
    g.n_group = 1
    _, idx = g.route(S)
    assert sorted(idx[0].tolist()) == [0, 2]


def test_bias_changes_choice_not_weights():
    g = _gate()
    g.e_score_correction_bias[7] = 0.7  # g3 becomes 0.2 + (0.3 + 0.7) = 1.2 > g0
    w, idx = g.route(S)
    assert sorted(idx[0].tolist()) == [4, 7]
    by_expert = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    # weights come from the unbiased scores: 0.8 and 0.3, normalised, times 2.5
    assert by_expert[4] == pytest.approx(0.8 / 1.1 * 2.5, rel=1e-6)
    assert by_expert[7] == pytest.approx(0.3 / 1.1 * 2.5, rel=1e-6)


def test_top1_sigmoid_weight_is_normalised_softmax_is_not():
    """V3's sigmoid gate normalises the chosen affinities for any K (official inference code, transformers'
    DeepseekV3): at top-1 the weight is exactly the scaling factor. V2's softmax gate normalises for K > 1 only."""
    w, idx = _gate(num_experts_per_tok=1).route(S)
    assert idx[0].tolist() == [0] and w[0].tolist() == [2.5]
    w, _ = _gate(num_experts_per_tok=1, norm_topk_prob=False).route(S)
    assert w[0].tolist() == [pytest.approx(0.9 * 2.5)]
    w, _ = _gate(num_experts_per_tok=1, scoring_func="softmax", topk_method="group_limited_greedy").route(S)
    assert w[0].tolist() == [pytest.approx(0.9 * 2.5)]


def test_softmax_group_limited_uses_group_max():
    g = _gate(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
    assert g.e_score_correction_bias is None
    # group max: g0 0.9, g1 0.85, g2 0.8, g3 0.3 -> keep g0, g1 -> experts 0 and 2
    w, idx = g.route(S)
    assert sorted(idx[0].tolist()) == [0, 2]
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.85, 0.9]) * 2.5)


def test_sigmoid_scores_in_fp32():
    g = _gate()
    torch.nn.init.normal_(g.weight)
    x = torch.randn(5, g.weight.shape[1]).to(torch.bfloat16)
    s = g.scores(x)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.sigmoid(x.float() @ g.weight.float().T))


@pytest.mark.parametrize("grad", [True, False])  # sort + grouped GEMM (training) / gathered weights (decode)
def test_moe_matches_per_token_reference(grad):
    cfg = tiny_config()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    for p in moe.shared_experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.set_grad_enabled(grad):
        y, stats = moe(x)
    xf = x.view(-1, cfg.hidden_size)
    w, idx, _ = moe.gate(xf)
    with torch.set_grad_enabled(grad):
        assert moe._per_token(idx) is not grad
    with torch.no_grad():
        assert not moe._per_token(idx.repeat(10_000, 1))  # many tokens: always the grouped GEMM
    ref = moe.shared_experts(xf)
    inter = cfg.moe_intermediate_size
    for t in range(xf.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            e = idx[t, k]
            gu = moe.experts.gate_up_proj[e]
            h = torch.nn.functional.silu(xf[t] @ gu[:inter].T) * (xf[t] @ gu[inter:].T)
            ref[t] = ref[t] + w[t, k] * (h @ moe.experts.down_proj[e].T)
    torch.testing.assert_close(y.view(-1, cfg.hidden_size), ref, atol=1e-5, rtol=1e-5)
    # loads count every (token, expert) pair once per sequence
    assert stats.load.shape == (2, cfg.n_routed_experts)
    assert stats.load.sum().item() == 2 * 9 * cfg.num_experts_per_tok
    expect = torch.zeros(2, cfg.n_routed_experts)
    for t in range(18):
        for e in idx[t]:
            expect[t // 9, e] += 1
    assert torch.equal(stats.load, expect)


def test_balance_loss_closed_form():
    cfg = tiny_config(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.1)
    moe = MoE(cfg).train()
    s = torch.tensor([[[0.9, 0.8, 0.1, 0.2], [0.1, 0.7, 0.6, 0.2]]])  # B=1, T=2
    # f_i = E/(K T) * count: top-2 sets {0,1}, {1,2} -> counts [1,2,1,0] -> f = [1,2,1,0]
    # P_i = mean_t s_i / sum_j s_j: t0 sum 2.0, t1 sum 1.6
    p = torch.tensor([(0.45 + 0.1 / 1.6) / 2, (0.4 + 0.7 / 1.6) / 2, (0.05 + 0.6 / 1.6) / 2, (0.1 + 0.2 / 1.6) / 2])
    expected = 0.1 * (1 * p[0] + 2 * p[1] + 1 * p[2])
    assert moe.balance_loss(s).item() == pytest.approx(expected.item(), rel=1e-6)
    assert moe.eval().balance_loss(s).item() == 0.0


def test_update_bias_sign_rule():
    g = _gate()
    load = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 4.0, 2.0, 2.0]])  # mean 2
    update_bias(g, load, gamma=0.01)
    torch.testing.assert_close(g.e_score_correction_bias,
                               torch.tensor([-0.01, 0.01, 0.0, 0.0, 0.01, -0.01, 0.0, 0.0]))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="needs a CUDA GPU with grouped GEMMs (sm90)")
def test_moe_under_cuda_autocast_uses_the_grouped_gemm(monkeypatch):
    """fp32 residual stream and master weights under bf16 autocast: the experts run one bf16 grouped GEMM, not the
    per-expert fallback loop."""
    cfg = tiny_config()
    moe = MoE(cfg).cuda().train()
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    x = torch.randn(2, 64, cfg.hidden_size, device="cuda", requires_grad=True)
    ref, _ = moe(x)

    def no_loop(*a, **k):
        raise AssertionError("per-expert fallback used")

    monkeypatch.setattr(torch, "split", no_loop)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().sum().backward()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
    assert moe.experts.gate_up_proj.grad is not None
