"""GGUF export / import (nanoseek.io.gguf): the F32 round trip gives identical logits, F16 / BF16 / Q8_0 read back as
the closed form of their rounding, the keys llama.cpp's deepseek2 loader reads carry the right values (YaRN included,
checked against llama.cpp's formulas), the tokenizer survives, and bad files fail with one clear line.
(tests/io/test_llama_cpp.py runs the files through llama.cpp itself.)"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from conftest import YARN, tiny_config

import nanoseek
from nanoseek.cli import main
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.io.gguf import GGUFError, read_gguf, read_gguf_config, read_gguf_tokenizer, write_gguf, yarn_keys
from nanoseek.model import Transformer
from nanoseek.model.rope import rope_inv_freq

# V2-Lite's shape of the features: softmax gate without normalisation, greedy top-k, no query compression, two shared
# experts, YaRN with mscale 0.707, no MTP
V2_LIKE = dict(q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
               rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
TRICKY = ["hello world", "  leading and trailing   ", "a\n\n\nb\r\n", "12345678 + 9.5", "café naïve Ωmega ½",
          "emoji 🙂🚀 end", "<｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜>", "<think>why</think> so", "",
          "def f(x):\n\treturn x_y  + 1", "日本語のテキスト and 漢字", "obj.attr(foo_bar)", "don't",
          "self._loop.call_soon(self._read_ready)"]


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources() if p.name in {"bisect.py", "heapq.py",
                                                                                   "shlex.py", "textwrap.py"}]
    return train_tokenizer(texts, vocab_size=400, show_progress=False)


def tiny(tok, **overrides) -> Transformer:
    """conftest's tiny DeepSeek-V3 over `tok`, with a non-zero balancing bias (so that it changes the routing)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size + 3, **overrides)).eval()  # + padding ids
    with torch.no_grad():
        for gate in model.moe_gates():
            if gate.e_score_correction_bias is not None:
                gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.parametrize("features", ["v3", "v2"])
def test_f32_round_trip_gives_identical_model_and_logits(tok, tmp_path, features):
    model = tiny(tok, **(V2_LIKE if features == "v2" else {}))
    path = write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    back = nanoseek.load(path)
    assert back.config == model.config  # every field, from llama.cpp's keys (+ nanoseek's training coefficients)
    assert read_gguf_config(path).replace(initializer_range=0.0) == model.config.replace(initializer_range=0.0)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    ids = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = model(ids, labels=ids.roll(-1, 1)), back(ids, labels=ids.roll(-1, 1))
    assert torch.equal(a.logits, b.logits)
    assert len(a.mtp_logits) == len(b.mtp_logits) == model.config.num_nextn_predict_layers
    assert all(torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits, strict=True))


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    y = y.double()  # ggml's roundf, exactly
    return (y.sign() * (y.abs() + 0.5).floor()).float()


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 then dequantize: blocks of 32 along a row, d = amax/127 (stored fp16),
    q = roundf(x * (1/d)), value fp16(d) * q."""
    b = w.float().reshape(-1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (d.half().float() * _round_half_away(b * inv)).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_quantised_types_read_back_as_their_rounding(tok, tmp_path, qtype):
    model = tiny(tok)
    cfg = model.config
    back = read_gguf(write_gguf(model, tmp_path / "m.gguf", tok, qtype))

    def rounded(x: torch.Tensor) -> torch.Tensor:  # a matrix stored in `qtype` (Q8_0: F16 unless rows are 32-blocks)
        if qtype == "bf16":
            return x.bfloat16().float()
        return q8_0(x) if qtype == "q8_0" and x.shape[-1] % 32 == 0 else x.half().float()

    sd = back.state_dict()
    for name, w in model.state_dict().items():
        if w.dim() == 1 or name.endswith("mlp.gate.weight"):  # norms, biases and the router stay F32
            want = w
        elif name.endswith("kv_b_proj.weight"):  # W_UK is stored transposed: rows of qk_nope_head_dim values
            heads = w.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
            k, v = heads.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            k = rounded(k.transpose(1, 2).contiguous()).transpose(1, 2)
            want = torch.cat((k, rounded(v)), dim=1).reshape(w.shape)
        else:
            want = rounded(w)
        assert torch.equal(sd[name], want), name
    # the rounding is real: the matrices moved, by about their type's resolution
    rel = (sd["lm_head.weight"] - model.lm_head.weight).norm() / model.lm_head.weight.norm()
    assert {"f16": 1e-5, "bf16": 1e-3, "q8_0": 1e-3}[qtype] < rel < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[qtype]


def test_metadata_has_every_deepseek2_key_llama_cpp_reads(tok, tmp_path):
    model = tiny(tok)
    path = write_gguf(model, tmp_path / "m.gguf", tok, "q8_0", name="tiny")
    f = fields(path)
    a = "deepseek2."
    want = {
        "general.architecture": "deepseek2", "general.name": "tiny", "general.file_type": 7,
        a + "vocab_size": tok.vocab_size + 3, a + "context_length": 512, a + "embedding_length": 64,
        a + "feed_forward_length": 96, a + "block_count": 4, a + "nextn_predict_layers": 1,
        a + "leading_dense_block_count": 1, a + "attention.head_count": 4, a + "attention.head_count_kv": 1,
        a + "attention.q_lora_rank": 48, a + "attention.kv_lora_rank": 32, a + "attention.key_length": 40,
        a + "attention.value_length": 32, a + "attention.key_length_mla": 24, a + "attention.value_length_mla": 12,
        a + "expert_feed_forward_length": 32, a + "expert_count": 8, a + "expert_used_count": 3,
        a + "expert_shared_count": 1, a + "expert_group_count": 4, a + "expert_group_used_count": 2,
        a + "expert_weights_norm": True, a + "expert_gating_func": 2,  # sigmoid: llama.cpp's default is softmax
        a + "rope.dimension_count": 8, a + "rope.scaling.type": "yarn", a + "rope.scaling.original_context_length": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3",
        "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": tok.hf_config()["chat_template"],
    }
    assert {k: f.get(k) for k in want} == want
    floats = {a + "expert_weights_scale": 2.5, a + "rope.freq_base": 10000.0, a + "rope.scaling.factor": 8.0,
              a + "rope.scaling.yarn_beta_fast": 32.0, a + "rope.scaling.yarn_beta_slow": 1.0,
              a + "attention.layer_norm_rms_epsilon": 1e-6,
              a + "rope.scaling.yarn_log_multiplier": 0.1}  # convert_hf_to_gguf's 0.1 * mscale_all_dim
    for k, v in floats.items():
        assert f[k] == pytest.approx(v, rel=1e-6), k
    assert a + "rope.scaling.attn_factor" not in f  # 1: mscale == mscale_all_dim

    # tensors: llama.cpp's names (gguf-py's table for deepseek2, plus its nextn tensors) and ggml shapes
    r = gguf.GGUFReader(path)
    shapes = {t.name: t.shape.tolist() for t in r.tensors}
    known = set()
    for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2] + [
            gguf.MODEL_TENSOR.NEXTN_EH_PROJ, gguf.MODEL_TENSOR.NEXTN_ENORM, gguf.MODEL_TENSOR.NEXTN_HNORM,
            gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM]:
        for bid in range(4):
            known |= {gguf.TENSOR_NAMES[t].format(bid=bid) + s for s in (".weight", ".bias")}
    assert set(shapes) <= known
    assert shapes["blk.1.attn_k_b.weight"] == [16, 32, 4]  # {d_nope, R, H}
    assert shapes["blk.1.attn_v_b.weight"] == [32, 12, 4]  # {R, d_v, H}
    assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 32, 8]  # {H, I, E}
    assert shapes["blk.2.exp_probs_b.bias"] == [8]
    assert shapes["blk.3.nextn.eh_proj.weight"] == [128, 64]  # the MTP module, after the 3 main blocks
    assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_inp.weight" not in shapes  # a leading dense block
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0" and types["blk.1.attn_k_b.weight"] == "F16"  # rows of 16
    # W_UK^T per head: attn_k_b[h] = kv_b_proj.view(H, dn + dv, R)[h, :dn]^T
    k_b = next(t for t in r.tensors if t.name == "blk.1.attn_k_b.weight")
    w = model.model.layers[1].self_attn.kv_b_proj.weight.view(4, 28, 32)
    assert torch.equal(torch.from_numpy(k_b.data.astype(np.float32)), w[:, :16].transpose(1, 2).half().float())


def test_v2_keys_softmax_gate_without_groups_or_query_compression(tok, tmp_path):
    f = fields(write_gguf(tiny(tok, **V2_LIKE), tmp_path / "m.gguf", tok, "f32"))
    a = "deepseek2."
    assert (f[a + "expert_gating_func"], f[a + "expert_weights_norm"], f[a + "attention.q_lora_rank"]) == (1, False, 0)
    assert f[a + "nextn_predict_layers"] == 0 and f[a + "block_count"] == 3
    assert a + "expert_group_count" not in f  # greedy routing: llama.cpp must not group-limit
    assert f[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707, rel=1e-6)


@pytest.mark.parametrize("rope", [dict(YARN), {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707},
                                  {**YARN, "mscale": 0.5, "mscale_all_dim": 0.0},
                                  {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}])
def test_yarn_keys_reproduce_nanoseek_under_llama_cpp_formulas(tok, tmp_path, rope):
    """llama.cpp's deepseek2 (src/models/deepseek2.cpp, llama-context.cpp): rope cos/sin x attn_factor and softmax
    scale (attn_factor (1 + L ln s / 10))^2 / sqrt(d_qk) with L = yarn_log_multiplier / 0.1 when that key is set;
    without it both use attn_factor (1 + ln s / 10)."""
    model = tiny(tok, rope_scaling=rope, num_nextn_predict_layers=0)
    cfg = model.config
    f = fields(write_gguf(model, tmp_path / "m.gguf", tok, "f32"))
    s = f["deepseek2.rope.scaling.factor"]
    attn = f.get("deepseek2.rope.scaling.attn_factor", 1.0)
    if "deepseek2.rope.scaling.yarn_log_multiplier" in f:
        L = f["deepseek2.rope.scaling.yarn_log_multiplier"] / 0.1
        amplitude, mscale = attn, attn * (1 + 0.1 * L * math.log(s))
    else:
        amplitude = mscale = attn * (1 + 0.1 * math.log(s))
    assert amplitude == pytest.approx(rope_inv_freq(cfg)[1], rel=1e-6)
    assert mscale**2 / math.sqrt(cfg.qk_head_dim) == pytest.approx(cfg.softmax_scale, rel=1e-6)
    # and back: the config read from the file computes the same
    back = read_gguf_config(tmp_path / "m.gguf")
    assert back.softmax_scale == pytest.approx(cfg.softmax_scale, rel=1e-6)
    assert rope_inv_freq(back)[1] == pytest.approx(rope_inv_freq(cfg)[1], rel=1e-6)
    assert torch.allclose(rope_inv_freq(back)[0], rope_inv_freq(cfg)[0])


def test_tokenizer_round_trips(tok, tmp_path):
    path = write_gguf(tiny(tok), tmp_path / "m.gguf", tok, "f32")
    f = fields(path)
    n = tok.vocab_size
    assert f["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, n + 3)]
    specials = set(tok.special_ids.values())
    types = f["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(specials)
    assert types[n:] == [gguf.TokenType.UNUSED] * 3 and set(types[:n]) == {gguf.TokenType.NORMAL,
                                                                             gguf.TokenType.CONTROL}
    import json
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    back = read_gguf_tokenizer(path)
    assert back.special_ids == tok.special_ids and back.hash == tok.hash
    assert all(back.encode(s) == tok.encode(s) for s in TRICKY)


def test_rebuilt_tokenizer_splits_as_llama_cpp_deepseek_v3(tok, tmp_path):
    """Without the embedded tokenizer.json, the GGUF fields rebuild llama.cpp's tokeniser: lossless, and equal to
    nanoseek's (both split as DeepSeek-V3's tokenizer: `_bar`, `.attr`, CJK runs)."""
    path = write_gguf(tiny(tok), tmp_path / "m.gguf", tok, "f32")
    rebuilt = read_gguf_tokenizer(path, embedded=False)
    assert rebuilt.special_ids == tok.special_ids
    for s in TRICKY:
        assert rebuilt.decode(rebuilt.encode(s)) == s
        assert rebuilt.encode(s) == tok.encode(s), s
    assert tok.backend.pre_tokenizer.pre_tokenize_str("self._loop.attr 日本語x")[:4] == [
        ("self", (0, 4)), ("._", (4, 6)), ("loop", (6, 10)), (".attr", (10, 15))]


def test_bad_files_fail_with_one_clear_line(tok, tmp_path, monkeypatch):
    good = write_gguf(tiny(tok), tmp_path / "good.gguf", tok, "q8_0")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        nanoseek.load(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(GGUFError, match="general.architecture is 'llama', expected 'deepseek2'"):
        read_gguf(tmp_path / "llama.gguf")

    with monkeypatch.context() as m:  # a file without a key llama.cpp needs
        m.setattr(gguf.GGUFWriter, "add_expert_count", lambda self, n: None)
        write_gguf(tiny(tok), tmp_path / "nokey.gguf", tok, "f32")
    with pytest.raises(GGUFError, match="missing key deepseek2.expert_count"):
        read_gguf(tmp_path / "nokey.gguf")
    with monkeypatch.context() as m:  # sizes that disagree with the tensors
        m.setattr(gguf.GGUFWriter, "add_expert_feed_forward_length",
                  lambda self, n: self.add_uint32("deepseek2.expert_feed_forward_length", n // 2))
        write_gguf(tiny(tok), tmp_path / "shape.gguf", tok, "f32")
    with pytest.raises(GGUFError, match=r"tensor blk.1.ffn_gate_exps.weight has shape \[8, 32, 64\], expected "
                                        r"\[8, 16, 64\]"):
        read_gguf(tmp_path / "shape.gguf")
    import nanoseek.io.gguf as g

    specs = g.tensor_specs
    with monkeypatch.context() as m:  # a missing tensor
        m.setattr(g, "tensor_specs", lambda model: [s for s in specs(model) if s.name != "blk.2.attn_v_b.weight"])
        write_gguf(tiny(tok), tmp_path / "notensor.gguf", tok, "f32")
    with pytest.raises(GGUFError, match="missing tensor blk.2.attn_v_b.weight"):
        read_gguf(tmp_path / "notensor.gguf")


def test_unexportable_configs_are_refused(tok, tmp_path):
    with pytest.raises(GGUFError, match="attention_bias"):
        write_gguf(tiny(tok, attention_bias=True), tmp_path / "a.gguf", tok)
    with pytest.raises(GGUFError, match="group_limited_greedy"):
        write_gguf(tiny(tok, scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False),
                   tmp_path / "b.gguf", tok)
    with pytest.raises(GGUFError, match="type must be one of"):
        write_gguf(tiny(tok), tmp_path / "c.gguf", tok, "q4_k")
    assert not list(tmp_path.iterdir())  # nothing half-written
    assert yarn_keys(tiny(tok, rope_scaling=None).config) == {}


def test_cli_export_gguf(tok, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model = tiny(tok)
    nanoseek.save(model, ckpt)
    tok.save(ckpt)
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "m.gguf"), "--type", "bf16"]) == 0
    assert "deepseek2 GGUF, bf16" in capsys.readouterr().out
    back = nanoseek.load(tmp_path / "m.gguf")
    ids = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # bf16 weights
    with pytest.raises(SystemExit, match="one of --out DIR"):
        main(["export", str(ckpt)])
