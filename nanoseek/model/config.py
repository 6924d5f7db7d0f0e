"""Model hyper-parameters: one dataclass that reads and writes the Hugging Face DeepseekV3 `config.json`.

Field names are the Hugging Face ones, so a released `config.json` maps onto this class field by field.
Both rope layouts are accepted: legacy `rope_theta` + `rope_scaling` and transformers-5 `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, parse_field

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# Keys a Hugging Face config.json may carry that do not change the architecture we build.
_HF_PASSTHROUGH = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "attention_dropout", "pretraining_tp", "output_router_logits", "ep_size",
    "moe_layer_freq", "pad_token_id", "head_dim", "qk_head_dim", "quantization_config",
    "id2label", "label2id", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "tokenizer_class", "task_specific_params", "_name_or_path",
    "num_mtp_layers", "router_aux_loss_coef",
}


# The official DeepSeek-V3 repository's inference/configs/config_{16B,236B,671B}.json use the names of the
# ModelArgs dataclass of its inference/model.py; a key a file leaves out takes that dataclass's default (V2-Lite's
# sizes). max_batch_size / max_seq_len size the KV cache of its generate.py; dtype / scale_fmt its weight format.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "scale_fmt": None,
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6,
    "n_expert_groups": 1, "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0,
    "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0,
}


@dataclass
class ModelConfig:
    """DeepSeek-V3 hyper-parameters (HF names). Sizes as in the V3 report, §2.1 and §4.2."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        }
    )
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope_interleave: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # training-time coefficients (not read by transformers, kept in config.json for our own runs)
    mtp_loss_weight: float = 0.3  # lambda in L = L_main + lambda/D * sum_k L_MTP^k
    aux_loss_alpha: float = 1e-4  # alpha of the complementary sequence-wise balance loss
    seq_aux: bool = True

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 when YaRN is on (V3 §4.3; YaRN paper, §3.4)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        ints = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
            "topk_group", "max_position_embeddings",
        ]
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
            if v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        for name in ["first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"]:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.q_lora_rank is not None and (
            isinstance(self.q_lora_rank, bool) or not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0
        ):
            raise ConfigError(f"q_lora_rank must be a non-negative integer or null, got {self.q_lora_rank!r}")
        for name in ["routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range",
                     "mtp_loss_weight", "aux_loss_alpha"]:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
            if v < 0 or (v == 0 and name in ("rope_theta", "rms_norm_eps")):
                raise ConfigError(f"{name} must be positive, got {v}")
        for name in ["norm_topk_prob", "tie_word_embeddings", "attention_bias", "rope_interleave", "seq_aux"]:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings must be false, got True: tied input/output embeddings are not "
                              "implemented (DeepSeek checkpoints keep a separate output head)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if not self.rope_interleave:
            raise ConfigError("rope_interleave=false is not supported: DeepSeek checkpoints use interleaved pairs")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) > num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.n_routed_experts % self.n_group != 0:
            raise ConfigError(
                f"n_routed_experts % n_group != 0 ({self.n_routed_experts} % {self.n_group}): groups must be equal"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group > n_group ({self.topk_group} > {self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok > n_routed_experts ({self.num_experts_per_tok} > {self.n_routed_experts})"
            )
        experts_per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) > topk_group * experts per group "
                f"({self.topk_group} * {experts_per_group}): not enough experts left after group masking"
            )
        if self.topk_method == "noaux_tc" and self.n_group > 1 and experts_per_group < 2:
            raise ConfigError("noaux_tc group scores sum the top-2 experts of a group: need >= 2 experts per group")
        if self.scoring_func == "softmax" and self.topk_method == "noaux_tc":
            raise ConfigError("topk_method 'noaux_tc' (bias-corrected selection) needs scoring_func 'sigmoid'")
        rs = self.rope_scaling
        if rs is not None:
            if rs["type"] != "yarn":
                raise ConfigError(f"rope_scaling.type must be 'yarn' (or no scaling), got {rs['type']!r}")
            for k in ("factor", "original_max_position_embeddings"):
                if k not in rs or not isinstance(rs[k], (int, float)) or isinstance(rs[k], bool) or rs[k] <= 0:
                    raise ConfigError(f"rope_scaling.{k} must be a positive number, got {rs.get(k)!r}")

    # ---- JSON / Hugging Face ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers' DeepseekV3Config (and llama.cpp's converter) read."""
        d = self.to_dict()
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.qk_rope_head_dim,
            attention_dropout=0.0,
            use_cache=True,
            ep_size=1,
            moe_layer_freq=1,
        )
        # legacy layout (llama.cpp, vLLM, older transformers) and transformers-5 layout, kept equal
        if self.rope_scaling is None:
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            legacy = dict(self.rope_scaling)
            d["rope_scaling"] = legacy
            params = {k: v for k, v in legacy.items() if k != "type"}
            d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": self.rope_theta, **params}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> ModelConfig:
        """Build from our JSON or a Hugging Face config.json.

        Unknown keys raise a ConfigError when `strict`, else they are reported in one warning.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = _from_official(d) if _OFFICIAL_ONLY & d.keys() else dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        params = d.pop("rope_parameters", None)
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError(f"rope_parameters must be an object, got {params!r}")
            params = dict(params)
            rope_type = params.pop("rope_type", params.pop("type", "default"))
            if "rope_theta" in params:
                d["rope_theta"] = params.pop("rope_theta")
            if rope_type in ("default", None):
                d.setdefault("rope_scaling", None)
            else:
                d["rope_scaling"] = {"type": rope_type, **params}
        elif "rope_scaling" not in d:
            d["rope_scaling"] = None
        if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
            raise ConfigError(
                f"num_key_value_heads ({d['num_key_value_heads']}) must equal num_attention_heads "
                f"({d.get('num_attention_heads')}) for MLA"
            )
        d.pop("num_key_value_heads", None)
        unknown = sorted(k for k in d if k not in names and k not in _HF_PASSTHROUGH)
        if unknown and strict:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if unknown:
            warnings.warn(f"ignoring unknown config field(s): {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("n_group") is None and "n_group" in kwargs:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None and "topk_group" in kwargs:
            kwargs["topk_group"] = 1
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the Hugging Face config.json."""
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], strict: bool = False) -> ModelConfig:
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d, strict=strict)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def parse_field(name: str, text: str) -> Any:
        """The text of a `--set` value for field `name`, typed by its annotation (nanoseek.config)."""
        return parse_field(ModelConfig, name, text)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """m = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


_OFFICIAL_ONLY = OFFICIAL_DEFAULTS.keys() - {f.name for f in dataclasses.fields(ModelConfig)} - {"dtype"}


def _from_official(d: dict[str, Any]) -> dict[str, Any]:
    """An official inference/configs/config_*.json (ModelArgs names, see OFFICIAL_DEFAULTS) as Hugging Face fields,
    following how DeepSeek-V3's inference/model.py builds the model from it."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    hf_only = sorted(k for k in d if k not in OFFICIAL_DEFAULTS and (k in names or k in _HF_PASSTHROUGH))
    if hf_only:
        official = sorted(_OFFICIAL_ONLY & d.keys())
        raise ConfigError(f"config mixes DeepSeek inference keys ({', '.join(official)}) with Hugging Face keys "
                          f"({', '.join(hf_only)}): use one layout")
    unknown = sorted(d.keys() - OFFICIAL_DEFAULTS.keys())  # inference/generate.py's ModelArgs(**json) rejects them
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in a DeepSeek inference config (ModelArgs of "
                          f"inference/model.py); known: {', '.join(OFFICIAL_DEFAULTS)}")
    a = {**OFFICIAL_DEFAULTS, **d}
    if a["dtype"] not in ("bf16", "fp8"):
        raise ConfigError(f"dtype must be bf16 or fp8, got {a['dtype']!r}")
    if a["score_func"] not in SCORING_FUNCS:
        raise ConfigError(f"score_func must be one of {', '.join(SCORING_FUNCS)}, got {a['score_func']!r}")
    # Gate: the score-correction bias of auxiliary-loss-free balancing (V3 §2.1.2) exists only at dim 7168 (V3);
    # with it, a group scores the sum of its top-2 experts (noaux_tc), without it its best expert (V2's
    # device-limited routing, V2 §2.2.2). Only sigmoid gates renormalise the selected weights (V3 §2.1.2).
    if a["dim"] == 7168:
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if a["n_expert_groups"] > 1 else "greedy"
    # YaRN (V3 §4.3) is on when the context exceeds original_seq_len; the context is max_seq_len when the file
    # sets it, else the full extended length original_seq_len * rope_factor (the Hugging Face configs' 163840).
    max_len = d.get("max_seq_len", int(a["original_seq_len"] * a["rope_factor"]))
    yarn = None
    if max_len > a["original_seq_len"]:
        yarn = {"type": "yarn", "factor": float(a["rope_factor"]),
                "original_max_position_embeddings": a["original_seq_len"], "beta_fast": float(a["beta_fast"]),
                "beta_slow": float(a["beta_slow"]), "mscale": float(a["mscale"]), "mscale_all_dim": float(a["mscale"])}
    return {
        "vocab_size": a["vocab_size"], "hidden_size": a["dim"], "intermediate_size": a["inter_dim"],
        "moe_intermediate_size": a["moe_inter_dim"], "num_hidden_layers": a["n_layers"],
        "first_k_dense_replace": a["n_dense_layers"], "num_attention_heads": a["n_heads"],
        "q_lora_rank": a["q_lora_rank"] or None, "kv_lora_rank": a["kv_lora_rank"],
        "qk_nope_head_dim": a["qk_nope_head_dim"], "qk_rope_head_dim": a["qk_rope_head_dim"],
        "v_head_dim": a["v_head_dim"], "n_routed_experts": a["n_routed_experts"],
        "n_shared_experts": a["n_shared_experts"], "num_experts_per_tok": a["n_activated_experts"],
        "n_group": a["n_expert_groups"], "topk_group": a["n_limited_groups"],
        "routed_scaling_factor": a["route_scale"], "scoring_func": a["score_func"], "topk_method": topk_method,
        "norm_topk_prob": a["score_func"] == "sigmoid",
        "num_nextn_predict_layers": 0,  # inference/model.py builds no multi-token-prediction module
        "max_position_embeddings": max_len, "rope_theta": a["rope_theta"], "rope_scaling": yarn,
        "rms_norm_eps": 1e-6,  # RMSNorm's default there
        "bos_token_id": None, "eos_token_id": None,  # not in the file: the tokenizer names them
    }


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {rs!r}")
    rs = dict(rs)
    t = rs.pop("type", None) or rs.pop("rope_type", None)
    rs.pop("rope_type", None)
    rs.pop("rope_theta", None)
    if t is None:
        raise ConfigError("rope_scaling needs a 'type' (e.g. 'yarn')")
    return {"type": t, **rs}


# The small presets initialise wider than V3's 0.006 (tuned for width 7168): std scaled by 1/sqrt(width) from V3,
# 0.006 * sqrt(7168 / hidden). At 0.006, width 128 and the trainer's lr 3e-3, one AdamW step moved each matrix by
# ~8% and `tiny` runs spiked back to the initial loss (BENCHMARKS.md, "Initialisation of the small presets").
PRESETS: dict[str, dict[str, Any]] = {
    # <= 5M parameters: trains on a laptop CPU in seconds
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        num_nextn_predict_layers=1, max_position_embeddings=2048, initializer_range=0.045,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # 50-100M total parameters
    "small": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        num_nextn_predict_layers=1, max_position_embeddings=8192, initializer_range=0.0225,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # DeepSeek-V2-Lite (16B): softmax gate, no query compression, 2 shared experts
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        num_nextn_predict_layers=0, max_position_embeddings=163840, bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # DeepSeek-V3 / R1 (671B)
    "v3": dict(),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`tiny`, `small`, `v2-lite`, `v3`), optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
