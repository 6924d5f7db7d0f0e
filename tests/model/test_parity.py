"""Numerical parity with transformers' DeepseekV3 / DeepseekV2 sharing the same random weights."""

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import Transformer

transformers = pytest.importorskip("transformers")


def _hf_model(cfg, ours: Transformer):
    d = cfg.to_hf_dict()
    d.pop("architectures")
    if cfg.scoring_func == "sigmoid":
        hcfg = transformers.DeepseekV3Config(**d)
        hm = transformers.DeepseekV3ForCausalLM(hcfg)
    else:  # the softmax gate of DeepSeek-V2 lives in transformers' DeepseekV2
        for k in ("rope_interleave", "rope_scaling"):
            d.pop(k, None)
        hcfg = transformers.DeepseekV2Config(**d)
        hm = transformers.DeepseekV2ForCausalLM(hcfg)
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}
    hm.load_state_dict(sd, strict=True)
    return hm.eval()


CASES = {
    "v3-yarn-grouped-qlora": {},
    "v3-no-qlora": dict(q_lora_rank=None),
    "v3-no-yarn-one-group": dict(rope_scaling=None, n_group=1, topk_group=1),
    "v3-mscale-0.707": dict(rope_scaling={**tiny_config().rope_scaling, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "v3-two-shared-no-norm": dict(n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.0),
    # top-1: the single sigmoid weight is normalised too (to 1, times the scaling factor), as in transformers
    "v3-top1": dict(num_experts_per_tok=1, routed_scaling_factor=2.5),
    "v2-softmax-greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                              routed_scaling_factor=1.0, n_group=1, topk_group=1, q_lora_rank=None,
                              n_shared_experts=2),
    "v2-softmax-group-limited": dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                     norm_topk_prob=False, routed_scaling_factor=1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    cfg = tiny_config(**CASES[case])
    ours = Transformer(cfg).eval()
    for gate in ours.moe_gates():
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.normal_(0, 0.2)  # a bias that changes the routing
    hf = _hf_model(cfg, ours)
    x = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        a = ours(x).logits
        b = hf(x).logits
    assert a.shape == b.shape == (2, 37, cfg.vocab_size)
    assert (a - b).abs().max().item() <= 1e-4
    # the comparison is not vacuous: the logits are far from constant
    assert a.std().item() > 0.1


def test_bias_changes_routing_and_parity_still_holds():
    """With a large correction bias the selected experts change; transformers agrees on the new routing."""
    cfg = tiny_config()
    ours = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        before = ours(x).logits
        for gate in ours.moe_gates():
            gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, cfg.n_routed_experts))
        after = ours(x).logits
        hf = _hf_model(cfg, ours)
        ref = hf(x).logits
    assert (before - after).abs().max() > 1e-3
    assert (after - ref).abs().max() <= 1e-4
