"""The run loop shared by pre-training / SFT (`Trainer`) and GRPO (`GRPOTrainer`): a number of steps or a time
budget, held-out evaluation and checkpoint cadence, SIGINT/SIGTERM -> checkpoint and stop, resume from the newest
valid checkpoint, the metrics JSONL and a progress bar.

Step-driven runs end after a number of optimizer steps, and the schedules (V3 §4.2) are fractions of that number.

Time-budgeted runs (`TimeBudget`) end when the next step, plus the final evaluation and checkpoint, would no longer fit
in the budget. Their schedules follow the fraction of the budget spent, `progress = spent / budget`, taken where a step
is expected to end and against the budget less the time kept for the final evaluation and checkpoint (see
nanoseek.train.schedule), so the run fills its budget and its schedules reach their ends whatever a step costs: a
machine that is busy for the first minutes makes the first steps slow, not the run short.

Resume of a time-budgeted run: every checkpoint stores the budget, the seconds spent, the schedules' progress and the
latest step's duration when it was written. A resumed run continues from that progress with the remaining seconds (a
different budget given at the resume keeps the seconds spent and rescales the progress); the steps after the
checkpoint that the interruption lost are done again with the time they took, and the pause before the resume does
not count. The progress at which each step falls depends on how long steps take, so a time-budgeted run is not
bit-exact across a resume (a step-driven run is).
"""

from __future__ import annotations

import math
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from ..parallel import ParallelContext, clip_grad_norm
from .checkpoint import (
    check_fresh_out_dir,
    restore_optimizer,
    save_sharded_checkpoint,
    save_training_checkpoint,
    set_rng_state,
)
from .metrics import MetricsLog

TIME_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}"


@dataclass
class TimeBudget:
    """A wall-clock budget of `seconds`. `eval_every` / `ckpt_every`: a held-out evaluation / a checkpoint each time
    this fraction of the budget has been spent (None: every `eval_every` / `ckpt_every` steps of the run's config)."""

    seconds: float
    eval_every: float | None = None
    ckpt_every: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not (
                math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"a time budget must be a positive number of seconds, got {self.seconds!r}")
        self.seconds = float(self.seconds)
        for name in ("eval_every", "ckpt_every"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"{name} of a time budget is a fraction of it in (0, 1], got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimeBudget:
        return cls(d["seconds"], d.get("eval_every"), d.get("ckpt_every"))


class _Clock:
    """Seconds charged to the budget: `base` (spent before this run, e.g. up to a resumed checkpoint) plus the wall
    time since `start`, less the time of work the budget does not count."""

    def __init__(self, base: float) -> None:
        self.base, self.start, self.excluded = base, time.perf_counter(), 0.0

    def now(self) -> float:
        return self.base + time.perf_counter() - self.start - self.excluded


def _mark(every: float | None, progress: float | None) -> int | None:
    """How many multiples of `every` `progress` has passed (None without a fractional cadence)."""
    if every is None or progress is None:
        return None
    return math.floor(progress / every + 1e-9)


class RunLoop:
    """Run / save / resume / signal / metrics / progress-bar code shared by `Trainer` and `GRPOTrainer`.

    A subclass calls `_init_loop` first in its constructor, `_restore` with a resumed checkpoint, writes checkpoints
    through `_checkpoint`, and implements `train_step` (a metrics record with "step"), `_eval_record`, `save`,
    `_cadence` and `_postfix`; `_run_loop(end)` then runs it.
    """

    desc = "train"
    budget_counts_overhead = True  # held-out evaluation and checkpoints count against a time budget
    evaluate_first = False  # a held-out evaluation before the first step of a fresh run

    step: int
    metrics: MetricsLog

    def _init_loop(self, out_dir: Path, budget: TimeBudget | None, progress: bool,
                   parallel: ParallelContext | None = None, resume: bool | None = None) -> None:
        """`parallel`: this process is a rank of a distributed run (nanoseek.parallel): rank 0 alone shows progress,
        checkpoints are sharded, and every rank acts on the same decisions.

        `resume`: whether the run will resume from out_dir's checkpoints. A fresh run (False) refuses, here, an
        out_dir that already holds checkpoints (RunDirError), before anything in it is written. None defers that
        check to the start of the run, where it applies unless a checkpoint was restored by then."""
        self.step = 0
        self.ckpt_root = Path(out_dir) / "checkpoints"
        # the run's identity, recorded in its checkpoints (a resumed run takes its checkpoint's): pruning removes
        # only this run's own older checkpoints
        self.run_id: str | None = uuid.uuid4().hex
        self._out_checked = False
        if resume is False:
            self._check_fresh_out()
        self.budget = budget
        self.par = parallel
        self.is_main = parallel is None or parallel.is_main
        self.world, self.rank = (parallel.world_size, parallel.rank) if parallel is not None else (1, 0)
        self.progress = progress and self.is_main
        self.bar_file: IO[str] | None = None  # where the progress bar goes (None: stderr)
        self.spent = 0.0  # seconds charged to the budget so far (kept across resumes through the checkpoints)
        self._clock: _Clock | None = None
        self._last_step_s = 0.0  # duration of the latest step: the estimate of the next one
        self._progress = 0.0  # the latest schedule_progress()
        self._overhead_s = {"eval": 0.0, "save": 0.0}  # durations of the latest evaluation and checkpoint
        self._evaluated_at: int | None = None
        self._saved_at: int | None = None
        self._last_ckpt: Path | None = None
        self._stop = False
        self.sharded = parallel is not None  # a distributed run: checkpoints through torch.distributed.checkpoint
        self.state_keys: set[str] | None = None  # a pipeline rank: the model state-dict names it holds
        # distributed runs: every rank acts on the same decisions (stop, out of time, evaluate, checkpoint) and follows
        # the same schedule progress (rank 0's)
        self._agree: Callable[[bool], bool] = parallel.agree if parallel is not None else (lambda flag: flag)
        self._same_float: Callable[[float], float] = (parallel.broadcast_float if parallel is not None
                                                      else (lambda x: x))

    # ---- sums and gradients over the ranks of a distributed run (this process alone otherwise) ----------------
    def _sum(self, *values: float) -> list[float]:
        """The values summed over the ranks."""
        if self.par is None:
            return list(values)
        return self.par.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def _clip_grads(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (over all ranks' shards); the norm before clipping."""
        if self.par is not None:
            return clip_grad_norm(model, max_norm, self.par)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    # ---- hooks ---------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self) -> Path:
        raise NotImplementedError

    def _eval_record(self) -> dict[str, Any]:
        """A held-out evaluation as a metrics record ({"kind": "eval", "step": ..., ...})."""
        raise NotImplementedError

    def _cadence(self) -> tuple[int, int, int]:
        """(evaluate every, checkpoint every, total) steps."""
        raise NotImplementedError

    def _postfix(self, rec: dict[str, Any]) -> dict[str, str]:
        return {}

    def _after_step(self, rec: dict[str, Any], seconds: float) -> None:
        """Check / complete a train record (called before it is logged)."""

    def _log_due(self, end: int) -> bool:
        return True

    # ---- the budget --------------------------------------------------------------------------------------
    def spent_seconds(self) -> float:
        return self._clock.now() if self._clock is not None else self.spent

    def _reserve(self) -> float:
        """Seconds kept for the final evaluation and checkpoint (as long as the latest ones), where they count."""
        if not self.budget_counts_overhead:
            return 0.0
        return self._overhead_s["eval"] + self._overhead_s["save"]

    def budget_progress(self, ahead: float = 0.0) -> float | None:
        """Fraction of the time budget spent (None for a step-driven run), `ahead` seconds from now, measured against
        the budget less the time kept for the final evaluation and checkpoint so that it reaches 1 when training
        ends."""
        if self.budget is None:
            return None
        horizon = max(self.budget.seconds - self._reserve(), 0.5 * self.budget.seconds)
        return min(1.0, max(0.0, (self.spent_seconds() + ahead) / horizon))

    def schedule_progress(self) -> float | None:
        """Where a time-budgeted run's schedules are for the coming step: the budget_progress where the step is
        expected to end (as long as the latest step), never decreasing. None for a step-driven run."""
        p = self.budget_progress(ahead=self._last_step_s)
        if p is None:
            return None
        self._progress = max(self._progress, self._same_float(p))
        return self._progress

    def _fits_next_step(self) -> bool:
        """Whether the next step (as long as the latest one) and, where they count, the final evaluation and
        checkpoint still fit in the budget. The first step of a run (no estimate yet) runs while time is left."""
        if self.budget is None:
            return True
        spent = self.spent_seconds()
        if spent >= self.budget.seconds:
            return False
        return self._last_step_s == 0.0 or spent + self._last_step_s + self._reserve() <= self.budget.seconds

    def _budget_state(self) -> dict[str, Any] | None:
        if self.budget is None:
            return None
        return {**self.budget.to_dict(), "spent": self.spent_seconds(), "progress": self._progress,
                "step_seconds": self._last_step_s}

    # ---- checkpoints and resume -----------------------------------------------------------------------------
    def _check_fresh_out(self) -> None:
        """A fresh run refuses an output directory that holds checkpoints of an earlier run (once per run)."""
        if not self._out_checked:
            self._out_checked = True
            check_fresh_out_dir(self.ckpt_root)

    def _checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    keep_last: int, extra_files: list[Path] | None = None) -> Path:
        """Write checkpoint `self.step` with `state` plus the time budget (and the seconds spent so far)."""
        state = {**state, "run_id": self.run_id}
        budget = self._budget_state()
        if budget is not None:
            state = {**state, "budget": budget}
        if self.sharded:
            path = save_sharded_checkpoint(self.ckpt_root, self.step, model, optimizer,  # type: ignore[arg-type]
                                           state, keep_last, extra_files=extra_files, keys=self.state_keys)
        else:
            path = save_training_checkpoint(self.ckpt_root, self.step, model, optimizer,  # type: ignore[arg-type]
                                            state, keep_last, extra_files=extra_files)
        self._saved_at, self._last_ckpt = self.step, path
        return path

    def _restore(self, path: Path, optimizer: torch.optim.Optimizer, opt_tensors: dict[str, torch.Tensor],
                 state: dict[str, Any], rng: dict[str, torch.Tensor], inherit_budget: bool) -> None:
        """Optimizer, step, RNG and time budget of a checkpoint from `load_latest`. A checkpoint's budget is taken
        over where `inherit_budget` and the caller gave none; a budget given by the caller replaces the stored one
        (the seconds spent stay)."""
        restore_optimizer(optimizer, opt_tensors, state["optimizer"])
        self._restore_run(path, state, rng, inherit_budget)

    def _restore_run(self, path: Path, state: dict[str, Any], rng: dict[str, torch.Tensor],
                     inherit_budget: bool) -> None:
        """Step, RNG, run id and time budget of a checkpoint (the optimizer is restored by the caller)."""
        self.step = state["step"]
        self.run_id = state.get("run_id")  # None: a checkpoint written before run ids; its run goes on without one
        self._out_checked = True
        set_rng_state(rng, state["rng"])
        stored = state.get("budget")
        if stored is not None:
            if self.budget is None and inherit_budget:
                self.budget = TimeBudget.from_dict(stored)
            self.spent = float(stored["spent"])
            self._last_step_s = float(stored.get("step_seconds", 0.0))
            if self.budget is not None and self.budget.seconds == stored["seconds"]:
                self._progress = float(stored.get("progress", 0.0))
        self._saved_at, self._last_ckpt = self.step, path
        if self.progress:
            print(f"resumed from {path} at step {self.step}"
                  + (f" ({self.spent:.0f} of {self.budget.seconds:.0f} s spent)" if self.budget else ""))

    # ---- signals -------------------------------------------------------------------------------------------
    def _handle_signal(self, signum: int, frame: Any) -> None:
        self._stop = True

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM set the stop flag: the loop finishes its step, checkpoints and returns."""
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ---- the loop ------------------------------------------------------------------------------------------
    def _timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self._overhead_s[kind] = dt
        if not self.budget_counts_overhead and self._clock is not None:
            self._clock.excluded += dt
        return out

    def _evaluate_and_log(self) -> dict[str, Any]:
        rec = self._timed("eval", self._eval_record)
        self.metrics.write(rec)
        self._evaluated_at = self.step
        return rec

    def _make_bar(self, end: int) -> tqdm:
        if self.budget is None:
            return tqdm(total=end, initial=self.step, disable=not self.progress, desc=self.desc, unit="step",
                        file=self.bar_file)
        # a time-budgeted run: seconds spent / budget, the step in the postfix (a step count has no meaning here)
        return tqdm(total=self.budget.seconds, initial=min(self.spent, self.budget.seconds), unit="s",
                    bar_format=TIME_BAR_FORMAT, disable=not self.progress, desc=self.desc, file=self.bar_file)

    def _due(self, kind: str, every_steps: int, every_frac: float | None, total: int) -> bool:
        """Step `total`, every `every_steps` steps, or (under a time budget with a fractional cadence) each time
        the progress passes a further multiple of `every_frac`."""
        mark = _mark(every_frac, self.budget_progress())
        if mark is not None:
            due = mark > self._marks[kind]
            self._marks[kind] = max(mark, self._marks[kind])
            return self._agree(due) or self.step == total
        return self.step == total or self.step % every_steps == 0

    def _run_loop(self, end: int) -> tuple[list[dict[str, Any]], bool]:
        """Train until step `end`, the time budget, or a signal. Returns (the records of this run, interrupted)."""
        self._check_fresh_out()
        records: list[dict[str, Any]] = []
        eval_every, ckpt_every, total = self._cadence()
        eval_frac = self.budget.eval_every if self.budget is not None else None
        ckpt_frac = self.budget.ckpt_every if self.budget is not None else None
        self._clock = _Clock(self.spent)
        p = self.budget_progress()
        self._marks = {"eval": _mark(eval_frac, p) or 0, "ckpt": _mark(ckpt_frac, p) or 0}
        bar = self._make_bar(end)
        steps_run, out_of_time = 0, False
        try:
            with self._signals():
                if self.evaluate_first and self.step == 0:
                    records.append(self._evaluate_and_log())
                while self.step < end:
                    self._stop = self._agree(self._stop)
                    if self._stop:
                        break
                    if self._agree(not self._fits_next_step()):
                        out_of_time = True
                        break
                    t = time.perf_counter()
                    rec = self.train_step()
                    dt = time.perf_counter() - t
                    self._last_step_s = dt
                    steps_run += 1
                    self._after_step(rec, dt)
                    if self._log_due(end):
                        self.metrics.write(rec)
                    records.append(rec)
                    if self._due("eval", eval_every, eval_frac, total):
                        records.append(self._evaluate_and_log())
                    if self._due("ckpt", ckpt_every, ckpt_frac, total):
                        self._timed("save", self.save)
                    self._update_bar(bar, rec)
                self._stop = self._agree(self._stop)  # a signal during the last step
                if out_of_time and steps_run and self._evaluated_at != self.step:
                    records.append(self._evaluate_and_log())
                if (out_of_time and steps_run or self._stop) and self._saved_at != self.step:
                    self._timed("save", self.save)
                if self._stop:
                    bar.write(f"interrupted: checkpoint written to {self._last_ckpt}")
                self._update_bar(bar, None)
        finally:
            bar.close()
            self.spent = self._clock.now()
            self._clock = None
        return records, self._stop

    def _update_bar(self, bar: tqdm, rec: dict[str, Any] | None) -> None:
        if self.budget is None:
            if rec is not None:
                bar.update(1)
                bar.set_postfix(self._postfix(rec))
            return
        bar.update(min(self.spent_seconds(), self.budget.seconds) - bar.n)
        if rec is not None:
            bar.set_postfix({"step": str(self.step), **self._postfix(rec)})
