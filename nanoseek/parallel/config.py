"""How a run is spread over processes: the `--parallel` mesh spec (`dp=2,ep=2,...`), one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import POSITIVE, ConfigError, check_fields, override, param


@dataclass
class ParallelConfig:
    """A mesh of dp x ep ranks (the world size) and the switches of `parallelize`.

    Every rank reads its own sequences (data parallel over all dp x ep ranks, as in V3, whose expert-parallel ranks
    are also data-parallel ranks). Dense parameters are sharded (FSDP2) over all ranks; routed experts are split
    over `ep` ranks along the expert dimension and sharded over `dp`."""

    dp: int = param(1, POSITIVE)
    ep: int = param(1, POSITIVE)
    # nodes the ep group spans (node-limited routing): expert groups are placed so that each lives on one node.
    # None: from torchrun (world size / ranks per node); set it to simulate nodes as rank groups on one machine
    nodes: int | None = param(None, POSITIVE)
    # build the model on the meta device and initialise each rank's shards only (for models too big for one
    # device; the initial values then differ from a single process's). Off: every rank builds the whole model with
    # the run's seed before sharding it, which reproduces the single-process run
    meta_init: bool = False
    activation_checkpoint: bool = False  # recompute each block's activations in the backward
    reshard_after_forward: bool = True  # FSDP2: free the gathered block weights after its forward (ZeRO-3)
    fp8_dispatch: bool = False  # EP: send the dispatched activations in FP8 (1x128 scales), combine in BF16 (V3 §3.3)
    timeout: float = param(300.0, POSITIVE)  # seconds the rendezvous and each collective wait for the other ranks

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    @classmethod
    def parse(cls, spec: str) -> ParallelConfig:
        """`"dp=2,ep=2"` (omitted dimensions are 1; also `nodes=`, `activation_checkpoint=`, `fp8_dispatch=`,
        `reshard_after_forward=`, `timeout=`)."""
        items = [s for s in spec.replace(" ", "").split(",") if s]
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--parallel expects KEY=VALUE[,KEY=VALUE...] (e.g. dp=2,ep=2), got {item!r}")
        return override(cls(), items, "--parallel key")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
