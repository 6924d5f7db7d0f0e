"""Batches of packed token windows from a shard, with exact resume (and an optional loss-mask shard for SFT)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import DataError
from .shards import TokenShard


def _n_windows(shard: TokenShard, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(len(shard) - 1, 0) // seq_len


def _gather(shard: TokenShard, windows: np.ndarray, seq_len: int,
            loss_mask: TokenShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    idx = windows.astype(np.int64)[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    data = torch.from_numpy(np.asarray(shard.tokens[idx], dtype=np.int64))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    if loss_mask is not None:  # SFT: targets whose mask is 0 (prompt, template) are ignored (-100)
        keep = torch.from_numpy(np.asarray(loss_mask.tokens[idx[:, 1:]], dtype=np.int64)) > 0
        y = y.masked_fill(~keep, -100)
    return x, y


def _check_mask(shard: TokenShard, loss_mask: TokenShard | None) -> None:
    if loss_mask is not None and len(loss_mask) != len(shard):
        raise ValueError(f"{loss_mask.path}: {len(loss_mask)} mask entries for {len(shard)} tokens in {shard.path}")


class PackedBatches:
    """Training batches from a shard of packed documents.

    Window k holds tokens [k*seq_len, (k+1)*seq_len + 1): consecutive windows share one boundary token, so every
    token after the first is predicted exactly once per epoch. Each epoch visits all windows in a permutation
    seeded by (seed, epoch); a batch that runs past the end of an epoch continues into the next one."""

    def __init__(self, shard: TokenShard, batch_size: int, seq_len: int, seed: int = 0,
                 loss_mask: TokenShard | None = None) -> None:
        _check_mask(shard, loss_mask)
        self.shard, self.batch_size, self.seq_len, self.seed = shard, batch_size, seq_len, seed
        self.loss_mask = loss_mask
        self.n_windows = _n_windows(shard, seq_len)
        if self.n_windows == 0:
            raise DataError(f"{shard.path}: {len(shard)} training tokens are too few for one window of {seq_len + 1} "
                            f"(seq_len {seq_len} + 1); use a larger corpus or a shorter seq_len")
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def next_batch(self, batch_size: int | None = None, part: tuple[int, int] = (0, 1),
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, S], labels [B, S]) as int64; labels are the inputs shifted left by one token.
        `batch_size` overrides self.batch_size for this call (batch-size ramps). `part=(rank, world)`: the batch
        is split into `world` equal consecutive slices and only slice `rank` is read (data parallelism: every rank
        advances through the same stream, so the ranks' slices together are the single-process batch)."""
        bs = self.batch_size if batch_size is None else batch_size
        rank, world = part
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        if bs % world or not 0 <= rank < world:
            raise ValueError(f"a batch of {bs} sequences does not split into {world} equal parts")
        picked = []
        need = bs
        while need:
            take = self._perm[self.pos:self.pos + need]
            picked.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n_windows:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
        mine = np.concatenate(picked)[rank * bs // world:(rank + 1) * bs // world]
        return _gather(self.shard, mine, self.seq_len, self.loss_mask)

    def state_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) position in the data stream."""
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "tokens": len(self.shard),
                "tokenizer_hash": self.shard.header.tokenizer_hash}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue exactly where the `state_dict` was taken (same shard and seq_len required; the batch size is
        not part of the state, since batches are consecutive slices of one window stream)."""
        if d["seq_len"] != self.seq_len or d["n_windows"] != self.n_windows or d.get("tokens", len(self.shard)) != len(
                self.shard):
            raise ValueError(
                f"data state is for {d.get('tokens')} tokens in {d['n_windows']} windows of seq_len {d['seq_len']}, "
                f"but this loader has {len(self.shard)} tokens in {self.n_windows} windows of seq_len {self.seq_len}"
            )
        self.seed, self.epoch, self.pos = int(d["seed"]), int(d["epoch"]), int(d["pos"])
        self._perm = self._permutation(self.epoch)


def heldout_batches(shard: TokenShard, batch_size: int, seq_len: int, max_batches: int,
                    loss_mask: TokenShard | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: up to max_batches * batch_size windows spread evenly over the shard, in order.
    The last batch may be smaller; ValueError if the shard cannot fill a single window."""
    _check_mask(shard, loss_mask)
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be >= 1, got {batch_size} and {max_batches}")
    n_windows = _n_windows(shard, seq_len)
    if n_windows == 0:
        raise DataError(f"{shard.path}: {len(shard)} held-out tokens are too few for one evaluation window of "
                        f"{seq_len + 1}; documents are held out by a hash of their names (a fraction heldout_frac of "
                        f"them), so a corpus needs enough documents for some to be held out: add more")
    n = min(n_windows, max_batches * batch_size)
    windows = np.arange(n, dtype=np.int64) * n_windows // n
    return [_gather(shard, windows[i:i + batch_size], seq_len, loss_mask) for i in range(0, n, batch_size)]
