"""Preallocated KV cache for MLA, in two forms.

latent (weight-absorbed attention): per token and layer only the normalised latent c_kv [kv_lora_rank] and the
    roped shared key k_pe [qk_rope_head_dim] are stored: 512 + 64 = 576 values at V3 size.
naive: the expanded per-head K [H, qk_nope + qk_rope] and V [H, v_head_dim]: 128 * (192 + 128) = 40,960 at V3.

The cache has `max_batch` slots of `max_len` positions each (+1 scratch position that padding writes to), one
set per main layer and per MTP module. Every forward names the slots it works on and each token's position, so
rows of one batch can have different lengths (batched prompts, continuous batching, speculative acceptance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import ModelConfig


def kv_values_per_token(cfg: ModelConfig, latent: bool) -> int:
    """Cached values per token per layer."""
    if latent:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


class KVCache:
    """latent: kv[layer] [max_batch, max_len + 1, R + dr]; naive: k[layer] [.., H, dn + dr], v[layer] [.., H, dv]."""

    def __init__(
        self, cfg: ModelConfig, max_batch: int, max_len: int, latent: bool = True, n_layers: int | None = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        self.latent = latent
        self.max_batch, self.max_len = max_batch, max_len
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        T = max_len + 1  # the last position is scratch space for padding tokens

        def buf(*shape: int) -> list[torch.Tensor]:
            return [torch.zeros(max_batch, T, *shape, dtype=dtype, device=device) for _ in range(n_layers)]

        H = cfg.num_attention_heads
        self.buffers = (
            (buf(cfg.kv_lora_rank + cfg.qk_rope_head_dim),) if latent
            else (buf(H, cfg.qk_head_dim), buf(H, cfg.v_head_dim))
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self.buffers for t in bufs)

    def batch(self, slots: list[int], positions: torch.Tensor, T: int) -> CacheBatch:
        """The handle one forward takes (`model(ids, positions, cache=...)`)."""
        return CacheBatch(self, slots, positions, T)


@dataclass
class CacheBatch:
    """Where a forward writes: slots [b] (python ints), positions [b, S] (padding -> scratch), and T = the number
    of leading positions that any row may attend to. Implements nanoseek.model.attention.InferenceCache."""

    cache: KVCache
    slots: list[int]
    positions: torch.Tensor
    T: int

    def layer(self, i: int) -> LayerCache:
        return LayerCache([bufs[i] for bufs in self.cache.buffers], self, self.cache.latent)

    def __post_init__(self) -> None:
        s = self.slots
        if s == list(range(s[0], s[0] + len(s))):  # contiguous slots: views, no gather copy
            self.index: slice | torch.Tensor = slice(s[0], s[0] + len(s))
            rows = torch.arange(s[0], s[0] + len(s), device=self.positions.device)
        else:
            self.index = rows = torch.tensor(s, device=self.positions.device)
        self.rows = rows[:, None].expand_as(self.positions)


class LayerCache:
    """One layer's view for one forward; implements nanoseek.model.attention.KVCacheView."""

    def __init__(self, bufs: list[torch.Tensor], batch: CacheBatch, latent: bool) -> None:
        self.bufs, self.batch, self.latent = bufs, batch, latent

    def _update(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        buf.index_put_((self.batch.rows, self.batch.positions), new.to(buf.dtype))
        return buf[self.batch.index, : self.batch.T]

    def update_latent(self, kv: torch.Tensor) -> torch.Tensor:
        return self._update(self.bufs[0], kv)

    def update_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._update(self.bufs[0], k), self._update(self.bufs[1], v)
