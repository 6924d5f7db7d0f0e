"""The cluster planner against DeepSeek-V3's reported figures, the DualPipe table, and FLOPs counted on a real
forward."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.model.stats import model_stats, moe_params
from nanoseek.parallel.plan import V3_REPORTED, ClusterConfig, activation_bytes, bubble_chunks, plan


def test_v3_run_beside_its_reported_figures():
    c = nanoseek.preset("v3")
    p = plan(c, ClusterConfig())  # V3's cluster: 2048 GPUs, PP 16 DualPipe, EP 64 over 8 nodes
    st = model_stats(c)
    assert st.total_params / 671e9 == pytest.approx(1, abs=0.005)
    assert st.active_params / 37e9 == pytest.approx(1, abs=0.02)
    assert (p.dp, p.expert_copies, p.micro_batches) == (128, 2, 120)  # 15,360 sequences over 128 pipelines
    # 180K GPU-hours per trillion tokens means ~39% of the H800's dense BF16 peak with these FLOPs (about 20% of the
    # FP8 peak V3 trained at): a plausible utilisation, not a fitted one
    assert 0.3 < p.implied_v3_mfu < 0.5
    at_v3 = plan(c, ClusterConfig(mfu=p.implied_v3_mfu))
    assert at_v3.gpu_hours_per_trillion_tokens == pytest.approx(V3_REPORTED["gpu_hours_per_trillion_tokens"])
    assert at_v3.gpu_hours_per_trillion_tokens * 14.8 == pytest.approx(V3_REPORTED["pretraining_gpu_hours"], rel=0.001)
    # V3's memory choices (FP8 caching, recomputation) fit an 80 GB GPU; without recomputation they would not
    assert p.total_gib < 80 < plan(c, ClusterConfig(recompute=False)).total_gib
    # EP: FP8 dispatch is half a BF16 row, the BF16 combine a full one; at most 4 nodes a token
    H = c.hidden_size
    assert p.ep_dispatch_bytes_per_token == 8 * (H + 4 * H // 128) and p.ep_combine_bytes_per_token == 8 * 2 * H
    assert p.ep_ib_bytes_per_token < 4 * (3 * H + 4 * H // 128)


def test_bubbles_follow_the_dualpipe_table():
    for pp in (4, 8, 16):
        assert bubble_chunks("1f1b", pp) == (pp - 1) * 3  # (PP-1)(F+B) with B = 2F
        assert bubble_chunks("zb1p", pp) == (pp - 1) * 1  # (PP-1)(F+B-2W), W = F
        assert bubble_chunks("dualpipe", pp) == (pp / 2 - 1) * 2  # (PP/2-1)(F&B+B-3W), F&B = F+B
    p = plan(nanoseek.preset("v3"), ClusterConfig())
    assert p.bubble["dualpipe"] < p.bubble["zb1p"] < p.bubble["1f1b"]
    assert p.bubble_fraction["1f1b"] == pytest.approx(45 / (45 + 3 * 120))
    with pytest.raises(ConfigError, match="even"):
        ClusterConfig(schedule="dualpipe", pp=15, gpus=1920)


def test_forward_flops_equal_a_flop_count_of_the_model():
    """model_stats' FLOPs (the planner's) minus the routed experts and the attention core (torch's counter sees
    neither the grouped GEMM nor the CPU attention kernel) are exactly the matmul FLOPs counted on a forward."""
    c = nanoseek.preset("tiny")
    model = nanoseek.load(c).eval()
    S = 96
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randint(0, c.vocab_size, (1, S)))
    counted = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    st = model_stats(c, seq_len=S)
    routed, _ = moe_params(c)
    routed_flops = 2 * c.n_moe_layers * routed * c.num_experts_per_tok // c.n_routed_experts
    attn_core = c.num_hidden_layers * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (S + 1) / 2
    assert counted["aten.mm"] == round((st.forward_flops_per_token - routed_flops - attn_core) * S)


def _saved_per_token(model, layer: int, S: int = 128) -> float:
    """Elements autograd keeps for the backward of one block's forward, per token (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes() // t.element_size()
        return t

    h = model.embed(torch.randint(0, model.config.vocab_size, (1, S))).detach().requires_grad_(True)
    pos = model.positions(S)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[layer](h, pos.cos, pos.sin, pos.mask, False, None)
    return sum(seen.values()) / S


def test_activation_estimate_against_what_autograd_keeps():
    """The planner's activations per token and block (here without V3's FP8 caching and recomputation, in 2-byte
    elements) against the tensors autograd really saves in a block's forward: at least as many (eager PyTorch keeps
    extra copies: fp32 norm inputs, the experts' permuted rows), and the same ratio at two model sizes -- the
    estimate grows with the dimensions as the real activations do (measured: 1.33 dense, 1.62 MoE)."""
    ratios = {}
    for name in ("tiny", "small"):
        torch.manual_seed(0)
        model = nanoseek.load(name).train()
        c = model.config
        for layer, moe in ((0, False), (c.num_hidden_layers - 1, True)):
            est = activation_bytes(c, fp8_cache=False, recompute=False, moe=moe) / 2
            ratios[name, moe] = _saved_per_token(model, layer) / est
    for moe in (False, True):
        assert 1.0 <= ratios["tiny", moe] < 2.0 and ratios["small", moe] == pytest.approx(ratios["tiny", moe], rel=0.03)


def test_cli(capsys):
    assert main(["plan", "--pp", "8", "--gpus", "1024", "--schedule", "dualpipev", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"]["schedule"] == "dualpipev" and out["plan"]["dp"] == 128
    assert main(["plan"]) == 0
    text = capsys.readouterr().out
    assert "671.0B total" in text and "V3: 180K" in text
    with pytest.raises(SystemExit):
        main(["plan", "--set", "recompte=false"])
    assert "did you mean 'recompute'" in capsys.readouterr().err
