"""Log-likelihood scoring: the one call behind multiple choice, bits-per-byte and lm-eval's two scoring requests.

    loglikelihood(model, [(context_ids, continuation_ids), ...])  # [LogLik(sum log p(cont | ctx), is_greedy)]
    loglikelihood_rolling(model, ids, prefix_id, max_len)          # sum log p of every token of a text, in windows

Batched the way lm-evaluation-harness batches: requests sorted longest first, right-padded (attention is causal, so
pads after a sequence change nothing before them; DeepSeekMoE routes each token on its own and drops none), the
blocks run once per batch and the head only on the continuation's positions. A sequence longer than `max_len`
loses the oldest context tokens, never continuation tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import Transformer


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before it), natural log
    is_greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def _rows(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[tuple[list[int], int]]:
    """(input ids, number of scored positions at its end) per request: input = (ctx + cont)[:-1], cut to max_len."""
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if not ctx:
            raise ValueError(f"request {i}: empty context (start it with the tokenizer's bos id)")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_len {max_len}")
        seq = [*ctx, *cont][-(max_len + 1):]
        rows.append((seq, len(cont)))
    return rows


@torch.inference_mode()
def loglikelihood(
    model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int | None = None,
    token_budget: int = 8192,
) -> list[LogLik]:
    """log p(continuation | context) for each (context ids, continuation ids), in the order given. `max_len`: the
    longest input the model sees (default: the config's max_position_embeddings); `token_budget`: batch size in
    padded tokens per forward."""
    max_len = max_len or model.config.max_position_embeddings
    rows = _rows(requests, max_len)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[LogLik | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        a = 0
        while a < len(order):
            width = len(rows[order[a]][0]) - 1  # the longest input of this batch (sorted longest first)
            b = a + max(1, token_budget // max(width, 1))
            batch = order[a:b]
            x = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for r, i in enumerate(batch):
                seq = rows[i][0]
                x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            h = model(x, return_logits=False, mtp=False).hidden
            for r, i in enumerate(batch):
                seq, n = rows[i]
                end = len(seq) - 1
                logp = model.logits(h[r, end - n : end]).float().log_softmax(-1)
                target = torch.tensor(seq[-n:], device=device)
                picked = logp.gather(-1, target[:, None])[:, 0]
                out[i] = LogLik(float(picked.sum()), bool((logp.argmax(-1) == target).all()), n)
            a = b
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def rolling_requests(ids: Sequence[int], prefix_id: int, max_len: int, stride: int | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token of `ids` exactly once: the first token conditioned
    on `prefix_id` (bos), windows of `stride` predicted tokens (default max_len: disjoint windows, as lm-eval), each
    seeing up to max_len tokens before it (stride < max_len: overlapping context, a lower perplexity)."""
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len ({max_len}), got {stride}")
    full = [prefix_id, *ids]
    reqs = []
    for a in range(0, len(ids), stride):
        cont = list(ids[a : a + stride])
        ctx = full[max(0, a + 1 - (max_len + 1 - len(cont))) : a + 1]
        reqs.append((ctx, cont))
    return reqs


def loglikelihood_rolling(model: Transformer, ids: Sequence[int], prefix_id: int, max_len: int | None = None,
                          stride: int | None = None, token_budget: int = 8192) -> float:
    """Sum of log p over every token of `ids` (natural log), through `rolling_requests` windows."""
    if not ids:
        return 0.0
    max_len = max_len or model.config.max_position_embeddings
    reqs = rolling_requests(ids, prefix_id, max_len, stride)
    return sum(r.logprob for r in loglikelihood(model, reqs, max_len, token_budget))


def bits_per_byte(total_logprob: float, n_bytes: int) -> float:
    """Tokenizer-independent: -sum log p (nats) / (ln 2 * UTF-8 bytes of the text), as V3 reports Pile BPB."""
    if n_bytes <= 0:
        raise ValueError("bits per byte of an empty text")
    return -total_logprob / (math.log(2) * n_bytes)
