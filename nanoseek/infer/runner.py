"""The engine thread: one background thread owns an `Engine` and steps it while any request is queued or running;
any other thread submits, waits for, streams and cancels requests. No HTTP here: the server (server.py) and the
terminal commands (commands.py: `generate`, `chat`) both sit on top of it.

    with EngineRunner(engine) as runner:              # start(); stop() on exit
        req = runner.submit(prompt_ids, SamplingParams(max_new_tokens=64))
        for piece in runner.stream(req):              # text as it becomes stable (stop strings never leak)
            print(piece, end="", flush=True)
        other = runner.result(runner.submit(ids, params))  # blocks until it finished
        runner.cancel(req)                            # any thread; the engine frees the slot at its next step

Requests submitted from several threads share the engine's decode forwards (continuous batching). Only the
engine's public API is used: submit / step / has_work / abort_all and the Request fields.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from .engine import Engine, Request, SamplingParams

log = logging.getLogger("nanoseek.runner")
WAIT_SLICE_S = 0.1  # waits are cut into slices this long: Ctrl-C stays responsive and a dead thread is noticed


class RunnerClosed(RuntimeError):
    """The runner is not accepting requests (not started yet, or stopping)."""


class EngineRunner:
    """Owns the engine: one thread calls `engine.step()` while there is work and sleeps on an Event otherwise.

    `submit`, `cancel`, `result` and `stream` are thread-safe; `stop` cancels what is still queued or running, lets
    the engine release it and joins the thread. A request whose own sampling or detokenising raises ends with
    finish_reason 'error' alone (the engine isolates it); if a whole step raises (a forward: a bug, out of memory),
    every live request is finished with 'error' and the engine's slots are cleared, so the runner keeps serving."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._lock = threading.Lock()  # submit vs stop
        self._changed = threading.Condition()  # notified after every update of any request (result / stream wait)
        self._live: dict[int, Request] = {}  # submitted, not yet finished (dict ops are atomic under the GIL)
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EngineRunner:
        if not self.running:
            self._accepting, self._stopping = True, False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running, let the engine release it, and join the thread."""
        self.cancel_all()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s", timeout)

    def __enter__(self) -> EngineRunner:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request; `on_update(req)` runs on the engine thread after every step that changed it (keep it
        short and take no lock the engine could be waiting for). ValueError from the engine for a bad prompt;
        RunnerClosed when the runner is not running."""
        def notify(req: Request) -> None:  # engine thread, possibly under the engine's lock: no runner._lock here
            if req.finished:
                self._live.pop(req.id, None)
            if on_update is not None:
                on_update(req)
            with self._changed:
                self._changed.notify_all()

        with self._lock:
            if not self._accepting:
                raise RunnerClosed("the engine runner is not accepting requests (not started or shutting down)")
            req = self.engine.submit(prompt_ids, params, on_update=notify)
            self._live[req.id] = req
        if req.finished:  # it may have finished before it was recorded
            self._live.pop(req.id, None)
        self._wake.set()
        return req

    def cancel_all(self) -> None:
        """Stop accepting requests (submit raises RunnerClosed) and cancel every live one; the engine thread goes
        on, ending them with finish_reason 'cancelled' at its next step (e.g. a server's shutdown grace is over)."""
        with self._lock:
            self._accepting = False
        for req in self.live():
            req.cancelled = True
        self._wake.set()

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step (any thread; a no-op once it finished)."""
        if not req.finished:
            req.cancelled = True
            self._wake.set()

    def live(self) -> list[Request]:
        """The requests submitted here that have not finished yet."""
        return list(self._live.copy().values())

    def load(self) -> tuple[int, int]:
        """(running, waiting): requests holding a cache slot and requests queued for one."""
        slots, waiting = getattr(self.engine, "slots", None), getattr(self.engine, "waiting", None)
        if slots is None or waiting is None:  # an engine without these internals: all live requests count as running
            return len(self._live), 0
        return sum(s is not None for s in list(slots)), len(waiting)

    def result(self, req: Request, timeout: float | None = None) -> Request:
        """Wait until `req` finished and return it (its finish_reason says how: 'stop', 'length', 'cancelled',
        'error'). TimeoutError after `timeout` seconds; RuntimeError if the engine thread is gone first. An
        interrupted wait (Ctrl-C) leaves the request running: cancel it if its answer is no longer wanted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not req.finished:
                self._wait(req, deadline)
        return req

    def stream(self, req: Request, timeout: float | None = None) -> Iterator[str]:
        """The text of `req` in pieces, as it becomes stable (never a partial UTF-8 character or the start of a
        stop string); the pieces join to `req.text`. Ends when the request finished (see its finish_reason).
        Leaving early (break, an exception in the caller's loop, Ctrl-C during a wait) cancels the request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stops = req.params.stop
        sent = 0
        done = False
        try:
            while True:
                with self._changed:
                    while True:
                        finished = req.finished  # read before the text: finish_reason is set after the final text
                        text = req.stable_text(stops)
                        if finished or len(text) > sent:
                            break
                        self._wait(req, deadline)
                if len(text) > sent:
                    piece, sent = text[sent:], len(text)
                    yield piece
                if finished:
                    done = True
                    return
        finally:
            if not done:
                self.cancel(req)

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Request:
        """Submit and wait: the finished request."""
        return self.result(self.submit(prompt_ids, params), timeout)

    def _wait(self, req: Request, deadline: float | None) -> None:
        """One slice of waiting for an update (the caller holds self._changed)."""
        if not self.running and not req.finished:
            raise RuntimeError("the engine thread is not running; the request cannot finish")
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("the request did not finish in time")
        self._changed.wait(WAIT_SLICE_S if left is None else min(WAIT_SLICE_S, left))

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                if self.engine.has_work():
                    try:
                        self.engine.step()
                    except Exception:  # a bug or out-of-memory: fail the requests in flight, keep serving
                        log.exception("engine step failed")
                        self._fail_all()
                    continue
                if self._stopping:
                    return
                self._wake.wait(timeout=1.0)
                self._wake.clear()
        finally:
            with self._changed:  # waiters notice that the thread is gone
                self._changed.notify_all()

    def _fail_all(self) -> None:
        self.engine.abort_all("error")
        for req in self.live():
            if req.finish_reason is None:
                req.finish_reason = "error"
            if req.on_update is not None:
                req.on_update(req)
        self._live.clear()
