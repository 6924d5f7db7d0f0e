"""FP8 weight-only inference: weights kept as float8_e4m3fn + 128x128 block scales (the FP8 release format) and
dequantised per block in each forward (nanoseek.fp8.weights, load_checkpoint(keep_fp8=True))."""

import copy
import json
import re
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
import nanoseek.io.checkpoint as ckpt
from nanoseek.fp8 import Fp8Linear, convert_to_fp8, dequantize_weight_block
from nanoseek.fp8.weights import Fp8Experts, Fp8WeightLinear, fp8_weight_bytes, quantize_model_weights
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.io import CheckpointError, checkpoint_layout, load_checkpoint, save
from nanoseek.model import Experts, Transformer

FP8 = torch.float8_e4m3fn
E4M3_REL = 2.0**-4  # half of the 3-bit mantissa step: worst relative rounding error of a normal E4M3 value
E4M3_SUB_ABS = 2.0**-10  # half the smallest E4M3 subnormal step (2^-9): absolute error floor, in units of the scale


def _ragged_config(**overrides):
    # hidden 160 = 128 + 32, q_lora 136, dense MLP 200: ragged edge blocks along every weight dimension
    return tiny_config(hidden_size=160, q_lora_rank=136, intermediate_size=200, **overrides)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _stored(path, key: str) -> torch.Tensor:
    fname = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(path / fname, "pt") as f:
        return f.get_tensor(key)


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model = Transformer(_ragged_config()).eval()
    for g in model.moe_gates():
        g.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def ckpt_dir(original, tmp_path_factory):
    """The model saved in FP8 as the release (sharded, so weights and scales spread over several files)."""
    path = tmp_path_factory.mktemp("fp8ckpt")
    save(original, path, fp8=True, max_shard_bytes=200_000)
    return path


@pytest.fixture(scope="module")
def dequantised(ckpt_dir):
    return load_checkpoint(ckpt_dir)


@pytest.fixture(scope="module")
def kept(ckpt_dir):
    return load_checkpoint(ckpt_dir, keep_fp8=True)


def _ids(cfg, S=21):
    return torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))


def _out(model, x):
    with torch.no_grad():
        return model(x, labels=x.roll(-1, dims=1))  # with labels the MTP module runs too


# ---------------------------------------------------------------------------------- (1) same as dequantise-at-load
def test_keep_fp8_logits_equal_dequantise_at_load(dequantised, kept):
    x = _ids(kept.config)
    ref, out = _out(dequantised, x), _out(kept, x)
    # both multiply the same codes by the same block scales in fp32: only GEMM summation order may differ
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    assert len(out.mtp_logits) == 1 and (out.mtp_logits[0] - ref.mtp_logits[0]).abs().max().item() <= 1e-5


def test_keep_fp8_load_makes_no_high_precision_copy(ckpt_dir, kept, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the loader (de)quantised a weight that should stay FP8")

    monkeypatch.setattr(ckpt, "dequantize_weight_block", boom)
    monkeypatch.setattr(ckpt, "quantize_weight_block", boom)
    again = load_checkpoint(ckpt_dir, keep_fp8=True)
    ref = kept.state_dict()
    assert all(torch.equal(_bits(t), _bits(ref[k])) for k, t in again.state_dict().items())
    # codes and scales bit for bit as in the file: a dense layer and expert 5's up_proj (rows [I, 2I) of gate_up)
    down = again.model.layers[0].mlp.down_proj
    assert torch.equal(_bits(down.weight), _bits(_stored(ckpt_dir, "model.layers.0.mlp.down_proj.weight")))
    assert torch.equal(down.weight_scale_inv, _stored(ckpt_dir, "model.layers.0.mlp.down_proj.weight_scale_inv"))
    experts, inter = again.model.layers[2].mlp.experts, again.config.moe_intermediate_size
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert torch.equal(_bits(experts.gate_up_proj[5, inter:]), _bits(_stored(ckpt_dir, key)))
    assert torch.equal(experts.gate_up_proj_scale_inv[5, 1:], _stored(ckpt_dir, key + "_scale_inv"))


# ---------------------------------------------------------------------------------- (2) float8 in memory, 1/4 size
def test_fp8_modules_hold_float8_weights_at_a_quarter_of_fp32(dequantised, kept):
    # exactly the tensors the release (and save(fp8=True)) stores in FP8 are FP8 here; the rest is untouched
    held = _tensors(kept)
    for key, slot in checkpoint_layout(dequantised).items():
        want = FP8 if slot.quantizable else torch.float32
        assert held[slot.name].dtype == want, key
    assert kept.lm_head.weight.dtype == kept.model.embed_tokens.weight.dtype == torch.float32
    assert kept.mtp[0].eh_proj.weight.dtype == torch.float32 and type(kept.mtp[0].eh_proj) is torch.nn.Linear
    n_lin = sum(isinstance(m, Fp8WeightLinear) for m in kept.modules())
    n_exp = sum(isinstance(m, Fp8Experts) for m in kept.modules())
    # 4 blocks (3 + MTP) x 5 attention projections, 1 dense MLP x 3, 3 MoE layers x 3 shared-expert projections
    assert (n_lin, n_exp) == (4 * 5 + 3 + 3 * 3, 3)
    assert not any(type(m) is Experts for m in kept.modules())
    for m in kept.modules():
        if isinstance(m, Fp8WeightLinear):
            assert m.weight.dtype == FP8 and m.weight_scale_inv.dtype == torch.float32
            assert m.weight_scale_inv.shape == (-(-m.out_features // 128), -(-m.in_features // 128))
        if isinstance(m, Fp8Experts):
            assert m.gate_up_proj.dtype == m.down_proj.dtype == FP8

    # memory of those layers: FP8 codes (1 byte) + fp32 block scales vs the same weights in fp32 (4 bytes)
    fp8_bytes, fp32_equiv = fp8_weight_bytes(kept)
    deq = _tensors(dequantised)
    fp32_bytes = sum(deq[n].numel() * deq[n].element_size()
                     for n in {s.name for s in checkpoint_layout(dequantised).values() if s.quantizable})
    assert fp32_equiv == fp32_bytes
    assert 0.25 <= fp8_bytes / fp32_bytes <= 0.26  # 1/4 plus 4 bytes per 128x128 block (more for ragged blocks)
    total = {name: sum(t.numel() * t.element_size() for t in _tensors(m).values())
             for name, m in (("kept", kept), ("dequantised", dequantised))}
    assert total["dequantised"] - total["kept"] == fp32_bytes - fp8_bytes


def test_dtype_casts_leave_codes_and_scales_alone(ckpt_dir, kept):
    bf = copy.deepcopy(kept).to(torch.bfloat16)
    for (name, t), ref in zip(_tensors(bf).items(), _tensors(kept).values(), strict=True):
        if ref.dtype == FP8 or name.endswith("_scale_inv"):
            assert t.dtype == ref.dtype and torch.equal(_bits(t), _bits(ref)), name
    assert bf.lm_head.weight.dtype == torch.bfloat16
    # bf16 activations: the same weights as the dequantise-at-load bf16 model (both round q * s once to bf16)
    x = _ids(kept.config)
    ref = load_checkpoint(ckpt_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bf(x).logits, ref(x).logits)


# ---------------------------------------------------------------------------------- (3) quantising a loaded model
@pytest.mark.parametrize("out_f, in_f", [(200, 160), (256, 384)])  # ragged edge blocks / whole blocks only
def test_fp8_linear_error_bounded(out_f, in_f):
    # |W - q s| <= max(2^-4 |W|, 2^-10 s) elementwise, so |y - y_q| <= sum_k |x_k| max(2^-4 |W_jk|, 2^-10 s_jk)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    torch.nn.init.normal_(lin.weight, std=0.02)
    lin.weight.data[:, 130:] *= 1e-3  # blocks 1000x smaller than the first column of blocks: their own scales
    f = Fp8WeightLinear.from_linear(lin)
    assert torch.equal(f.dequantize(), dequantize_weight_block(f.weight, f.weight_scale_inv))
    x = torch.randn(33, in_f)
    scales = dequantize_weight_block(torch.ones(out_f, in_f, dtype=FP8), f.weight_scale_inv)  # s per element
    with torch.no_grad():
        err = (f(x) - lin(x)).abs()
        bound = x.abs() @ (E4M3_REL * lin.weight.abs() + E4M3_SUB_ABS * scales).T + 1e-6
    assert torch.all(err <= bound)
    assert f.bias.dtype == torch.float32 and torch.equal(f.bias, lin.bias)


@pytest.mark.parametrize("hidden, inter", [(160, 160), (256, 128)])  # ragged edge blocks / whole blocks only
def test_fp8_experts_error_bounded(hidden, inter):
    cfg = tiny_config(hidden_size=hidden, moe_intermediate_size=inter)
    experts = Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    fe = Fp8Experts.from_experts(experts)
    unit = copy.deepcopy(fe)  # codes all 1: its dequantised weights are the per-element scales
    unit.gate_up_proj.copy_(torch.ones(unit.gate_up_proj.shape))
    unit.down_proj.copy_(torch.ones(unit.down_proj.shape))
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 7, 2])
    xs = torch.randn(int(counts.sum()), cfg.hidden_size)
    with torch.no_grad():
        y, yq = experts(xs, counts), fe(xs, counts)
        for e in range(cfg.n_routed_experts):
            idx = torch.tensor([e])
            for wq, w, s in zip(fe.expert_weights(idx), (experts.gate_up_proj[idx], experts.down_proj[idx]),
                                unit.expert_weights(idx), strict=True):
                assert ((wq - w).abs() <= E4M3_REL * w.abs() + E4M3_SUB_ABS * s).all()
    # the SwiGLU composes two such GEMMs: relative error ~ 2 x 2^-4 / sqrt(3) at most, RMS over the outputs
    assert ((yq - y).norm() / y.norm()).item() <= 2 * E4M3_REL


def test_quantize_model_weights_is_the_fp8_checkpoint(original, dequantised, kept):
    q = quantize_model_weights(copy.deepcopy(original))
    assert all(torch.equal(_bits(t), _bits(kept.state_dict()[k])) for k, t in q.state_dict().items())
    assert isinstance(q.model.layers[0].self_attn.kv_b_proj, Fp8WeightLinear)
    # a model converted for FP8 training (Fp8Linear, Fp8GroupedExperts) quantises the same way
    trained = quantize_model_weights(convert_to_fp8(copy.deepcopy(original)))
    assert not any(isinstance(m, Fp8Linear) for m in trained.modules())
    assert all(torch.equal(_bits(t), _bits(kept.state_dict()[k])) for k, t in trained.state_dict().items())
    x = _ids(q.config)
    assert (_out(q, x).logits - _out(dequantised, x).logits).abs().max().item() <= 1e-5


def test_quantize_model_weights_logits_close_to_original():
    # A weight's E4M3 rounding error is at most 2^-4 of it and, uniform in that interval, 2^-4 / sqrt(3) ~ 3.6% RMS;
    # with independent errors a GEMM's output is off by about as much (measured: 2.6%). Errors of the <= 3 GEMMs in
    # series of a sublayer add in quadrature (<= 6.3%) and the residual stream does not compound them; allowing 2x
    # for softmax / SiLU / routing gives 2 * 2^-4 = 12.5%. Measured here: 4.7%. (With tiny_config's
    # initializer_range 0.1 a random model amplifies any perturbation, ~26%; V3 itself initialises at 0.006.)
    torch.manual_seed(0)
    model = Transformer(_ragged_config(initializer_range=0.02)).eval()
    x = _ids(model.config)
    ref = _out(model, x).logits
    quantize_model_weights(model)
    assert sum(isinstance(m, (Fp8WeightLinear, Fp8Experts)) for m in model.modules()) == 35
    out = _out(model, x).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel <= 2 * E4M3_REL  # quantisation really happened, and stayed within the bound


def test_load_keep_fp8_from_presets_and_high_precision_checkpoints(original, kept, tmp_path):
    m = nanoseek.load(tiny_config(), keep_fp8=True)
    assert isinstance(m.model.layers[1].mlp.experts, Fp8Experts) and m.model.layers[0].mlp.up_proj.weight.dtype == FP8
    # a bf16/fp32 checkpoint with keep_fp8: each quantisable tensor is block-quantised as it streams in
    save(original, tmp_path)
    hp = nanoseek.load(tmp_path, keep_fp8=True)
    assert all(torch.equal(_bits(t), _bits(kept.state_dict()[k])) for k, t in hp.state_dict().items())


def test_save_a_kept_fp8_model(ckpt_dir, dequantised, kept, tmp_path):
    # fp8=True writes the codes and scales unchanged; fp8=False writes the dequantised weights
    save(kept, tmp_path / "fp8", fp8=True)
    a = {k: v for f in ckpt_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    b = load_file(tmp_path / "fp8" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    save(kept, tmp_path / "hp")
    back = load_checkpoint(tmp_path / "hp")
    assert all(torch.equal(t, dequantised.state_dict()[k]) for k, t in back.state_dict().items())


# ---------------------------------------------------------------------------------- (4) bad scales
@pytest.mark.parametrize("keep_fp8", [False, True])
@pytest.mark.parametrize("key, want", [("model.layers.0.self_attn.q_b_proj.weight", "[1, 2]"),
                                       ("model.layers.2.mlp.experts.3.down_proj.weight", "[2, 1]")])
def test_wrong_scale_shape_is_a_checkpoint_error(ckpt_dir, tmp_path, keep_fp8, key, want):
    path = shutil.copytree(ckpt_dir, tmp_path / "bad")
    fname = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key + "_scale_inv"]
    tensors = load_file(path / fname)
    tensors[key + "_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, path / fname, metadata={"format": "pt"})
    msg = f"{fname}: key {key}_scale_inv has shape [3, 3], expected {want}"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        nanoseek.load(path, keep_fp8=keep_fp8)


def test_missing_scale_is_a_checkpoint_error(ckpt_dir, tmp_path):
    path = shutil.copytree(ckpt_dir, tmp_path / "bad")
    key = "model.layers.1.self_attn.o_proj.weight"
    fname = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(path / fname)
    del tensors[key + "_scale_inv"]
    save_file(tensors, path / fname, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{fname}: FP8 key model\.layers\.1\.self_attn\.o_proj\.weight has no"):
        load_checkpoint(path, keep_fp8=True)


# ---------------------------------------------------------------------------------- (5) the inference engine
@pytest.mark.parametrize("cache", ["latent", "naive"])  # latent: absorbed attention reads W_UKV from FP8 kv_b_proj
def test_engine_greedy_tokens_equal(dequantised, kept, cache):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34, 55]]
    ref = [r.output_ids for r in Engine(dequantised, max_batch=2, max_len=64, cache=cache).generate(prompts, params)]
    out = [r.output_ids for r in Engine(kept, max_batch=2, max_len=64, cache=cache).generate(prompts, params)]
    assert out == ref and all(len(o) == 5 for o in out)


def test_engine_speculative_with_fp8_mtp(dequantised, kept):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    ref = Engine(dequantised, max_batch=1, max_len=64, speculative=True).generate([[1, 2, 3]], params)[0]
    out = Engine(kept, max_batch=1, max_len=64, speculative=True).generate([[1, 2, 3]], params)[0]
    assert out.output_ids == ref.output_ids and out.drafted == ref.drafted and out.accepted == ref.accepted
