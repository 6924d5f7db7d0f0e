"""Scale-out on torch.distributed: the mesh spec, joining the process group, expert parallelism with node-limited
routing, FSDP2, and sharded (DCP) checkpoints."""

from .config import ParallelConfig
from .expert import ExpertParallelDispatch, Traffic
from .launch import DistributedError, ParallelContext, init_distributed, shutdown
from .parallelize import clip_grad_norm, expert_traffic, materialize, parallelize

__all__ = [
    "DistributedError", "ExpertParallelDispatch", "ParallelConfig", "ParallelContext", "Traffic", "clip_grad_norm",
    "expert_traffic", "init_distributed", "materialize", "parallelize", "shutdown",
]
