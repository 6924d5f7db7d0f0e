"""Redundant experts planned from the load a server sees (V3 §3.4, the EPLB algorithm in nanoseek.parallel.eplb):

    nanoseek serve CKPT --eplb gpus=8,redundant=8,interval=30

every `interval` seconds the tokens routed to each expert since the last plan (counted by /metrics' expert-load
hooks) are planned for a deployment of `gpus` GPUs holding experts + `redundant` slots, and the plan is installed:
each MoE layer then sends every (token, expert) pair to one of the expert's replicas in turn (outputs unchanged, so
requests in flight are not disturbed). `GET /eplb` shows the plan and the balance it buys: the busiest GPU's load
against the mean, without and with the replicas, on the load it was planned from and on the load served since.
In one process the replicas are extra copies of the experts' weights; across GPUs each would hold its slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, check_fields, override, param
from ..model import Transformer
from ..parallel.eplb import install_plan, rebalance, unbalanced_gpu_load
from .metrics import ExpertLoad


@dataclass
class EPLBConfig:
    """The deployment the plans are for and how often to re-plan."""

    gpus: int = param(8, POSITIVE)  # GPUs the experts of a layer are spread over (expert-parallel degree)
    redundant: int = param(8, NON_NEGATIVE)  # extra expert slots per layer (V3 prefill: 32 over 32 GPUs)
    nodes: int = param(1, POSITIVE)  # nodes of those GPUs (hierarchical planning when they divide the groups)
    interval: float = param(30.0, POSITIVE)  # seconds between plans
    min_tokens: int = param(64, POSITIVE)  # a plan waits for this many (token, expert) pairs per layer

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def parse(cls, spec: str) -> EPLBConfig:
        """`"gpus=8,redundant=8,interval=30"` (omitted fields keep their defaults)."""
        items = [s for s in spec.replace(" ", "").split(",") if s]
        if any("=" not in s for s in items):
            raise ConfigError(f"--eplb expects KEY=VALUE[,KEY=VALUE...] (e.g. gpus=8,redundant=8), got {spec!r}")
        return override(cls(), items, "--eplb key")


def _imbalance(gpu_load: torch.Tensor) -> list[float]:
    """max / mean load per layer (1.0: perfectly balanced)."""
    return (gpu_load.max(dim=1).values / gpu_load.mean(dim=1).clamp_min(1e-12)).tolist()


class Rebalancer:
    """Plans and installs redundant experts from the counts of an ExpertLoad (the server's /metrics hooks)."""

    def __init__(self, model: Transformer, load: ExpertLoad, cfg: EPLBConfig,
                 on_install: Callable[[], None] | None = None) -> None:
        c = model.config
        self.n_slots = c.n_routed_experts + cfg.redundant
        if self.n_slots % cfg.gpus:
            raise ConfigError(f"--eplb: {c.n_routed_experts} experts + redundant={cfg.redundant} = {self.n_slots} "
                              f"slots do not split over gpus={cfg.gpus}")
        if cfg.gpus % cfg.nodes:
            raise ConfigError(f"--eplb: gpus={cfg.gpus} do not split over nodes={cfg.nodes}")
        self.model, self.load, self.cfg = model, load, cfg
        self.on_install = on_install  # called after each plan is installed (the engine's model_changed)
        self.groups = c.n_group if c.n_group and c.n_routed_experts % c.n_group == 0 else 1
        self._base = load.snapshot()  # counts at the last plan
        self._lock = threading.Lock()
        self.plans = 0
        self.last: dict[str, Any] | None = None
        self._dispatch: list[Any] = []

    def replan(self) -> bool:
        """Plan from the load since the last plan and install it; False (nothing changed) while fewer than
        min_tokens pairs per layer were routed."""
        with self._lock:
            now = self.load.snapshot()
            window = now - self._base
            if int(window.sum(dim=1).min()) < self.cfg.min_tokens:
                return False
            cfg = self.cfg
            plan = rebalance(window.double(), self.n_slots, self.groups, cfg.nodes, cfg.gpus)
            self._dispatch = install_plan(self.model, plan)
            if self.on_install is not None:
                self.on_install()
            self._base = now
            self.plans += 1
            self.last = {
                "time": time.time(), "tokens": window.sum(dim=1).tolist(),
                "imbalance_plain": _imbalance(unbalanced_gpu_load(window, cfg.gpus)),
                "imbalance_replicated": _imbalance(plan.gpu_load(window, cfg.gpus)),
                "replicas": plan.logcnt.tolist(), "phy2log": plan.phy2log.tolist(),
            }
            return True

    def status(self) -> dict[str, Any]:
        """What GET /eplb shows: the configuration, the last plan, and the balance of the load served since it
        (the slots' loads as dispatched, padding rows of the engine's batches included)."""
        with self._lock:
            out: dict[str, Any] = {"config": dataclasses.asdict(self.cfg), "slots": self.n_slots,
                                   "plans": self.plans, "last": self.last}
            if self._dispatch:
                slot = torch.stack([d.slot_load for d in self._dispatch]).double()  # [layers, slots]
                gpu = slot.view(slot.shape[0], self.cfg.gpus, -1).sum(-1)
                out["since_last"] = {"pairs": slot.sum(dim=1).tolist(),
                                     "imbalance_replicated": _imbalance(gpu) if slot.sum() > 0 else None}
            return out

    async def run(self) -> None:
        """Re-plan every `interval` seconds until cancelled (the planning runs off the event loop)."""
        while True:
            await asyncio.sleep(self.cfg.interval)
            await asyncio.to_thread(self.replan)
