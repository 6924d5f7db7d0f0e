"""Cross-entropy of a linear head without materialising the [tokens, vocab] logits.

CE = mean_t (logsumexp(h_t W^T) - h_t . W_{y_t}). The tokens are processed in chunks; when gradients are
needed, each chunk's dL/dlogits = softmax - onehot is turned into dL/dh and dL/dW right away, so peak memory
holds one chunk of logits instead of logits + log-softmax + their gradient for the whole batch. Same FLOPs.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid_all = labels != ignore_index
        n_valid = valid_all.sum().clamp_min(1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, lc = h[s : s + chunk], labels[s : s + chunk]
            valid = valid_all[s : s + chunk]
            tgt = lc.clamp_min(0)
            logits = (hc @ weight.T).float()
            lse = logits.logsumexp(dim=-1)
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), tgt] -= 1.0
                p.mul_((valid.to(p.dtype) / n_valid)[:, None])
                p = p.to(h.dtype)
                if need_h:
                    grad_h[s : s + chunk] = p @ weight
                if need_w:
                    grad_w.addmm_(p.T.float(), hc.float())
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return total / n_valid

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * g).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 256, ignore_index: int = -100
) -> torch.Tensor:
    """mean CE of logits = h @ weight.T against labels (ignore_index skipped). h [..., D], labels [...]."""
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    if h2.shape[0] != lab.shape[0]:
        raise ValueError(f"{h2.shape[0]} hidden states but {lab.shape[0]} labels")
    return _LinearCrossEntropy.apply(h2, weight, lab, chunk, ignore_index)
