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

from .attention import MLA, InferenceCache, KVCacheView
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
class Positions:
    """Where the tokens of one forward sit: positions [S] or [B,S], RoPE cos/sin there, and the attention mask
    [B,1,S,T] over a cache's keys (None: causal over the tokens themselves)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None

    def first(self, n: int) -> Positions:
        """The first n tokens (the MTP chain's shorter sequences during training)."""
        assert self.mask is None, "MTP training runs without a cache"
        return Positions(self.positions[..., :n], self.cos[..., :n, :], self.sin[..., :n, :])


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
    """DeepSeek-V3 causal LM. One forward serves training, prefill, decode, the speculative verify and scoring:

        model(ids).logits                        [B,S,V]
        model(ids, labels=y)                     + main / MTP / balance losses and per-layer expert loads
        model(ids, positions, cache=c)           inference: keys written at `positions`, attention over the cache

    around it `logits(h)` (final norm + head) and `mtp_forward(k, ...)` (one MTP module: the training chain and
    the engine's draft). The forward is three stages, `embed` -> `layers_forward` -> `output`, which `stages()`
    splits for pipeline parallelism."""

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
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: InferenceCache | None = None,
        labels: torch.Tensor | None = None, *, absorb: bool = False, mtp: bool | None = None,
        return_logits: bool = True, mtp_loss_weight: float | None = None,
    ) -> ModelOutput:
        """input_ids [B,S]; positions [S] or [B,S] (default 0..S-1); labels [B,S] are the next tokens
        (labels[:, t] = input_ids[:, t+1]), -100 ignored.

        With a `cache` (one forward's handle on an inference cache, see nanoseek.infer.cache) the tokens' keys
        are written at `positions` and every token attends to the cached keys at positions <= its own: prefill
        chunks, decode steps and the speculative verify are all this call. MTP module k embeds labels[:, i+k-1]
        (= t_{i+k}) and predicts labels[:, i+k] (= t_{i+k+1}); it runs when labels are given (or `mtp=True`).
        `return_logits=False` skips the head (the engine picks the positions it needs and calls `logits`); with
        labels the losses are then computed chunk by chunk without materialising the logits.
        `mtp_loss_weight` overrides lambda (config `mtp_loss_weight`) for a training schedule.
        """
        pos = self.positions(input_ids.shape[1], positions, cache, input_ids.device)
        h = self.embed(input_ids)
        h, stats = self.layers_forward(h, pos, cache, absorb=absorb)
        return self.output(h, pos, labels, stats, inputs=input_ids, absorb=absorb, mtp=mtp, return_logits=return_logits,
                           mtp_loss_weight=mtp_loss_weight)

    # ---- the three stages of the forward (a pipeline splits the model between them, see `stages`) -----------
    def positions(self, S: int, positions: torch.Tensor | None = None, cache: InferenceCache | None = None,
                  device: torch.device | None = None) -> Positions:
        """RoPE cos/sin at each token's position and the attention mask: causal (None) without a cache; with
        one, key t is visible to a token at position p iff t <= p."""
        if positions is None:
            positions = torch.arange(S, device=device)
        cos, sin = rope_cos_sin(self.config, positions)
        mask = None
        if cache is not None:
            p = positions.reshape(-1, S)
            mask = torch.arange(cache.T, device=p.device)[None, None, None, :] <= p[:, None, :, None]
        return Positions(positions, cos, sin, mask)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def layers_forward(
        self, h: torch.Tensor, pos: Positions, cache: InferenceCache | None = None, start: int = 0,
        stop: int | None = None, absorb: bool = False,
    ) -> tuple[torch.Tensor, list[MoEStats]]:
        """Main blocks [start, stop) over hidden states h [B,S,H]; returns h and the MoE layers' statistics."""
        stats: list[MoEStats] = []
        stop = len(self.model.layers) if stop is None else stop
        for i in range(start, stop):
            h, st = self.model.layers[i](h, pos.cos, pos.sin, pos.mask, absorb,
                                         None if cache is None else cache.layer(i))
            if st is not None:
                stats.append(st)
        return h, stats

    def logits(self, h: torch.Tensor, k: int = 0) -> torch.Tensor:
        """The head on hidden states: the final norm (k = 0) or MTP module k's output norm, then lm_head."""
        return self.lm_head(self._out_norm(k)(h))

    def mtp_forward(
        self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | Positions | None = None,
        cache: InferenceCache | None = None, absorb: bool = False,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """MTP module k (1-based, V3 §2.2): h^k_i = Block(M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]).
        h_prev [B,n,H] (module k-1's or the main model's output), next_ids [B,n] the tokens t_{i+k}."""
        pos = positions if isinstance(positions, Positions) else self.positions(
            next_ids.shape[1], positions, cache, next_ids.device)
        layer = None if cache is None else cache.layer(self.config.num_hidden_layers + k - 1)
        return self.mtp[k - 1](h_prev, self.embed(next_ids), pos.cos, pos.sin, pos.mask, absorb, layer)

    def output(
        self, h: torch.Tensor, pos: Positions, labels: torch.Tensor | None = None, stats: list[MoEStats] | None = None,
        *, inputs: torch.Tensor | None = None, absorb: bool = False, mtp: bool | None = None,
        return_logits: bool = True, mtp_loss_weight: float | None = None,
    ) -> ModelOutput:
        """The output stage: final norm and head, the MTP modules (sharing the embedding and the head) and the
        losses; `stats` are the MoE statistics of the blocks before it. MTP module k embeds the true token t_{i+k}:
        inputs[:, i+k] (the input ids), or without them labels[:, i+k-1] -- where a label is masked (-100, e.g. an
        SFT prompt token) that embeds token 0 instead of the token that was there."""
        cfg = self.config
        stats = list(stats or [])
        S = h.shape[1]
        fused = labels is not None and not return_logits
        logits = self.logits(h) if return_logits else None
        out = ModelOutput(logits=logits, hidden=h)
        if labels is not None:
            out.main_loss = self._loss(h, 0, logits, labels)
        run_mtp = (labels is not None) if mtp is None else mtp
        if run_mtp and len(self.mtp):
            if labels is None:
                raise ValueError("MTP needs the next tokens: pass labels")
            h_prev = h
            for k in range(1, len(self.mtp) + 1):
                n = S - k
                if n <= 0:
                    break
                nxt = (inputs[:, k : k + n] if inputs is not None
                       else labels[:, k - 1 : k - 1 + n].clamp_min(0))  # ignored (-100) targets embed as token 0
                h_prev, st = self.mtp_forward(k, h_prev[:, :n], nxt, pos.first(n), absorb=absorb)
                if st is not None:
                    stats.append(st)
                mtp_logits = None if fused else self.logits(h_prev, k)
                if mtp_logits is not None:
                    out.mtp_logits.append(mtp_logits)
                out.mtp_losses.append(self._loss(h_prev, k, mtp_logits, labels[:, k : k + n]))
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

    def stages(self, bounds: list[int]) -> list[Stage]:
        """Pipeline stages sharing this model's modules (no copies): `bounds` = the layer indices where a new
        stage starts, e.g. [2] splits a 4-layer model into layers [0, 2) with the embedding and [2, 4) with the
        output stage. Run in sequence they compute exactly what `forward` computes."""
        L = len(self.model.layers)
        edges = [0, *bounds, L]
        if any(not a < b for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"stage bounds must increase strictly within (0, {L}), got {bounds}")
        return [Stage(self, a, b) for a, b in zip(edges, edges[1:], strict=False)]

    def _out_norm(self, k: int) -> RMSNorm:
        return self.model.norm if k == 0 else self.mtp[k - 1].shared_head.norm

    def _loss(self, h: torch.Tensor, k: int, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if logits is None:  # chunked, without materialising the logits
            return linear_cross_entropy(self._out_norm(k)(h), self.lm_head.weight, labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class Stage(nn.Module):
    """Layers [start, stop) of a Transformer, with the embedding if start == 0 and the output stage if stop is
    the last layer. `forward(x, stats)`: x is token ids on the first stage, hidden states after it; returns
    (h, stats) or, on the last stage, the ModelOutput (pass labels there). Parameters are the model's own.
    The MTP modules on the last stage embed with the first stage's embedding (V3 §2.2 shares it; DualPipeV places
    the first and the last stage on the same rank, V3 §3.2.1)."""

    def __init__(self, model: Transformer, start: int, stop: int) -> None:
        super().__init__()
        self._model = [model]  # a list: the stage must not register the whole model as its submodule
        self.start, self.stop = start, stop
        self.first, self.last = start == 0, stop == len(model.model.layers)
        self.layers = nn.ModuleList(model.model.layers[start:stop])
        if self.first:
            self.embed_tokens = model.model.embed_tokens
        if self.last:
            self.norm, self.lm_head, self.mtp = model.model.norm, model.lm_head, model.mtp

    def forward(
        self, x: torch.Tensor, stats: list[MoEStats] | None = None, labels: torch.Tensor | None = None,
        **output_kwargs: object,
    ) -> tuple[torch.Tensor, list[MoEStats]] | ModelOutput:
        model = self._model[0]
        h = model.embed(x) if self.first else x
        pos = model.positions(h.shape[1], device=h.device)
        h, st = model.layers_forward(h, pos, start=self.start, stop=self.stop)
        stats = list(stats or []) + st
        if self.last:
            return model.output(h, pos, labels, stats, **output_kwargs)  # type: ignore[arg-type]
        return h, stats
