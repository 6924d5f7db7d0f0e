"""GRPO loss pieces as pure tensor functions (DeepSeekMath §4.1; R1 §2.2.1); no model in here.

Shapes: ``B`` completions (``num_prompts * G``, grouped consecutively), ``T`` completion tokens. ``logp`` /
``old_logp`` / ``ref_logp`` are per-token log-probabilities of the sampled tokens ``[B, T]``; ``mask`` ``[B, T]`` is
1 on completion tokens and 0 on padding.

With one optimisation step per batch (mu = 1) ``old_logp == logp`` numerically, so the ratio is exactly 1 and the
loss value is just ``-mean(A)`` under the chosen aggregation (about 0 with normalised advantages) while its gradient
is not zero: watch the reward, not the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["grpo", "dapo", "dr_grpo"]


def _grouped(rewards: Tensor, group_size: int | None) -> Tensor:
    if rewards.dim() == 2:
        return rewards
    if rewards.dim() != 1 or group_size is None or rewards.numel() % group_size:
        raise ValueError("rewards must be [B, G], or [B*G] with group_size dividing its length")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int | None = None, scale_std: bool = True, eps: float = 1e-4,
) -> Tensor:
    """GRPO advantages ``(r - mean_group(r)) / (std_group(r) + eps)``, same shape as ``rewards`` (``[B, G]``, or
    flat ``[B*G]`` with ``group_size``). std is torch's Bessel-corrected std, as in TRL and verl (0 for G = 1);
    ``scale_std=False`` (Dr. GRPO) only subtracts the group mean."""
    r = _grouped(rewards.float(), group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(rewards.shape)


def all_equal_fraction(rewards: Tensor, group_size: int | None = None) -> float:
    """Fraction of groups whose rewards are all equal: they have zero advantage and contribute no gradient."""
    r = _grouped(rewards, group_size)
    return (r.amax(dim=1) == r.amin(dim=1)).float().mean().item()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_objective(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO/GRPO surrogate per token: ``min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with
    ``rho = exp(logp - old_logp)``; ``eps_high`` defaults to ``eps_low`` (DAPO uses 0.2 / 0.28). ``advantages`` is
    ``[B]`` (one per sequence) or ``[B, T]``. Returns ``(objective [B, T], clipped [B, T] bool)`` where ``clipped``
    marks tokens whose clipped branch is the active one (so they get no gradient)."""
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    rho = torch.exp(logp - old_logp)
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv
    is_clipped = ((adv > 0) & (rho > 1 + eps_high)) | ((adv < 0) & (rho < 1 - eps_low))
    return torch.minimum(unclipped, clipped), is_clipped


def aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation = "grpo", max_len: int | None = None) -> Tensor:
    """Reduce a per-token quantity ``[B, T]`` over the active tokens of ``mask``.
    ``grpo``: mean over each sequence's tokens, then mean over sequences (a token of a short sequence weighs more);
    ``dapo``: sum over all tokens / number of active tokens (every token weighs the same);
    ``dr_grpo``: sum over all tokens / (B * max_len), ``max_len`` defaulting to T (pass the generation's maximum
    completion length to keep the constant fixed across batches)."""
    m = mask.to(per_token.dtype)
    total = per_token * m
    if aggregation == "grpo":
        return (total.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if aggregation == "dapo":
        return total.sum() / m.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        return total.sum() / (per_token.shape[0] * (max_len or per_token.shape[-1]))
    raise ValueError(f"aggregation must be 'grpo', 'dapo' or 'dr_grpo', not {aggregation!r}")


def grpo_loss(
    logp: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
    beta: float = 0.0, eps_low: float = 0.2, eps_high: float | None = None, aggregation: Aggregation = "grpo",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss to minimise: ``-(clipped_objective - beta * kl_k3)`` per token, reduced by :func:`aggregate`.
    ``old_logp=None`` means mu = 1 (``logp.detach()``); ``ref_logp`` may be None when ``beta == 0``.
    Metrics (floats over active tokens): loss, pg_loss, kl, clip_frac, clip_frac_low, clip_frac_high,
    ratio_mean."""
    old_logp = logp.detach() if old_logp is None else old_logp
    objective, clipped = clipped_objective(logp, old_logp, advantages, eps_low, eps_high)
    per_token = -objective
    pg_loss = aggregate(per_token, mask, aggregation, max_len)
    kl = None
    if beta != 0.0 or ref_logp is not None:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len)

    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        rho = torch.exp(logp - old_logp)
        adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
        adv = adv.expand_as(logp)
        metrics = {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "kl": ((kl * m).sum() / n).item() if kl is not None else 0.0,
            "clip_frac": ((clipped & m).sum() / n).item(),
            "clip_frac_low": ((clipped & m & (adv < 0)).sum() / n).item(),
            "clip_frac_high": ((clipped & m & (adv > 0)).sum() / n).item(),
            "ratio_mean": ((rho * m).sum() / n).item(),
        }
    return loss, metrics
