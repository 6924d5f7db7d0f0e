"""The DeepSeek-V3 transformer: pre-norm blocks of MLA + (dense MLP | MoE), an untied head, and MTP modules.

Parameter names equal transformers' DeepseekV3ForCausalLM state dict (`model.layers.L.self_attn.q_a_proj.weight`,
`model.layers.L.mlp.experts.gate_up_proj`, ...); MTP module k lives at `mtp.k.*` here and at
`model.layers.{num_hidden_layers + k}.*` in a checkpoint (see nanoseek.io).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA, KVCacheView
from .config import ModelConfig
from .loss import linear_cross_entropy
from .moe import MLP, Experts, Gate, MoE, MoEStats
from .norm import RMSNorm
from .rope import rope_cos_sin


class Block(nn.Module):
    """x = x + attn(attn_norm(x));  x = x + ffn(ffn_norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = (
            MoE(cfg) if layer_idx >= cfg.first_k_dense_replace else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
        absorb: bool = False, cache: KVCacheView | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, absorb, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(h)
            return x + y, stats
        return x + self.mlp(h), None


class SharedHead(nn.Module):
    """MTP output norm; the projection itself is the main model's lm_head (shared)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTP(Block):
    """Multi-token prediction module k: h' = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then a block."""

    def __init__(self, cfg: ModelConfig, k: int) -> None:
        super().__init__(cfg, cfg.num_hidden_layers + k)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(  # type: ignore[override]
        self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None = None, absorb: bool = False, cache: KVCacheView | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))
        return super().forward(h, cos, sin, mask, absorb, cache)


class Decoder(nn.Module):
    """Embedding, the main blocks and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    """logits [B,S,V]; with labels: the combined loss and its parts; expert_load [n_moe_layers, B, E]."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, S-k, V], predicts t_{i+k+1}
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # last block's output before the final norm (h^0 for MTP)


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM. `model(input_ids)` -> ModelOutput with `.logits`;
    `model(input_ids, labels=...)` adds main / MTP / balance losses and per-layer expert loads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTP(cfg, k) for k in range(cfg.num_nextn_predict_layers))
        if self.model.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """N(0, std) for every matrix (paper: std 0.006), ones for norms, zeros for biases."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std)

    # ---- forward ------------------------------------------------------------------------------
    def moe_gates(self) -> list[Gate]:
        """The routers in the order of `expert_load` (main layers, then MTP modules)."""
        blocks = list(self.model.layers) + list(self.mtp)
        return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, absorb: bool = False,
        mtp: bool | None = None, return_logits: bool = True, mtp_loss_weight: float | None = None,
    ) -> ModelOutput:
        """input_ids [B,S]; labels [B,S] are the next tokens (labels[:, t] = input_ids[:, t+1]), -100 ignored.

        MTP module k embeds labels[:, i+k-1] (= t_{i+k}) and predicts labels[:, i+k] (= t_{i+k+1}).
        MTP runs when labels are given (or `mtp=True`). With labels and `return_logits=False` the losses are
        computed chunk by chunk without materialising the logits (less memory; `logits` is None).
        `mtp_loss_weight` overrides lambda (config `mtp_loss_weight`) for a training schedule.
        """
        cfg = self.config
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device)
        cos, sin = rope_cos_sin(cfg, positions)
        h = self.model.embed_tokens(input_ids)
        stats: list[MoEStats] = []
        for layer in self.model.layers:
            h, st = layer(h, cos, sin, None, absorb)
            if st is not None:
                stats.append(st)
        fused = labels is not None and not return_logits
        hn = self.model.norm(h)
        logits = None if fused else self.lm_head(hn)
        out = ModelOutput(logits=logits, hidden=h)
        if labels is not None:
            out.main_loss = self._loss(hn, logits, labels, fused)
        run_mtp = (labels is not None) if mtp is None else mtp
        if run_mtp and len(self.mtp):
            if labels is None:
                raise ValueError("MTP needs the next tokens: pass labels")
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                n = S - k
                if n <= 0:
                    break
                nxt = labels[:, k - 1 : k - 1 + n].clamp_min(0)  # ignored (-100) targets embed as token 0
                h_prev, st = module(h_prev[:, :n], self.model.embed_tokens(nxt), cos[:n], sin[:n], None, absorb)
                if st is not None:
                    stats.append(st)
                hn = module.shared_head.norm(h_prev)
                mtp_logits = None if fused else self.lm_head(hn)
                if mtp_logits is not None:
                    out.mtp_logits.append(mtp_logits)
                out.mtp_losses.append(self._loss(hn, mtp_logits, labels[:, k : k + n], fused))
        if stats:
            out.expert_load = torch.stack([s.load for s in stats])
            out.balance_loss = torch.stack([s.balance_loss for s in stats]).sum()
        if labels is not None:
            loss = out.main_loss
            if out.mtp_losses:
                lam = cfg.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
                loss = loss + lam / len(self.mtp) * torch.stack(out.mtp_losses).sum()
            if out.balance_loss is not None:
                loss = loss + out.balance_loss
            out.loss = loss
        return out

    def _loss(self, hn: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor, fused: bool) -> torch.Tensor:
        if fused:
            return linear_cross_entropy(hn, self.lm_head.weight, labels)
        assert logits is not None
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
