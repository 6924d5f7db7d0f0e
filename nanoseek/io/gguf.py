"""GGUF files for llama.cpp: the `deepseek2` architecture, written and read back.

    from nanoseek.io.gguf import write_gguf, read_gguf, read_gguf_tokenizer
    write_gguf(model, "model.gguf", tokenizer, "q8_0")     # f32 | f16 | bf16 | q8_0
    model = read_gguf("model.gguf")                         # or nanoseek.load("model.gguf"); dequantised to fp32
    model = read_gguf("model.gguf", int8=True)              # int8 codes per row, int8 GEMV (nanoseek.fp8.int8)
    tok = read_gguf_tokenizer("model.gguf")

The file holds every tensor under llama.cpp's name (gguf-py's TENSOR_NAMES for DEEPSEEK2), every hyper-parameter its
`deepseek2` loader reads -- including those it would otherwise default wrongly (the sigmoid gate of V3 §2.1.2:
without `expert_gating_func` llama.cpp falls back to softmax) -- the multi-token-prediction modules of V3 §2.2 as
its `nextn` layers, and the tokenizer (byte-level BPE vocabulary, merges, pre-tokenizer name, special tokens, chat
template). Layout choices follow llama.cpp's own convert_hf_to_gguf.py (DeepseekV2Model):

- MLA (V2 §2.1) is stored for its absorbed form: `kv_b_proj` is split per head into `attn_k_b` (W_UK, transposed:
  [H, R, d_nope]) and `attn_v_b` (W_UV: [H, d_v, R]); attention is multi-query over the latent, so `head_count_kv`
  is 1, `key_length` = R + d_rope, `value_length` = R, and the per-head sizes go in `key_length_mla` /
  `value_length_mla`.
- Routed experts are stacked: `ffn_{gate,up,down}_exps` [E, out, in]; the auxiliary-loss-free bias of V3 §2.1.2 is
  `exp_probs_b.bias`.
- YaRN (V3 §4.3): llama.cpp's deepseek2 multiplies the softmax scale by (attn_factor * (1 + 0.1 L ln s))^2, L the
  `yarn_log_multiplier` / 0.1, and the rope cos/sin by attn_factor. `write_gguf` solves for L and attn_factor from
  nanoseek's own softmax scale and rope amplitude, which gives convert_hf_to_gguf's 0.1 * mscale_all_dim whenever
  mscale == mscale_all_dim (every DeepSeek release).
- Quantisation follows the converter too: 1-D tensors, norms and the router stay F32; a Q8_0 tensor whose rows are
  not a multiple of 32 falls back to F16.

The pre-tokenizer: llama.cpp hard-codes one regex list per pre-tokenizer name; nanoseek trains its tokenizers with
DeepSeek-V3's splits (nanoseek.data.tokenizer.DEEPSEEK_V3_SPLITS), so the file names "deepseek-v3" and llama.cpp
tokenises exactly as nanoseek. A tokenizer with other splits (one loaded from elsewhere) would tokenise differently
in llama.cpp; the exact tokenizer.json is embedded too (`tokenizer.huggingface.json`), from which
`read_gguf_tokenizer` restores it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..model.config import ConfigError, ModelConfig
from ..model.model import Transformer
from ..model.rope import rope_inv_freq
from .atomic import atomic_path
from .checkpoint import CheckpointError, build, check_finite

if TYPE_CHECKING:
    import gguf

    from ..data import Tokenizer

ARCH = "deepseek2"
TYPES = ("f32", "f16", "bf16", "q8_0")
PRE_TOKENIZER = "deepseek-v3"
CONFIG_KEY = "nanoseek.config"  # nanoseek's config.json: the fields llama.cpp has no key for (training coefficients)
# config fields no llama.cpp key carries; taken from CONFIG_KEY when a file has it
_NANOSEEK_ONLY = ("initializer_range", "mtp_loss_weight", "aux_loss_alpha", "seq_aux", "topk_method", "n_group",
                  "topk_group")

# nanoseek parameter (under a block `model.layers.L.` or MTP module `mtp.k.`) -> llama.cpp tensor under `blk.N.`
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # an MTP module's own parts (V3 §2.2): M_k, the two input norms and its output norm
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
}
# parameters stored as two llama.cpp tensors (see `_to_gguf`)
_SPLIT_NAMES = {
    "self_attn.kv_b_proj.weight": (("attn_k_b.weight", "k_b"), ("attn_v_b.weight", "v_b")),
    "mlp.experts.gate_up_proj": (("ffn_gate_exps.weight", "gate"), ("ffn_up_exps.weight", "up")),
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
# tensors a llama.cpp file may carry that nanoseek shares with the main model instead
_IGNORED_SUFFIXES = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")


class GGUFError(CheckpointError):
    """A GGUF file that cannot be written or read as a nanoseek model: the message names the file and the field."""


@dataclass(frozen=True)
class Spec:
    """GGUF tensor `name` holds (`part` of) nanoseek parameter `param`."""

    name: str
    param: str
    part: str | None = None


def tensor_specs(model: Transformer) -> list[Spec]:
    """Every GGUF tensor of `model`, in file order (a meta-device model works: only names are read)."""
    L = model.config.num_hidden_layers
    specs: list[Spec] = []
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        if name in _TOP_NAMES:
            specs.append(Spec(_TOP_NAMES[name], name))
            continue
        prefix, _, rest = name.partition(".layers.") if name.startswith("model.layers.") else name.partition(".")
        idx, _, sub = rest.partition(".")
        blk = f"blk.{int(idx) + (L if prefix == 'mtp' else 0)}."
        if sub in _SPLIT_NAMES:
            specs.extend(Spec(blk + gname, name, part) for gname, part in _SPLIT_NAMES[sub])
        elif sub in _BLOCK_NAMES:
            specs.append(Spec(blk + _BLOCK_NAMES[sub], name))
        else:
            raise GGUFError(f"parameter {name} has no llama.cpp deepseek2 tensor")
    return specs


def _to_gguf(t: torch.Tensor, part: str | None, cfg: ModelConfig) -> torch.Tensor:
    """The llama.cpp tensor (torch dim order, i.e. ggml's reversed) for `part` of parameter `t`."""
    if part in ("k_b", "v_b"):  # W_UKV [H*(dn+dv), R] -> W_UK^T [H, R, dn] and W_UV [H, dv, R]
        w = t.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim].transpose(1, 2) if part == "k_b" else w[:, cfg.qk_nope_head_dim :]
    if part in ("gate", "up"):  # gate_up_proj [E, 2I, H]: gate rows first
        inter = cfg.moe_intermediate_size
        return t[:, :inter] if part == "gate" else t[:, inter:]
    return t


def _from_gguf(parts: dict[str | None, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """`_to_gguf` undone: the parameter from its llama.cpp tensor(s)."""
    if "k_b" in parts:
        w = torch.cat((parts["k_b"].transpose(1, 2), parts["v_b"]), dim=1)
        return w.reshape(-1, cfg.kv_lora_rank)
    if "gate" in parts:
        return torch.cat((parts["gate"], parts["up"]), dim=1)
    return parts[None]


# ------------------------------------------------------------------------------------------------ hyper-parameters
def yarn_keys(cfg: ModelConfig) -> dict[str, float]:
    """The rope-scaling values llama.cpp's deepseek2 needs to reproduce nanoseek's YaRN (V3 §4.3): factor, original
    context, betas, and `log_mul` / `attn_factor` (see the module docstring); {} without scaling."""
    rs = cfg.rope_scaling
    if rs is None:
        return {}
    factor = float(rs["factor"])
    if factor < 1:
        raise GGUFError(f"rope_scaling.factor {factor} < 1: llama.cpp's YaRN only extends the context")
    if not rs.get("truncate", True):
        raise GGUFError("rope_scaling.truncate=false: llama.cpp always rounds the YaRN correction range to integers")
    _, a = rope_inv_freq(cfg)  # nanoseek's cos/sin amplitude
    m = math.sqrt(cfg.softmax_scale * math.sqrt(cfg.qk_head_dim))  # its softmax-scale multiplier is m^2
    out = {"factor": factor, "original_context_length": float(rs["original_max_position_embeddings"]),
           "beta_fast": float(rs.get("beta_fast") or 32.0), "beta_slow": float(rs.get("beta_slow") or 1.0)}
    ln = 0.1 * math.log(factor)
    if ln == 0 and abs(m - a) > 1e-6 * a:
        raise GGUFError("rope_scaling.factor 1 with an attention factor: llama.cpp's deepseek2 would square it into "
                        "the softmax scale")
    log_mul = round((m / a - 1) / ln, 6) if ln > 0 else 0.0
    if log_mul != 0:  # llama.cpp: cos/sin x attn_factor, scale x (attn_factor * (1 + log_mul * ln))^2
        out.update(log_mul=log_mul, attn_factor=a)
    else:  # without the key it uses 1 + 0.1 ln(factor) in both places
        out.update(attn_factor=a / (1 + ln))
    return out


def check_exportable(cfg: ModelConfig) -> None:
    """GGUFError unless llama.cpp's deepseek2 computes what nanoseek computes for `cfg`."""
    if cfg.attention_bias:
        raise GGUFError("attention_bias=true: llama.cpp's deepseek2 has no attention biases")
    groups = cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.topk_method != "greedy"
    if groups and cfg.topk_method == "group_limited_greedy":
        raise GGUFError("topk_method 'group_limited_greedy' with n_group > topk_group: llama.cpp scores an expert "
                        "group by the sum of its top-2 experts (V3's noaux_tc), not by its best one (V2)")
    yarn_keys(cfg)


def _file_type(qtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """Every key llama.cpp's deepseek2 loader reads (src/models/deepseek2.cpp, llama-model.cpp), stated explicitly."""
    import gguf

    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)  # MTP modules, appended as the last blocks (V3 §2.2)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA is multi-query attention over the latent
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if cfg.topk_method != "greedy" and 1 < cfg.n_group and cfg.topk_group < cfg.n_group:  # group-limited routing
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    # nanoseek's Gate normalises the chosen weights when norm_topk_prob, except a softmax gate's top-1 (its guard)
    w.add_expert_weights_norm(cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.scoring_func == "sigmoid"))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    yarn = yarn_keys(cfg)
    if not yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(yarn["factor"])
    w.add_rope_scaling_orig_ctx_len(int(yarn["original_context_length"]))
    w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
    if "log_mul" in yarn:
        w.add_rope_scaling_yarn_log_mul(0.1 * yarn["log_mul"])  # the converter's legacy 0.1 factor, undone on load
    if abs(yarn["attn_factor"] - 1) > 1e-7:
        w.add_rope_scaling_attn_factors(yarn["attn_factor"])


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's "gpt2" tokenizer model: tokens by id (padding ids beyond the tokenizer's
    vocabulary as UNUSED), specials as CONTROL, merges, pre-tokenizer, special ids and the chat template."""
    import gguf

    doc = json.loads(tok.backend.to_str())
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or doc.get("normalizer") is not None:
        raise GGUFError(f"tokenizer: only a byte-level BPE without normalizer can be exported (model "
                        f"{model.get('type')!r}, normalizer {(doc.get('normalizer') or {}).get('type')!r})")
    if tok.vocab_size > vocab_size:
        raise GGUFError(f"tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    hf = tok.hf_config()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id if tok.pad_id is not None else tok.eos_id)
    w.add_add_bos_token(bool(hf["add_bos_token"]))
    w.add_add_eos_token(bool(hf["add_eos_token"]))
    if "chat_template" in hf:
        w.add_chat_template(hf["chat_template"])
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, tok.backend.to_str())


# ------------------------------------------------------------------------------------------------ write
def _tensor_type(name: str, t: torch.Tensor, qtype: str) -> gguf.GGMLQuantizationType:
    """convert_hf_to_gguf's choice: F32 for 1-D tensors, norms and the router; else `qtype`, with F16 for a Q8_0
    tensor whose rows are not whole 32-value blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.dim() <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32
    want = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[want]
    return want if t.shape[-1] % block == 0 else Q.F16


def write_gguf(
    model: Transformer, path: str | os.PathLike[str], tokenizer: Tokenizer, qtype: str = "f32", name: str = "nanoseek",
) -> Path:
    """Write `model` and `tokenizer` as a llama.cpp `deepseek2` GGUF at `path` (atomically); `qtype` is the type of
    the matrices: f32, f16, bf16 or q8_0 (blocks of 32, an fp16 scale amax/127, round to nearest)."""
    import gguf

    if qtype not in TYPES:
        raise GGUFError(f"type must be one of {', '.join(TYPES)}, got {qtype!r}")
    cfg = model.config
    check_exportable(cfg)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    bad = [n for n, t in tensors.items() if not t.dtype.is_floating_point or t.dtype.itemsize == 1]
    if bad:
        raise GGUFError(f"tensor {bad[0]} is {tensors[bad[0]].dtype}: load the model in high precision "
                        f"(without keep_fp8 or int8) to export it")
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name(name)
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(w, cfg)
    _add_tokenizer(w, tokenizer, cfg.vocab_size)
    w.add_string(CONFIG_KEY, json.dumps(cfg.to_dict(), sort_keys=True))
    plan: list[tuple[torch.Tensor, gguf.GGMLQuantizationType]] = []
    for spec in tensor_specs(model):
        t = _to_gguf(tensors[spec.param].detach(), spec.part, cfg)
        q = _tensor_type(spec.name, t, qtype)
        shape = tuple(t.shape)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, q)
        nbytes = math.prod(byte_shape)
        if q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor_info(spec.name, shape, np.dtype(np.float32 if q == gguf.GGMLQuantizationType.F32
                                                         else np.float16), nbytes)
        else:
            w.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=q)
        plan.append((t, q))
    with atomic_path(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, q in plan:  # one tensor in memory at a time
            w.write_tensor_data(gguf.quants.quantize(t.float().cpu().contiguous().numpy(), q))
        w.close()
    return Path(path)


# ------------------------------------------------------------------------------------------------ read
def _reader(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    import gguf

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(f"{p}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


class _Fields:
    """A GGUF's key/value metadata: `get(key)` with the architecture prefix filled in, a clear error when missing."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path
        arch = self.get("general.architecture")
        if arch != ARCH:
            raise GGUFError(f"{path}: general.architecture is {arch!r}, expected {ARCH!r} (DeepSeek-V2/V3)")

    def get(self, key: str, default: Any = ..., f32: bool = False) -> Any:
        key = key.replace("{arch}", ARCH)
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: missing key {key}")
            return default
        value = field.contents()
        # float32 values as the decimal they were written from (1e-6, not 9.99999997e-07)
        return float(str(np.float32(value))) if f32 and isinstance(value, float) else value


def _rope_scaling(f: _Fields) -> dict[str, Any] | None:
    """nanoseek's rope_scaling from llama.cpp's keys: `yarn_keys` inverted."""
    kind = f.get("{arch}.rope.scaling.type", "none")
    factor = f.get("{arch}.rope.scaling.factor", 1.0, f32=True)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if kind != "yarn":
        raise GGUFError(f"{f.path}: rope.scaling.type {kind!r} is not supported (none or yarn)")
    attn_factor = f.get("{arch}.rope.scaling.attn_factor", 1.0, f32=True)
    log_mul = f.get("{arch}.rope.scaling.yarn_log_multiplier", 0.0, f32=True) / 0.1
    ln = 0.1 * math.log(factor) if factor > 1 else 0.0
    if log_mul:
        a, m = attn_factor, attn_factor * (1 + log_mul * ln)
    else:
        a = m = attn_factor * (1 + ln)
    rs: dict[str, Any] = {
        "type": "yarn", "factor": factor,
        "original_max_position_embeddings": f.get("{arch}.rope.scaling.original_context_length"),
        "beta_fast": f.get("{arch}.rope.scaling.yarn_beta_fast", 32.0, f32=True),
        "beta_slow": f.get("{arch}.rope.scaling.yarn_beta_slow", 1.0, f32=True),
    }
    # nanoseek: cos/sin x mscale(s, mscale) / mscale(s, mscale_all_dim), scale x mscale(s, mscale_all_dim)^2
    m_all = round((m - 1) / ln, 6) if ln else 1.0
    m_one = round((a * m - 1) / ln, 6) if ln else 1.0
    if m_all:
        rs.update(mscale=m_one, mscale_all_dim=m_all)
    else:
        rs.update(attention_factor=a)
    return rs


def read_gguf_config(path: str | os.PathLike[str], reader: gguf.GGUFReader | None = None) -> ModelConfig:
    """The ModelConfig of a deepseek2 GGUF, from the keys llama.cpp reads (a nanoseek file adds its training
    coefficients under `nanoseek.config`)."""
    p = Path(path)
    f = _Fields(reader or _reader(p), p)
    names = {t.name for t in f.reader.tensors}
    n_mtp = f.get("{arch}.nextn_predict_layers", 0)
    n_layers = f.get("{arch}.block_count") - n_mtp
    rope_dim = f.get("{arch}.rope.dimension_count")
    if f.get("{arch}.attention.key_length_mla", None) is None:
        raise GGUFError(f"{p}: missing key {ARCH}.attention.key_length_mla (a GGUF from before llama.cpp split "
                        f"attn_kv_b into attn_k_b / attn_v_b: convert the model again)")
    gating = {1: "softmax", 2: "sigmoid"}.get(f.get("{arch}.expert_gating_func", 1))
    if gating is None:
        raise GGUFError(f"{p}: {ARCH}.expert_gating_func {f.get('{arch}.expert_gating_func')} is not supported "
                        f"(1 softmax, 2 sigmoid)")
    n_group = f.get("{arch}.expert_group_count", 1) or 1
    biased = any(n.endswith(".exp_probs_b.bias") for n in names)
    tokens = f.reader.get_field("tokenizer.ggml.tokens")
    d: dict[str, Any] = dict(
        vocab_size=f.get("{arch}.vocab_size", len(tokens.data) if tokens is not None else ...),
        hidden_size=f.get("{arch}.embedding_length"), intermediate_size=f.get("{arch}.feed_forward_length"),
        moe_intermediate_size=f.get("{arch}.expert_feed_forward_length"), num_hidden_layers=n_layers,
        first_k_dense_replace=f.get("{arch}.leading_dense_block_count", 0),
        num_attention_heads=f.get("{arch}.attention.head_count"),
        q_lora_rank=f.get("{arch}.attention.q_lora_rank", 0) or None,
        kv_lora_rank=f.get("{arch}.attention.kv_lora_rank"),
        qk_nope_head_dim=f.get("{arch}.attention.key_length_mla") - rope_dim, qk_rope_head_dim=rope_dim,
        v_head_dim=f.get("{arch}.attention.value_length_mla"),
        n_routed_experts=f.get("{arch}.expert_count"), num_experts_per_tok=f.get("{arch}.expert_used_count"),
        n_shared_experts=f.get("{arch}.expert_shared_count"), n_group=n_group,
        topk_group=f.get("{arch}.expert_group_used_count", 1) if n_group > 1 else 1,
        routed_scaling_factor=f.get("{arch}.expert_weights_scale", 1.0, f32=True), scoring_func=gating,
        topk_method="noaux_tc" if biased else ("group_limited_greedy" if n_group > 1 else "greedy"),
        norm_topk_prob=bool(f.get("{arch}.expert_weights_norm", False)), num_nextn_predict_layers=n_mtp,
        max_position_embeddings=f.get("{arch}.context_length"),
        rope_theta=f.get("{arch}.rope.freq_base", 10000.0, f32=True),
        rope_scaling=_rope_scaling(f), rms_norm_eps=f.get("{arch}.attention.layer_norm_rms_epsilon", f32=True),
        bos_token_id=f.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id", None),
    )
    saved = f.get(CONFIG_KEY, None)
    if saved is not None:
        try:
            ours = json.loads(saved)
        except json.JSONDecodeError as e:
            raise GGUFError(f"{p}: {CONFIG_KEY} is not valid JSON ({e})") from None
        d.update({k: ours[k] for k in _NANOSEEK_ONLY if k in ours and not (k == "topk_method" and biased)})
    try:
        return ModelConfig(**d)
    except (ConfigError, TypeError) as e:
        raise GGUFError(f"{p}: {e}") from None


def read_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    int8: bool = False,
) -> Transformer:
    """A Transformer from a deepseek2 GGUF (F32 / F16 / BF16 / Q8_0 tensors, dequantised). Every tensor is checked
    (present, shape, type, finite) before the model is built; MTP modules missing from a file whose
    nextn_predict_layers says otherwise are dropped with a warning, as llama.cpp's converter omits them.

    `int8`: the model of `nanoseek.fp8.int8.quantize_int8`, each matrix quantised per output channel as it is read
    (one tensor at a time in fp32, never the whole model). From a Q8_0 file this re-quantises: Q8_0 has a scale per
    32 weights, int8 one per row, so each weight moves by at most half a step of its row's scale."""
    import gguf

    p = Path(path)
    reader = _reader(p)
    cfg = read_gguf_config(p, reader)
    found = {t.name: t for t in reader.tensors}
    if cfg.num_nextn_predict_layers and f"blk.{cfg.num_hidden_layers}.nextn.eh_proj.weight" not in found:
        warnings.warn(f"{p}: no MTP tensors (blk.{cfg.num_hidden_layers}.nextn.*); loading without MTP", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = build(cfg, dtype, "meta")
    specs = tensor_specs(model)
    Q = gguf.GGMLQuantizationType
    readable = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)
    meta = dict(model.named_parameters())
    meta.update(model.named_buffers())
    problems = []
    for s in specs:
        t = found.get(s.name)
        want = tuple(_to_gguf(meta[s.param], s.part, cfg).shape)
        if t is None:
            problems.append(f"missing tensor {s.name}")
        elif tuple(reversed(t.shape.tolist())) != want:
            problems.append(f"tensor {s.name} has shape {list(reversed(t.shape.tolist()))}, expected {list(want)}")
        elif t.tensor_type not in readable:
            problems.append(f"tensor {s.name} has type {t.tensor_type.name} (readable: F32, F16, BF16, Q8_0)")
    expected = {s.name for s in specs}
    problems += [f"unexpected tensor {n}" for n in found if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise GGUFError(f"{p}: does not match its {ARCH} hyper-parameters:\n  " + "\n  ".join(problems[:20]) + more)
    if int8:
        from ..fp8.int8 import quantize_int8, quantize_rows

        model = quantize_int8(build(cfg, dtype, "meta"))  # structure only: nothing allocated yet
        model.to_empty(device=torch.device(device or "cpu"))
    else:
        model = build(cfg, dtype, device, init=False)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    by_param: dict[str, dict[str | None, torch.Tensor]] = {}
    with torch.no_grad():
        for s in specs:
            t = found[s.name]
            try:
                data = gguf.quants.dequantize(t.data, t.tensor_type)
            except ValueError as e:
                raise GGUFError(f"{p}: tensor {s.name} is unreadable ({e})") from None
            x = torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
            check_finite(s.name, x, p)
            by_param.setdefault(s.param, {})[s.part] = x
            parts = by_param[s.param]
            if s.part is None or len(parts) == 2:
                dst = tensors[s.param]
                if dst.dtype == torch.int8:  # int8: codes here, per-row scales in PARAM_scale
                    q, scale = quantize_rows(_from_gguf(parts, cfg))
                    dst.copy_(q)
                    tensors[s.param + "_scale"].copy_(scale)
                else:
                    dst.copy_(_from_gguf(parts, cfg).to(dst.dtype))
                del by_param[s.param]
    return model.eval()


def _llama_cpp_backend(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Any:
    """A `tokenizers.Tokenizer` that tokenises as llama.cpp does with these fields (gpt2 model, `pre` splits)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..data.tokenizer import DEEPSEEK_V3_SPLITS  # llama.cpp's deepseek-v3 (src/llama-vocab.cpp, DEEPSEEK3_LLM)

    if pre != PRE_TOKENIZER:
        raise GGUFError(f"tokenizer.ggml.pre {pre!r}: only {PRE_TOKENIZER!r} can be rebuilt without an embedded "
                        f"tokenizer.huggingface.json")
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != 5}  # 5: UNUSED padding ids
    backend = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty == 3])  # 3: CONTROL
    return backend


def read_gguf_tokenizer(path: str | os.PathLike[str], embedded: bool = True) -> Tokenizer:
    """The Tokenizer of a GGUF: its embedded tokenizer.json when it has one (and `embedded`), else rebuilt from the
    llama.cpp fields (tokens, types, merges, pre-tokenizer), tokenising as llama.cpp does."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..data import Tokenizer

    p = Path(path)
    f = _Fields(_reader(p), p)
    import gguf

    doc = f.get(gguf.Keys.Tokenizer.HF_JSON, None) if embedded else None
    if doc is not None:
        return Tokenizer(HFTokenizer.from_str(doc))
    if f.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{p}: tokenizer.ggml.model {f.get('tokenizer.ggml.model')!r} is not supported (gpt2)")
    backend = _llama_cpp_backend(f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type"),
                                 f.get("tokenizer.ggml.merges"), f.get("tokenizer.ggml.pre"))
    return Tokenizer(backend)

