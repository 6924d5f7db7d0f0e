"""Joining the process group that torchrun set up, and the mesh a run works on.

`torchrun --nproc-per-node N -m nanoseek pretrain ... --parallel dp=2,ep=2` starts N processes with RANK / WORLD_SIZE /
MASTER_ADDR in their environment; `init_distributed` joins them (gloo on CPU, nccl on CUDA), checks that the mesh
covers the world and builds the DeviceMesh ("pp", "dp", "ep"): pipeline stages outermost, so that the dp x ep ranks
of one stage are neighbours (on one node when they fit, as in V3, whose expert parallelism spans 8 nodes while the
pipeline crosses them). A single process given `--parallel` without torchrun runs
as a world of one (FSDP2 at world size 1) when the mesh has one rank, and is refused otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from .config import ParallelConfig


class DistributedError(RuntimeError):
    """A rank could not join, or lost, the process group (one line, naming the rank)."""


@dataclass
class ParallelContext:
    """This process's place in a distributed run."""

    cfg: ParallelConfig
    mesh: DeviceMesh  # 3-D ("pp", "dp", "ep")
    dense_mesh: DeviceMesh  # 1-D over the dp x ep ranks of this pipeline stage: dense parameters are sharded over it
    device: torch.device
    rank: int
    world_size: int
    ep_nodes: int  # nodes the ep group spans (for node-limited routing)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def data_rank(self) -> int:
        """This rank's index among the dp x ep ranks of its stage (which slice of each batch it reads)."""
        return self.dense_mesh.get_local_rank()

    @property
    def data_world(self) -> int:
        """The data-parallel ranks: dp x ep (each pipeline stage sees every sequence once)."""
        return self.cfg.dp * self.cfg.ep

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` reduced over every rank (in place, returned)."""
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t

    def all_gather(self, t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Every rank's `t` (same shape on each; of `group`, default all) concatenated along dim 0, in rank order."""
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t.contiguous(), group=group)
        return torch.cat(out)

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (stop signals, out-of-time decisions: ranks act together)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t, "max").item() > 0)

    def broadcast_float(self, x: float) -> float:
        """Rank 0's value of x on every rank."""
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def barrier(self) -> None:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_world() -> int | None:
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w is not None else None


def init_distributed(cfg: ParallelConfig, device: str = "auto") -> ParallelContext:
    """Join the process group (torchrun's environment) and build the mesh; a mesh that does not match the world
    size is refused before any work, and a rendezvous that does not complete within `cfg.timeout` seconds is a
    DistributedError."""
    world = _launched_world()
    if world is None:
        if cfg.world_size != 1:
            raise ConfigError(f"--parallel {cfg.describe()} is a mesh of {cfg.world_size} ranks, but this is a "
                              f"single process: launch it with torchrun --nproc-per-node {cfg.world_size} -m nanoseek "
                              f"...")
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        world = 1
    if world != cfg.world_size:
        raise ConfigError(f"--parallel {cfg.describe()} is a mesh of {cfg.world_size} ranks, but "
                          f"torchrun started {world} processes (WORLD_SIZE={world})")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout),
                                    device_id=dev if use_cuda else None)
        except (RuntimeError, dist.DistStoreError, TimeoutError) as e:
            raise DistributedError(f"rank {rank}: no rendezvous with the other {world - 1} rank(s) at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                                   f"{cfg.timeout:g} s ({_first_line(e)})") from None
    mesh = init_device_mesh(dev.type, (cfg.pp, cfg.dp, cfg.ep), mesh_dim_names=("pp", "dp", "ep"))
    dense = mesh["dp", "ep"]._flatten("dp_ep")
    nodes = cfg.nodes if cfg.nodes is not None else max(1, cfg.ep // local_world)
    if cfg.ep % nodes:
        raise ConfigError(f"--parallel nodes={nodes}: the ep group of {cfg.ep} ranks does not split into {nodes} nodes")
    return ParallelContext(cfg, mesh, dense, dev, rank, world, nodes)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
