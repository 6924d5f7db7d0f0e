"""Sampling a whole batch on the device, and incremental detokenisation.

One decode step samples every row at once: greedy rows take the argmax; sampled rows draw by inverse CDF from
softmax(logits / T), restricted to the top-k tokens and to the smallest set whose probability reaches top_p. Each
row's single uniform comes from that request's own generator (seeded requests give the same tokens batched or
alone), and the step ends with one host transfer of the chosen ids, not one per request. `token_logprobs` reports
chosen tokens' log-probabilities (and the most likely alternatives) under the raw distribution, log_softmax of the
logits before temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def sample_tokens(
    logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int | None] | None = None,
    top_p: Sequence[float | None] | None = None, generators: Sequence[torch.Generator | None] | None = None,
    uniforms: Sequence[float] | None = None,
) -> torch.Tensor:
    """Token ids [b] (on logits' device) from logits [b, V]; per-row temperature (0 = greedy), top_k / top_p
    (None = off) and generator (None = the global one). uniforms: each row's draw in [0, 1) (`draw_uniform`; read
    for sampled rows only), taken instead of drawing from the generators, so that rows can be sampled again one
    at a time with the same draws."""
    b, V = logits.shape
    greedy = logits.argmax(-1)
    sampled_rows = [r for r in range(b) if temperature[r] > 0]
    if not sampled_rows:
        return greedy
    dev = logits.device
    if uniforms is None:
        gens = generators or [None] * b
        u = torch.stack([torch.rand((), generator=gens[r]) for r in sampled_rows]).to(dev)
    else:
        u = torch.tensor([uniforms[r] for r in sampled_rows], dtype=torch.float32, device=dev)
    rows = torch.tensor(sampled_rows, device=dev)
    x = logits[rows].float() / torch.tensor([temperature[r] for r in sampled_rows], device=dev)[:, None]
    ks = [(top_k or [None] * b)[r] for r in sampled_rows]
    ps = [(top_p or [None] * b)[r] for r in sampled_rows]
    order = None
    if any(k is not None and k < V for k in ks) or any(p is not None and p < 1 for p in ps):
        x, order = x.sort(-1, descending=True)  # one sort serves both filters
        rank = torch.arange(V, device=dev)[None, :]
        k = torch.tensor([V if k is None else min(k, V) for k in ks], device=dev)
        x = x.masked_fill(rank >= k[:, None], float("-inf"))
        probs = x.softmax(-1)
        p = torch.tensor([1.0 if p is None else p for p in ps], device=dev)
        # tokens after the nucleus is complete; the most likely token always stays (a top_p that rounds to 0)
        drop = (probs.cumsum(-1) - probs >= p[:, None]) & (p[:, None] < 1) & (rank > 0)
        x = x.masked_fill(drop, float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(V - 1)
    picked = idx.squeeze(1) if order is None else order.gather(1, idx).squeeze(1)
    return greedy.index_copy(0, rows, picked)


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one token under the model's raw distribution (log_softmax of the logits: before
    temperature, top-k and top-p, as vLLM reports by default), and the `top` most likely tokens at that position
    as (id, logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int]) -> list[TokenLogprob]:
    """`TokenLogprob`s of `tokens` [b] under logits [b, V] (raw distribution, fp32), with the `top_n[r]` most likely
    alternatives of row r; one host transfer."""
    if not len(tokens):
        return []
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    k = min(max(top_n), lp.shape[-1])
    if k <= 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen, strict=True)]
    vals, ids = lp.topk(k, -1)
    vals, ids = vals.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(ids[r][:n], vals[r][:n], strict=True)))
            for r, (t, c, n) in enumerate(zip(tokens, chosen, top_n, strict=True))]


def draw_uniform(temperature: float, generator: torch.Generator | None) -> float:
    """The uniform draw `sample_tokens` takes for a row (0 for a greedy row: nothing is drawn)."""
    return float(torch.rand((), generator=generator)) if temperature > 0 else 0.0


def sample_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token from logits [V] (see `sample_tokens`)."""
    return int(sample_tokens(logits[None], [temperature], [top_k], [top_p], [generator])[0])


class Detokenizer:
    """Text of a growing list of token ids, decoding only a short window per step instead of the whole output
    (quadratic over a long reasoning trace). Bytes of an incomplete UTF-8 character wait for the next tokens;
    `text` always equals `tokenizer.decode(ids)` without such a tail, and `finish` adds the tail."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # window start: the text of ids[_prefix:_read] is already in self.text
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))  # type: ignore[attr-defined]

    def update(self, ids: Sequence[int]) -> str:
        """Add the text of the ids beyond those already read; returns the new text."""
        if len(ids) <= self._read:
            return ""
        before = self._decode(ids[self._prefix : self._read])
        window = self._decode(ids[self._prefix :])
        if window.endswith("\ufffd") or not window.startswith(before):
            return ""  # an incomplete character at the end: wait for more bytes
        new = window[len(before) :]
        self.text += new
        self._prefix, self._read = self._read, len(ids)
        return new

    def finish(self, ids: Sequence[int]) -> str:
        """The whole text, including a trailing incomplete character (as a replacement character)."""
        self.update(ids)
        if self._read < len(ids):
            self.text += self._decode(ids[self._prefix :])[len(self._decode(ids[self._prefix : self._read])) :]
            self._prefix = self._read = len(ids)
        return self.text
