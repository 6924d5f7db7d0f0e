"""DualPipeV's overlap (nanoseek.parallel.overlap): two chunks taking turns at their all-to-alls, without a process
group (collectives stand in as timed fakes); the distributed run is tests/parallel/test_parallel.py's
pipelined-training test (overlap=true, against one process)."""

import threading
import time

import pytest

from nanoseek.config import ConfigError
from nanoseek.parallel import ParallelConfig
from nanoseek.parallel import overlap as ov


class FakeWork:
    """An async collective that completes `seconds` after it started."""

    def __init__(self, seconds: float) -> None:
        self.done_at = time.perf_counter() + seconds

    def wait(self) -> None:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


def _chunk(name: str, comms: int, compute: float, turns: ov.Turns, log: list, busy: list) -> None:
    """compute, then an all-to-all of 30 ms, `comms` times, then compute once more; `busy` catches two chunks
    computing at once."""
    for i in range(comms + 1):
        busy.append(name)
        assert len(busy) == 1, busy
        log.append((name, "compute", i))
        time.sleep(compute)
        busy.remove(name)
        if i < comms:
            turns.communicate(lambda: FakeWork(0.03), f"{name}{i}")


def test_chunks_take_turns_at_each_all_to_all_in_a_fixed_order():
    ov.take_stats()
    turns, log, busy = ov.Turns(), [], []
    t = time.perf_counter()
    turns.run(lambda: _chunk("f", 2, 0.04, turns, log, busy), lambda: _chunk("b", 3, 0.04, turns, log, busy))
    wall = time.perf_counter() - t
    # the issue order alternates while both run (the same on every rank: collectives match), then b alone
    assert turns.order == [(0, "f0"), (1, "b0"), (0, "f1"), (1, "b1"), (1, "b2")]
    assert [e[0] for e in log] == ["f", "b", "f", "b", "f", "b", "b"]
    stats = ov.take_stats()
    assert stats.overlapped_actions == 1 and stats.calls == stats.overlapped_calls == 5
    # each 30 ms transfer of a chunk ran while the other computed 40 ms (hidden), but b's last, with f done
    assert stats.hidden > 4 * 0.035 and stats.exposed < 0.045
    serial = 7 * 0.04 + 5 * 0.03  # one chunk after the other, every transfer waited for
    assert wall < serial - 0.08
    assert threading.active_count() < 10 and ov.current_turns() is None


def test_an_error_in_either_chunk_is_raised_and_the_other_finishes():
    turns, log, busy = ov.Turns(), [], []

    def broken() -> None:
        turns.communicate(lambda: FakeWork(0.01), "x")
        raise ValueError("chunk failed")

    with pytest.raises(ValueError, match="chunk failed"):
        turns.run(lambda: _chunk("f", 2, 0.01, turns, log, busy), broken)
    assert [e for e in log if e[0] == "f"] == [("f", "compute", 0), ("f", "compute", 1), ("f", "compute", 2)]
    with pytest.raises(ValueError, match="chunk failed"):  # the first chunk failing: the second still runs
        turns.run(broken, lambda: _chunk("b", 1, 0.01, turns, log, busy))
    assert log[-1] == ("b", "compute", 1)


def test_overlap_needs_dualpipev_with_expert_parallelism():
    assert ParallelConfig.parse("pp=2,ep=2,pp_schedule=dualpipev,overlap=true").overlap
    for spec in ("pp=2,ep=2,overlap=true", "pp=2,pp_schedule=dualpipev,overlap=true", "ep=2,overlap=true"):
        with pytest.raises(ConfigError, match=r"overlap=true .* needs pp > 1, pp_schedule=dualpipev and ep > 1"):
            ParallelConfig.parse(spec)
