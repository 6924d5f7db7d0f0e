"""Balance measures (MaxVio), the metrics JSONL file and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def max_violation(load: torch.Tensor) -> tuple[float, float]:
    """MaxVio = (max_i load_i - mean load) / mean load, averaged over MoE layers.

    load: [layers, B, E] token counts. Returns (over the whole batch, averaged per sequence).
    """
    if load.numel() == 0:
        return 0.0, 0.0
    batch = load.sum(dim=1)  # [L, E]
    mean = batch.mean(dim=-1).clamp_min(1e-9)
    vio_batch = ((batch.amax(dim=-1) - mean) / mean).mean().item()
    mean_s = load.mean(dim=-1).clamp_min(1e-9)  # [L, B]
    vio_seq = ((load.amax(dim=-1) - mean_s) / mean_s).mean().item()
    return vio_batch, vio_seq


class MetricsLog:
    """Append-only JSONL of per-step records; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        """`enabled=False`: a log that writes nothing (the ranks other than 0 of a distributed run)."""
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["main_loss"] for r in train], label="train (main)", lw=1)
    if train and train[0].get("mtp_loss") is not None:
        ax.plot([r["step"] for r in train], [r["mtp_loss"] for r in train], label="train (MTP depth 1)", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.set_title(title or "loss")
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r["maxvio_batch"] for r in train], label="MaxVio (batch)", lw=1)
    ax.plot([r["step"] for r in train], [r["maxvio_seq"] for r in train], label="MaxVio (per sequence)", lw=1)
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("expert load balance")
    ax = axes[2]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1)
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_expert_heatmap(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Expert load share over training, one panel per MoE layer (rows: experts, columns: steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("kind") == "train" and r.get("expert_load")]
    if not rows:
        return None
    load = torch.tensor([r["expert_load"] for r in rows])  # [T, L, E] shares
    n_layers = load.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.6), squeeze=False)
    steps = [r["step"] for r in rows]
    vmax = float(load.max())
    for i in range(n_layers):
        ax = axes[0, i]
        im = ax.imshow(load[:, i, :].T.numpy(), aspect="auto", origin="lower", vmin=0, vmax=vmax,
                       extent=(steps[0], steps[-1], -0.5, load.shape[2] - 0.5), cmap="viridis")
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of routed tokens")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
