"""`nanoseek extend`: long-context extension in DeepSeek-V3's two stages (V3 §4.3), scaled to the run.

V3 pre-trains at 4K, then sets YaRN for the final length once (scale s = 40, alpha 1, beta 32, attention scale
sqrt(t) = 0.1 ln s + 1, on the decoupled RoPE key only) and trains two short stages with it: 1000 steps at 32K
(batch 1920) and 1000 steps at 128K (batch 480), at the pre-training's final learning rate 7.3e-6. Here: the YaRN
factor is final length / the checkpoint's original_max_position_embeddings, each stage keeps the pre-training's
tokens per batch (fewer, longer sequences), the learning rate is the pre-training's final one (constant), and the
balancing bias stays frozen (V3 froze it for the last 500B tokens of pre-training). The extended checkpoint's
config carries the resulting `rope_scaling` and `max_position_embeddings`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..io import load_checkpoint, save
from ..io.checkpoint import build
from ..io.paths import copy_tokenizer_files, resolve_checkpoint
from ..model import ModelConfig, Transformer
from ..train.config import TrainConfig
from ..train.trainer import Trainer


def yarn_for(cfg: ModelConfig, length: int) -> ModelConfig:
    """`cfg` with YaRN set for a context of `length` tokens (V3 §4.3: the same setting in both stages)."""
    rs = dict(cfg.rope_scaling or {})
    original = int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    if length <= original:
        raise ValueError(f"extension length {length} is not beyond the original context {original}")
    rs.update(type="yarn", factor=length / original, original_max_position_embeddings=original)
    for k, v in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 1.0), ("mscale_all_dim", 1.0)):
        rs.setdefault(k, v)
    return cfg.replace(rope_scaling=rs, max_position_embeddings=max(length, cfg.max_position_embeddings))


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
    """The same weights under another (RoPE) configuration: YaRN changes no parameter, only positions."""
    new = build(cfg)
    new.load_state_dict(model.state_dict())
    return new


def extend(checkpoint: str | Path, data_dir: str | Path, out: str | Path, stages: Sequence[int] = (1024, 4096),
           steps: int = 100, pretrain_cfg: TrainConfig | None = None, seed: int = 0, progress: bool = True,
           sets: Sequence[str] = ()) -> dict[str, Any]:
    """Train `steps` steps at each length of `stages` from `checkpoint`; returns the stages' checkpoints."""
    from ..train.config import apply_overrides

    out = Path(out)
    if (out / "yarn_init").exists():
        raise ConfigError(f"{out} holds an earlier extension: use a fresh --out")
    src = resolve_checkpoint(checkpoint)
    base_cfg = pretrain_cfg or _pretrain_config(src)
    model = load_checkpoint(src)
    final = yarn_for(model.config, max(stages))
    init = out / "yarn_init"
    save(with_config(model, final), init)
    copy_tokenizer_files(src, init)
    tokens = base_cfg.batch_size * base_cfg.seq_len
    prev, done = init, []
    for length in stages:
        batch = max(1, tokens // length)
        cfg = TrainConfig.from_dict({
            **base_cfg.to_dict(), "steps": steps, "seq_len": length, "batch_size": batch,
            "micro_batch_size": min(batch, base_cfg.micro_batch_size), "lr": base_cfg.lr * base_cfg.final_lr_ratio,
            "warmup_frac": 0.0, "constant_until": 1.0, "cosine_until": 1.0, "tail_until": 1.0,
            "batch_ramp_frac": 0.0, "bias_update_speed": 0.0, "mtp_lambda": base_cfg.mtp_lambda_late,
            "init_from": str(prev), "seed": seed, "eval_every": max(1, steps // 4), "ckpt_every": steps,
            "eval_batches": 2})
        _, cfg = apply_overrides(final, cfg, list(sets))
        run = out / f"stage_{length}"
        trainer = Trainer(final, cfg, data_dir, run, progress=progress)
        result = trainer.run()
        prev = resolve_checkpoint(run)
        done.append({"length": length, "steps": result.steps_done, "batch_size": batch, "lr": cfg.lr,
                     "heldout_loss": result.final_heldout_loss, "checkpoint": str(prev)})
    summary = {"source": str(src), "rope_scaling": final.rope_scaling,
               "max_position_embeddings": final.max_position_embeddings, "yarn_init": str(init), "stages": done}
    (out / "extend.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pretrain_config(ckpt: Path) -> TrainConfig:
    """The training config of the run a checkpoint came from (its run folder's config.json), else the defaults."""
    for folder in (ckpt, *ckpt.parents[:3]):
        p = folder / "config.json"
        if p.exists() and "train" in (d := json.loads(p.read_text())):
            return TrainConfig.from_dict({**d["train"], "init_from": None})
    return TrainConfig()
