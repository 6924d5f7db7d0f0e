import json

import numpy as np
import pytest
import torch

from nanoseek.data import PackedBatches, TokenShard, heldout_batches, write_shard

HASH = "00000000aaaaaaaa"


@pytest.fixture
def shard(tmp_path) -> TokenShard:
    """Tokens 0..1000: each token's value is its position, so batches reveal where they were cut."""
    write_shard(tmp_path / "s.bin", [list(range(0, 600)), list(range(600, 1001))], HASH, vocab_size=1024)
    return TokenShard.open(tmp_path / "s.bin", HASH)


def test_windows_and_shifted_labels(shard):
    loader = PackedBatches(shard, batch_size=4, seq_len=16, seed=0)
    assert loader.n_windows == 1000 // 16
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    assert (x[:, 0] % 16 == 0).all()  # windows start at multiples of seq_len


def test_each_epoch_visits_every_window_once(shard):
    loader = PackedBatches(shard, batch_size=5, seq_len=10, seed=3)
    n = loader.n_windows  # 100
    starts = [s for _ in range(2 * n // 5) for s in loader.next_batch()[0][:, 0].tolist()]
    first, second = starts[:n], starts[n:]
    assert sorted(first) == sorted(second) == list(range(0, 1000, 10))
    assert first != second  # a new permutation each epoch
    assert loader.epoch == 2 and loader.pos == 0
    other = PackedBatches(shard, batch_size=5, seq_len=10, seed=4).next_batch()[0][:, 0].tolist()
    assert other != first[:5]


def test_exact_resume(shard):
    loader = PackedBatches(shard, batch_size=7, seq_len=25, seed=1)  # 40 windows: 8 batches cross an epoch
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["pos"]) == (0, 35)
    expected = [loader.next_batch() for _ in range(3)]
    assert loader.epoch == 1  # the continuation wrapped into the second epoch

    fresh = PackedBatches(shard, batch_size=7, seq_len=25, seed=1)
    fresh.next_batch()  # whatever it did before is overwritten by the state
    fresh.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [fresh.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)

    # resume inside a later epoch (its permutation differs from the first one's)
    state2 = loader.state_dict()
    assert state2["epoch"] == 1
    more = [loader.next_batch()[0] for _ in range(3)]
    again = PackedBatches(shard, batch_size=7, seq_len=25, seed=1)
    again.load_state_dict(state2)
    assert all(torch.equal(a, again.next_batch()[0]) for a in more)

    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(shard, batch_size=7, seq_len=24).load_state_dict(state)


def test_batch_size_ramp_keeps_the_stream(shard):
    ones = PackedBatches(shard, batch_size=1, seq_len=8, seed=2)
    stream = torch.cat([ones.next_batch()[0] for _ in range(20)])
    ramp = PackedBatches(shard, batch_size=2, seq_len=8, seed=2)
    parts = [ramp.next_batch(), ramp.next_batch(5), ramp.next_batch(), ramp.next_batch(11)]
    assert [p[0].shape[0] for p in parts] == [2, 5, 2, 11]
    assert torch.equal(torch.cat([p[0] for p in parts]), stream)


def test_heldout_batches(shard):
    batches = heldout_batches(shard, batch_size=4, seq_len=32, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 32) for x, _ in batches)
    again = heldout_batches(shard, batch_size=4, seq_len=32, max_batches=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] > 800  # spread over the shard
    for x, y in batches:
        assert torch.equal(y, x + 1)
    everything = heldout_batches(shard, batch_size=4, seq_len=100, max_batches=100)
    assert [x.shape[0] for x, _ in everything] == [4, 4, 2]  # 10 windows; the last batch is partial
    with pytest.raises(ValueError, match="too few"):
        heldout_batches(shard, batch_size=1, seq_len=1001, max_batches=1)
    with pytest.raises(ValueError, match="too few"):
        PackedBatches(shard, batch_size=1, seq_len=1001)


def test_uint16_tokens_above_32767(tmp_path):
    ids = np.arange(40000, 40000 + 65, dtype=np.int64).tolist()
    write_shard(tmp_path / "u.bin", [ids], HASH, vocab_size=50000)
    x, y = PackedBatches(TokenShard.open(tmp_path / "u.bin"), 2, 32).next_batch()
    assert int(x.min()) >= 40000 and torch.equal(y, x + 1)
