"""Plain autoregressive sampling by re-running the full forward each token (no KV cache).

Small and obviously correct: used for reports and as the reference the cached engine is tested against.
"""

from __future__ import annotations

import torch

from ..model import Transformer


@torch.no_grad()
def generate_simple(
    model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None,
    temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
    max_context: int | None = None,
) -> list[int]:
    """Tokens generated after `prompt` (greedy when temperature == 0), stopping after a stop id (excluded)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    out: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        ctx = ids if max_context is None else ids[-max_context:]
        logits = model(torch.tensor([ctx], device=device)).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if stop_ids and nxt in stop_ids:
            break
        out.append(nxt)
        ids.append(nxt)
    model.train(was_training)
    return out
