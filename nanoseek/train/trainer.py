"""The pre-training loop: V3 schedules, MTP, auxiliary-loss-free balancing, metrics, exact resume."""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import PackedBatches, TokenShard, heldout_batches
from ..fp8 import convert_to_fp8, emulate_bf16_gemms
from ..io import build, load_checkpoint
from ..model import ModelConfig, Transformer, update_bias
from .checkpoint import load_latest, restore_optimizer, save_training_checkpoint, set_rng_state
from .config import TrainConfig, write_resolved
from .metrics import MetricsLog, max_violation, plot_expert_heatmap, plot_losses, read_metrics
from .optim import build_optimizer
from .schedule import batch_at, bias_speed_at, lr_at, mtp_lambda_at


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    final_heldout_loss: float | None
    interrupted: bool
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains `model_cfg` on the token shards in `data_dir` (made by nanoseek.data.prepare_corpus)."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data_dir: Path, out_dir: Path,
                 resume: bool = False, progress: bool = True) -> None:
        if cfg.aux_loss_alpha is not None:
            model_cfg = model_cfg.replace(aux_loss_alpha=cfg.aux_loss_alpha)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.progress = progress
        self.device = pick_device(cfg.device)
        info = json.loads((self.data_dir / "data.json").read_text())
        self.tok_hash = info["tokenizer_hash"]
        vocab = info.get("vocab_size")
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab_size is {model_cfg.vocab_size}")
        self.train_shard = TokenShard.open(self.data_dir / "train.bin", self.tok_hash)
        self.val_shard = TokenShard.open(self.data_dir / "val.bin", self.tok_hash)
        # SFT data (nanoseek.train.sft) comes with loss masks: only assistant tokens are trained and evaluated
        masks = [self.data_dir / f"{k}_mask.bin" for k in ("train", "val")]
        self.train_mask, self.val_mask = (
            [TokenShard.open(m, self.tok_hash) for m in masks] if masks[0].exists() else [None, None])
        self.loader = PackedBatches(self.train_shard, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed,
                                    loss_mask=self.train_mask)
        self.step = 0
        self.ckpt_root = self.out_dir / "checkpoints"
        resumed = load_latest(self.ckpt_root, device=self.device) if resume else None
        torch.manual_seed(cfg.seed)
        if resumed is not None:
            path, model, opt_tensors, state, rng = resumed
        elif cfg.init_from:  # fine-tuning: the weights of another run, fresh optimizer and data position
            path, model = Path(cfg.init_from), load_checkpoint(cfg.init_from, torch.float32, self.device)
        else:
            path, model = None, build(model_cfg, torch.float32, self.device)
        if path is not None and model.config.to_dict() != model_cfg.to_dict():
            raise ValueError(f"{path}: checkpoint model config differs from the requested one")
        self.model: Transformer = model.train()
        if cfg.fp8:
            convert_to_fp8(self.model, cfg.fp8_pow2_scale, cfg.fp8_backend)  # type: ignore[arg-type]
        elif cfg.emulate_bf16:
            emulate_bf16_gemms(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        if resumed is not None:
            restore_optimizer(self.optimizer, opt_tensors, state["optimizer"])
            self.loader.load_state_dict(state["data"])
            self.step = state["step"]
            set_rng_state(rng, state["rng"])
            if progress:
                print(f"resumed from {path} at step {self.step}")
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
        write_resolved(self.out_dir, model_cfg, cfg, {"data_dir": str(self.data_dir), "data": info})
        eval_len = min(cfg.seq_len, len(self.val_shard) - 1)  # a small held-out split (e.g. SFT) gets shorter windows
        if 0 < eval_len < cfg.seq_len:
            warnings.warn(f"{self.val_shard.path}: {len(self.val_shard)} held-out tokens; evaluating on windows of "
                          f"{eval_len} instead of {cfg.seq_len}", stacklevel=2)
        self.heldout = heldout_batches(self.val_shard, cfg.micro_batch_size, max(eval_len, 1), cfg.eval_batches,
                                       self.val_mask)
        self._stop = False

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean main-model cross-entropy over the fixed held-out batches."""
        self.model.eval()
        total, n = 0.0, 0
        for x, y in self.heldout:
            out = self.model(x.to(self.device), labels=y.to(self.device), mtp=False, return_logits=False)
            total += out.main_loss.item() * y.numel()
            n += y.numel()
        self.model.train()
        return total / max(n, 1)

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        step = self.step
        lr = lr_at(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        lam = mtp_lambda_at(cfg, step)
        n_seq = batch_at(cfg, step)
        depth = len(model.mtp)
        sums = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        loads = []
        done = 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        while done < n_seq:
            mb = min(cfg.micro_batch_size, n_seq - done)
            x, y = self.loader.next_batch(mb)
            x, y = x.to(self.device), y.to(self.device)
            with autocast:
                out = model(x, labels=y, return_logits=False, mtp_loss_weight=lam)
            loss = out.loss  # main + lambda/D * sum_k MTP_k + balance
            mtp = torch.stack(out.mtp_losses).mean() if out.mtp_losses else None
            (loss * (mb / n_seq)).backward()
            w = mb / n_seq
            sums["loss"] += loss.item() * w
            sums["main_loss"] += out.main_loss.item() * w
            sums["mtp_loss"] += (mtp.item() if mtp is not None else 0.0) * w
            sums["balance_loss"] += (out.balance_loss.item() if out.balance_loss is not None else 0.0) * w
            if out.expert_load is not None:
                loads.append(out.expert_load)
            done += mb
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec: dict[str, Any] = {"kind": "train", "step": step + 1, "lr": lr, "grad_norm": grad_norm,
                               "batch": n_seq, "tokens": n_seq * cfg.seq_len, "mtp_lambda": lam, **sums}
        if depth == 0:
            rec["mtp_loss"] = None
        if loads:
            load = torch.cat(loads, dim=1)  # [layers, sequences, E]
            gamma = bias_speed_at(cfg, step)
            for gate, layer_load in zip(model.moe_gates(), load, strict=True):
                update_bias(gate, layer_load, gamma)
            n_main = model.config.n_moe_layers
            main_load = load[:n_main]
            rec["maxvio_batch"], rec["maxvio_seq"] = max_violation(main_load)
            share = main_load.sum(dim=1)
            rec["expert_load"] = (share / share.sum(dim=-1, keepdim=True)).round(decimals=4).tolist()
        else:
            rec["maxvio_batch"] = rec["maxvio_seq"] = 0.0
        self.step += 1
        return rec

    # ---------------------------------------------------------------------------------------- the loop
    def _handle_signal(self, signum: int, frame: Any) -> None:
        self._stop = True

    def save(self) -> Path:
        state = {"data": self.loader.state_dict(), "train_config": self.cfg.to_dict()}
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                        self.cfg.keep_last, extra_files=[self.data_dir / "tokenizer.json"])

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until cfg.steps (or `max_steps` more steps); SIGINT/SIGTERM checkpoint and stop."""
        cfg = self.cfg
        end = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        t0 = time.perf_counter()
        tokens = 0
        last_eval = None
        history = []
        desc = "sft" if self.train_mask is not None else "pretrain"
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, desc=desc, unit="step")
        try:
            while self.step < end and not self._stop:
                ts = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - ts
                tokens += rec["tokens"]
                rec["tokens_per_s"] = rec["tokens"] / dt
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}")
                if self.step % cfg.log_every == 0 or self.step == end:
                    self.metrics.write(rec)
                history.append(rec)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    ev = {"kind": "eval", "step": self.step, "heldout_loss": last_eval}
                    self.metrics.write(ev)
                    history.append(ev)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['main_loss']:.3f}", lr=f"{rec['lr']:.1e}",
                                vio=f"{rec['maxvio_batch']:.2f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self._stop:
                path = self.save()
                bar.write(f"interrupted: checkpoint written to {path}")
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        seconds = time.perf_counter() - t0
        records = read_metrics(self.metrics.path)
        if records:
            plot_losses(records, self.out_dir / "loss.png")
            plot_expert_heatmap(records, self.out_dir / "expert_load.png")
        return TrainResult(self.out_dir, self.step, last_eval, self._stop, tokens, seconds, history)
