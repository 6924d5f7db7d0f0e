"""How a run is spread over processes: the `--parallel` mesh spec (`dp=2,ep=2,...`), one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, check_fields, override, param


@dataclass
class ParallelConfig:
    """A mesh of pp x dp x ep ranks (the world size) and the switches of `parallelize`.

    Every rank of a pipeline stage reads its own sequences (data parallel over the dp x ep ranks, as in V3, whose
    expert-parallel ranks are also data-parallel ranks). Dense parameters are sharded (FSDP2) over the dp x ep ranks
    of their stage; routed experts are split over `ep` ranks along the expert dimension and sharded over `dp`. With
    pp > 1 the layers are cut into pipeline stages (nanoseek.parallel.pipeline) run by `pp_schedule`."""

    pp: int = param(1, POSITIVE)
    dp: int = param(1, POSITIVE)
    ep: int = param(1, POSITIVE)
    # the pipeline schedule (pp > 1): DualPipeV places the first and the last stage -- embedding, head and MTP -- on
    # rank 0 (V3 §3.2.1); interleaved and DualPipeV run two stages per rank
    pp_schedule: Literal["gpipe", "1f1b", "interleaved", "dualpipev"] = "1f1b"
    # DualPipeV with ep > 1: each overlapped step's forward and backward chunks take turns in two threads, one
    # computing while the other's expert all-to-all is in flight (nanoseek.parallel.overlap; V3 §3.2.1)
    overlap: bool = False
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
    # EP: replica slots per ep rank for other ranks' hot experts, planned from the observed expert loads after the
    # first step and every `replan_every` steps (nanoseek.parallel.redundant; V3 §3.4 has them in inference only).
    # 0: none. At most the experts other ranks own (of the rank's node when nodes > 1)
    redundant: int = param(0, NON_NEGATIVE)
    replan_every: int = param(50, POSITIVE)
    timeout: float = param(300.0, POSITIVE)  # seconds the rendezvous and each collective wait for the other ranks

    def __post_init__(self) -> None:
        check_fields(self)
        if self.overlap and (self.pp_schedule != "dualpipev" or self.pp == 1 or self.ep == 1):
            raise ConfigError(f"--parallel overlap=true overlaps DualPipeV's paired chunks at their expert-parallel "
                              f"all-to-alls: it needs pp > 1, pp_schedule=dualpipev and ep > 1 (got pp={self.pp}, "
                              f"pp_schedule={self.pp_schedule}, ep={self.ep})")
        if self.redundant and self.ep == 1:
            raise ConfigError(f"--parallel redundant={self.redundant} holds replicas of other expert-parallel ranks' "
                              f"experts: it needs ep > 1")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    def describe(self) -> str:
        """'pp=2,dp=1,ep=2' (the mesh as written on the command line, pp only when used)."""
        return (f"pp={self.pp}," if self.pp > 1 else "") + f"dp={self.dp},ep={self.ep}"

    @classmethod
    def parse(cls, spec: str) -> ParallelConfig:
        """`"dp=2,ep=2"`, `"pp=2,ep=2,pp_schedule=dualpipev"` (omitted dimensions are 1; also `overlap=`, `nodes=`,
        `activation_checkpoint=`, `fp8_dispatch=`, `redundant=`, `replan_every=`, `reshard_after_forward=`,
        `timeout=`)."""
        items = [s for s in spec.replace(" ", "").split(",") if s]
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--parallel expects KEY=VALUE[,KEY=VALUE...] (e.g. dp=2,ep=2), got {item!r}")
        return override(cls(), items, "--parallel key")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
