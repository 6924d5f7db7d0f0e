"""The --parallel mesh spec and the data split between ranks (no processes needed)."""

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.data import PackedBatches, TokenShard
from nanoseek.parallel import ParallelConfig


def test_mesh_spec():
    pc = ParallelConfig.parse("dp=2, ep=2,nodes=2,activation_checkpoint=true")
    assert (pc.dp, pc.ep, pc.nodes, pc.activation_checkpoint, pc.world_size) == (2, 2, 2, True, 4)
    assert ParallelConfig.parse("ep=4").world_size == 4 and ParallelConfig.parse("ep=4").dp == 1
    with pytest.raises(ConfigError, match="dp"):
        ParallelConfig.parse("dp=0")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        ParallelConfig.parse("dp2")
    with pytest.raises(ConfigError, match="dp"):  # an unknown key names the valid ones
        ParallelConfig.parse("dq=2")
    with pytest.raises(ConfigError, match="timeout"):
        ParallelConfig.parse("timeout=-1")


def test_ranks_read_disjoint_slices_that_make_the_single_process_batch(tmp_path):
    from nanoseek.data.shards import write_shard

    path = tmp_path / "t.bin"
    write_shard(path, [list(range(500)) * 4], tokenizer_hash="h", vocab_size=500)
    shard = TokenShard.open(path, "h")
    full = PackedBatches(shard, 8, 16, seed=3)
    parts = [PackedBatches(shard, 8, 16, seed=3) for _ in range(4)]
    for _ in range(5):  # across an epoch boundary too
        x, y = full.next_batch(8)
        xs = [p.next_batch(8, (r, 4)) for r, p in enumerate(parts)]
        assert torch.equal(torch.cat([a for a, _ in xs]), x) and torch.equal(torch.cat([b for _, b in xs]), y)
    assert all(p.state_dict() == full.state_dict() for p in parts)  # every rank is at the same stream position
    with pytest.raises(ValueError, match="equal parts"):
        full.next_batch(6, (0, 4))
