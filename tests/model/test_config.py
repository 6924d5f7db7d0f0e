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
