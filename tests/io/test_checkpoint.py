"""Checkpoint interop: round trips with transformers, FP8 block-scaled weights, sharding, and bad input."""

import json
import os

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.fp8 import dequantize_weight_block, quantize_weight_block
from nanoseek.io import CheckpointError, checkpoint_layout, load_checkpoint, save
from nanoseek.model import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model():
    m = Transformer(tiny_config()).eval()
    for g in m.moe_gates():
        g.e_score_correction_bias.normal_(0, 0.1)
    return m


def _x(m, S=21):
    return torch.randint(0, m.config.vocab_size, (2, S))


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def test_ours_to_transformers(model, tmp_path):
    save(model, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    x = _x(model)
    assert (_logits(model, x) - _logits(hf, x)).abs().max().item() <= 1e-4
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.3.eh_proj.weight" in keys  # MTP after the 3 main layers
    assert "model.layers.3.shared_head.head.weight" in keys and "model.layers.3.embed_tokens.weight" in keys


def test_transformers_to_ours(model, tmp_path):
    cfg = model.config.replace(num_nextn_predict_layers=0)
    d = cfg.to_hf_dict()
    d.pop("architectures")
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**d)).eval()
    with torch.no_grad():
        for g in [layer.mlp.gate for layer in hf.model.layers[1:]]:
            g.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    x = _x(model)
    assert (_logits(ours, x) - _logits(hf, x)).abs().max().item() <= 1e-4


def test_ours_round_trip_exact_with_mtp_and_shards(model, tmp_path):
    save(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / f).exists() for f in files)
    back = nanoseek.load(tmp_path)
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # re-saving unsharded removes the old shards and the index
    save(back, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_fp8_checkpoint_matches_dequantised_reference(tmp_path):
    # hidden 160 and 200-wide projections: several 128-blocks with ragged edges
    cfg = tiny_config(hidden_size=160, q_lora_rank=136, intermediate_size=200)
    m = Transformer(cfg).eval()
    save(m, tmp_path, fp8=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale_inv")
        assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 160) and s.shape == (2, 2)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # not quantised
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    # reference: every quantisable weight replaced by dequant(quant(w)), written independently of save()
    ref = Transformer(cfg).eval()
    ref.load_state_dict(m.state_dict())
    tensors = dict(ref.named_parameters())
    with torch.no_grad():
        for slot in checkpoint_layout(ref).values():
            if slot.quantizable:
                t = tensors[slot.name]
                view = t[slot.expert] if slot.expert is not None else t
                if slot.rows is not None:
                    view = view[slot.rows[0]:slot.rows[1]]
                view.copy_(dequantize_weight_block(*quantize_weight_block(view)))
    loaded = load_checkpoint(tmp_path)
    x = _x(m)
    assert (_logits(loaded, x) - _logits(ref, x)).abs().max().item() <= 1e-5
    assert (_logits(loaded, x) - _logits(m, x)).abs().max().item() > 1e-6  # FP8 really was applied


def test_dtype_choice(model, tmp_path):
    save(model, tmp_path, dtype=torch.bfloat16)
    m = nanoseek.load(tmp_path, dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.moe_gates()[0].e_score_correction_bias.dtype == torch.float32
    m32 = nanoseek.load(tmp_path)
    assert m32.lm_head.weight.dtype == torch.float32


def test_save_leaves_no_temporary_files(model, tmp_path):
    save(model, tmp_path, max_shard_bytes=100_000)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- bad input
def _rewrite(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def saved(model, tmp_path):
    save(model, tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_key(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        nanoseek.load(saved.parent)


def test_extra_key(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.0.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key model\.layers\.0\.bogus\.weight"):
        nanoseek.load(saved.parent)


def test_wrong_shape(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key model\.norm\.weight has shape \[3\]"):
        nanoseek.load(saved.parent)


def test_wrong_dtype(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"key model\.norm\.weight has dtype torch\.int32"):
        nanoseek.load(saved.parent)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable, truncated or corrupt"):
        nanoseek.load(saved.parent)


def test_missing_shard(model, tmp_path):
    save(model, tmp_path, max_shard_bytes=60_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file.*{victim.name}"):
        nanoseek.load(tmp_path)


def test_bad_config(saved):
    cfg_path = saved.parent / "config.json"
    d = json.loads(cfg_path.read_text())
    d["topk_group"] = 99
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="topk_group > n_group"):
        nanoseek.load(saved.parent)


def test_fp8_without_scale(tmp_path):
    m = Transformer(tiny_config())
    save(m, tmp_path, fp8=True)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"FP8 key model\.layers\.0\.mlp\.up_proj\.weight has no"):
        nanoseek.load(tmp_path)


def test_public_api_presets_and_errors():
    m = nanoseek.load("tiny")
    x = torch.randint(0, m.config.vocab_size, (1, 8))
    assert m(x).logits.shape == (1, 8, m.config.vocab_size)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        nanoseek.load("no-such-thing")
