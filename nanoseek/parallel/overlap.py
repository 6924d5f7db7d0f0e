"""DualPipe's overlap of expert-parallel all-to-alls with computation (V3 §3.2.1), on torch's DualPipeV schedule.

In its steady state ScheduleDualPipeV issues OVERLAP_F_B actions: a forward chunk of one micro-batch beside a full
backward chunk of another. Run one after the other (torch's default), every all-to-all of either chunk leaves the
rank idle until its peers answer. `overlap_f_b` runs the two chunks in two threads that take turns (`Turns`): a
chunk computes until it starts an all-to-all, hands the turn to the other chunk while the transfer is in flight, and
takes the turn back when the other chunk starts one of its own (or finishes):

    forward  mb i   attn, gate ─[dispatch]─────────────── experts ─[combine]──────────── ...
    backward mb j              └─ compute ──[its a2a]┘              └─ compute ──[a2a]┘

Only the thread holding the turn runs Python or issues collectives, and turns pass only at all-to-alls, so every
rank of an ep group (the same pipeline stage, the same actions) issues its collectives in the same order, as
collectives require. Departure from V3: V3 splits each chunk by hand into attention / dispatch / MLP / combine and
gives communication its own SMs (20 of 132); here the chunks alternate at each all-to-all on the same device, and
what is hidden is whatever the other chunk computes while a transfer is in flight (measured: `STATS`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

_local = threading.local()  # the Turns of the thread, inside an overlapped action


@dataclass
class OverlapStats:
    """The all-to-alls of this process since the last `take_stats()`: how many (and how many inside overlapped
    actions), the seconds a chunk waited for a transfer with nothing else computing (`exposed`: a plain call's whole
    blocking time; an overlapped call's wait after it had the turn back) and the seconds overlapped calls were in
    flight while the other chunk computed (`hidden`). The fraction of all-to-all time hidden: 1 - exposed with
    overlap / exposed without, over the same steps (benchmarks/bench_overlap.py)."""

    calls: int = 0
    overlapped_calls: int = 0
    exposed: float = 0.0
    hidden: float = 0.0
    overlapped_actions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STATS = OverlapStats()


def take_stats() -> OverlapStats:
    """The statistics so far, and reset them."""
    global STATS
    s, STATS = STATS, OverlapStats()
    return s


class Turns:
    """Two callables run in two threads, one at a time, passing the turn at each `communicate` (see the module
    docstring). Exceptions in either are raised by `run` after both ended."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._turn: int | None = None  # the index (0, 1) of the thread holding the turn
        self._alive = [False, False]
        self.order: list[tuple[int, str]] = []  # (thread, label) of the last run's all-to-alls, in issue order

    def run(self, first: Callable[[], None], second: Callable[[], None]) -> None:
        """first() and second() in turns, first starting; returns when both have ended."""
        errors: list[BaseException] = []
        self.order = []
        self._alive = [True, True]
        self._turn = 0
        STATS.overlapped_actions += 1

        def body(i: int, fn: Callable[[], None]) -> None:
            _local.turns, _local.index = self, i
            try:
                self._wait_turn(i)
                fn()
            except BaseException as e:  # noqa: B036 -- re-raised by run() in the calling thread
                errors.append(e)
            finally:
                _local.turns = None
                with self._cv:
                    self._alive[i] = False
                    self._turn = 1 - i
                    self._cv.notify_all()

        other = threading.Thread(target=body, args=(1, second), name="nanoseek-overlap", daemon=True)
        other.start()
        body(0, first)
        other.join()
        if errors:
            raise errors[0]

    def _wait_turn(self, i: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == i or not self._alive[1 - i])
            self._turn = i

    def _pass_turn(self, i: int) -> None:
        with self._cv:
            if self._alive[1 - i]:
                self._turn = 1 - i
                self._cv.notify_all()

    def communicate(self, start: Callable[[], dist.Work], label: str = "") -> None:
        """start() issues an async collective (returns its Work): hand the turn over while it is in flight, then
        take it back and wait for the collective."""
        i = _local.index
        work = start()
        self.order.append((i, label))
        t0 = time.perf_counter()
        self._pass_turn(i)
        self._wait_turn(i)
        t1 = time.perf_counter()
        work.wait()
        t2 = time.perf_counter()
        STATS.calls += 1
        STATS.overlapped_calls += 1
        STATS.hidden += t1 - t0
        STATS.exposed += t2 - t1


def current_turns() -> Turns | None:
    """The Turns this thread runs under (inside an overlapped action), else None."""
    return getattr(_local, "turns", None)


def all_to_all(out, inp, out_splits: list[int] | None, in_splits: list[int] | None, group: dist.ProcessGroup,
               label: str = "") -> None:
    """dist.all_to_all_single, handing the turn over while it is in flight when called inside an overlapped action
    (see `Turns`); a plain blocking call elsewhere."""
    turns = current_turns()
    if turns is None:
        t = time.perf_counter()
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        STATS.calls += 1
        STATS.exposed += time.perf_counter() - t
        return
    turns.communicate(lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True),
                      label)


def overlap_f_b(turns: Turns) -> Callable[[Any, Any], None]:
    """The OVERLAP_F_B function for `_PipelineScheduleRuntime.register_custom_function`: the action's forward and
    full-backward sub-actions as torch's runtime performs them (receives waited, the loss computed on the last
    stage, inputs handed to the adjacent stage of this rank), run in `turns`, the forward first."""
    from torch.distributed.pipelining.schedules import _wait_batch_p2p

    def run(action, ctx) -> None:
        sched = ctx.schedule_ref
        stages = {s.stage_index: s for s in sched._stages}
        fwd, bwd = action.sub_actions

        def forward() -> None:
            s, mb = fwd.stage_index, fwd.microbatch_index
            stage = stages[s]
            sched._assert_unsharded(stage)
            if not stage.is_first and s - 1 not in stages:
                _wait_batch_p2p(sched.fwd_recv_ops.pop((s, mb)))
            out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
            sched._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
            if s + 1 in stages:
                stages[s + 1].set_local_fwd_input(out, mb)

        def backward() -> None:
            s, mb = bwd.stage_index, bwd.microbatch_index
            stage = stages[s]
            sched._assert_unsharded(stage)
            if not stage.is_last and s + 1 not in stages:
                _wait_batch_p2p(sched.bwd_recv_ops.pop((s, mb)))
            loss = sched._maybe_get_loss(stage, mb)
            sched.backward_counter[s] += 1
            last = sched.backward_counter[s] == sched._n_microbatches
            stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
            if s - 1 in stages:
                stages[s - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

        turns.run(forward, backward)

    return run
