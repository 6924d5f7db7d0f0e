"""ModelConfig: validation with clear errors, HF config.json in both rope layouts, presets."""

import json

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import ConfigError, ModelConfig, Transformer, preset
from nanoseek.model.stats import model_stats


@pytest.mark.parametrize("overrides, field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts % n_group"),
    (dict(topk_group=5, n_group=4), "topk_group > n_group"),
    (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok > n_routed_experts"),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "not enough experts"),
    (dict(hidden_size="64"), "hidden_size must be an integer"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be positive"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}), "rope_scaling"),
    (dict(scoring_func="softmax", topk_method="noaux_tc"), "noaux_tc"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


def test_hf_json_round_trip_both_rope_layouts(tmp_path):
    cfg = tiny_config()
    cfg.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["scoring_func"] == "sigmoid" and d["topk_method"] == "noaux_tc"  # llama.cpp needs these
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_parameters"]["rope_type"] == "yarn"
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    # legacy only
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert ModelConfig.from_dict(legacy) == cfg
    # transformers-5 only
    new = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_dict(new) == cfg


def test_hf_written_config_reads_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config()
    d = cfg.to_hf_dict()
    d.pop("architectures")
    transformers.DeepseekV3Config(**d).save_pretrained(tmp_path)
    back = ModelConfig.from_json(tmp_path / "config.json")
    for f in ("hidden_size", "n_group", "topk_group", "q_lora_rank", "rope_scaling", "rope_theta",
              "num_nextn_predict_layers", "routed_scaling_factor"):
        assert getattr(back, f) == getattr(cfg, f), f


def test_malformed_json_and_unknown_fields(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="unknown config field.*hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3}, strict=True)
    with pytest.warns(UserWarning, match="hiden_size"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "hiden_size": 3})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_dict({"num_attention_heads": 4, "num_key_value_heads": 2})


def test_presets_sizes():
    tiny, small = model_stats(preset("tiny")), model_stats(preset("small"))
    assert tiny.total_params + tiny.mtp_params <= 5e6
    assert 50e6 <= small.total_params + small.mtp_params <= 100e6
    v2 = preset("v2-lite")
    assert v2.scoring_func == "softmax" and v2.q_lora_rank is None and v2.n_shared_experts == 2
    assert 15.5e9 < model_stats(v2).total_params < 16.5e9


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_stats_equal_counted_parameters(name):
    cfg = preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    st = model_stats(cfg)
    assert st.total_params == sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    assert st.mtp_params == sum(p.numel() for n, p in m.named_parameters() if n.startswith("mtp."))


# The official DeepSeek-V3 repository's inference/configs/*.json, verbatim (ModelArgs names of inference/model.py)
OFFICIAL_16B = {
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27, "n_dense_layers": 1,
    "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6, "route_scale": 1.0,
    "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "mscale": 0.707,
}
OFFICIAL_236B = {
    "vocab_size": 102400, "dim": 5120, "inter_dim": 12288, "moe_inter_dim": 1536, "n_layers": 60, "n_dense_layers": 1,
    "n_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 8,
    "n_limited_groups": 3, "route_scale": 16.0, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128,
}
OFFICIAL_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61, "n_dense_layers": 3,
    "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 8,
    "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}


@pytest.mark.parametrize("d, expect", [
    (OFFICIAL_16B, dict(hidden_size=2048, num_hidden_layers=27, n_routed_experts=64, num_experts_per_tok=6,
                        q_lora_rank=None, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                        total=15.71e9, active=2.66e9)),
    (OFFICIAL_236B, dict(hidden_size=5120, num_hidden_layers=60, n_routed_experts=160, n_group=8, topk_group=3,
                         q_lora_rank=1536, scoring_func="softmax", topk_method="group_limited_greedy",
                         norm_topk_prob=False, routed_scaling_factor=16.0, total=235.74e9, active=21.38e9)),
    (OFFICIAL_671B, dict(hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                         n_group=8, topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                         routed_scaling_factor=2.5, total=671.03e9, active=37.55e9)),
])
def test_official_inference_configs_translate(tmp_path, d, expect):
    import warnings

    (tmp_path / "config.json").write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignoring unknown config field(s)"
        cfg = ModelConfig.from_json(tmp_path / "config.json")
    st = model_stats(cfg)
    total, active = expect.pop("total"), expect.pop("active")
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert st.total_params == pytest.approx(total, rel=1e-3) and st.active_params == pytest.approx(active, rel=1e-3)
    # YaRN to 4096 * 40 with ModelArgs' defaults (rope_factor 40, beta 32 / 1); mscale from the file (else 1.0)
    assert cfg.max_position_embeddings == 163840 and cfg.rope_scaling["factor"] == 40.0
    assert cfg.rope_scaling["mscale"] == cfg.rope_scaling["mscale_all_dim"] == d.get("mscale", 1.0)
    assert cfg.num_nextn_predict_layers == 0  # inference/model.py has no MTP module


def test_official_configs_equal_the_presets():
    same = dict(num_nextn_predict_layers=0, bos_token_id=None, eos_token_id=None)
    assert ModelConfig.from_dict(OFFICIAL_16B) == preset("v2-lite").replace(**same)
    assert ModelConfig.from_dict(OFFICIAL_671B) == preset("v3").replace(**same)
    # a missing key takes ModelArgs' default: an empty file is the 16B model
    assert ModelConfig.from_dict({"dim": 2048}) == ModelConfig.from_dict(OFFICIAL_16B).replace(
        rope_scaling={**ModelConfig.from_dict(OFFICIAL_16B).rope_scaling, "mscale": 1.0, "mscale_all_dim": 1.0})
    short = ModelConfig.from_dict({**OFFICIAL_16B, "max_seq_len": 4096})  # no longer than original_seq_len: no YaRN
    assert short.rope_scaling is None and short.max_position_embeddings == 4096


@pytest.mark.parametrize("d, message", [
    ({**OFFICIAL_16B, "hidden_size": 2048}, "mixes DeepSeek inference keys .* with Hugging Face keys .*hidden_size"),
    ({**OFFICIAL_16B, "n_expert": 3}, "unknown key.*n_expert.*known: max_batch_size"),
    ({**OFFICIAL_16B, "score_func": "relu"}, "score_func must be one of sigmoid, softmax, got 'relu'"),
    ({**OFFICIAL_16B, "dtype": "fp4"}, "dtype must be bf16 or fp8"),
])
def test_official_config_errors(d, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_tied_embeddings_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tie_word_embeddings must be false, got True: .*not implemented"):
        tiny_config(tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "tie_word_embeddings": True}))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_json(tmp_path / "config.json")
