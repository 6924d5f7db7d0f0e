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


def test_pipeline_stage_split_balances_the_output_stage():
    import nanoseek
    from nanoseek.parallel.pipeline import output_cost, stage_bounds, stage_indices

    assert stage_bounds(8, 2) == [4] and stage_bounds(61, 4) == [15, 30, 46]
    # the last stage also runs the head and the MTP module(s): it gets fewer layers
    assert stage_bounds(8, 2, last_extra=2.0) == [5]
    for n, s, extra in ((4, 4, 3.0), (8, 4, 100.0), (61, 16, 4.3)):
        b = [0, *stage_bounds(n, s, extra), n]
        assert all(x < y for x, y in zip(b, b[1:], strict=False))  # every stage keeps a layer
    tiny = nanoseek.load(nanoseek.preset("tiny"))
    assert 5 < output_cost(tiny) < 10  # a 4,096-token vocabulary on a 128-wide model: the head is heavy
    with pytest.raises(ValueError, match="pipeline stages"):
        stage_bounds(3, 4)
    # DualPipeV's V: rank 0 holds the first and the last stage; interleaved loops
    assert stage_indices(0, 4, "dualpipev") == [0, 7] and stage_indices(3, 4, "dualpipev") == [3, 4]
    assert stage_indices(1, 4, "interleaved") == [1, 5] and stage_indices(2, 4, "1f1b") == [2]
