"""Shared inputs of the tests/infer suite (a plain module, not a conftest.py: other test folders import `conftest`
by name, which a second conftest.py here would shadow)."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator

import torch
import uvicorn
from conftest import tiny_config

from nanoseek.data import Tokenizer, stdlib_sources, train_tokenizer
from nanoseek.model import Transformer

_FILES = {"abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py",
          "operator.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py"}


@functools.cache
def small_tokenizer() -> Tokenizer:
    """A 512-token BPE with DeepSeek's specials, trained on a few standard-library files (about a second)."""
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources() if p.name in _FILES]
    return train_tokenizer(texts, vocab_size=512, show_progress=False)


def tiny_model_and_tokenizer() -> tuple[Transformer, Tokenizer]:
    """The servers' model: conftest's tiny DeepSeek-V3 (seed 0, eval mode) over `small_tokenizer`'s vocabulary."""
    tok = small_tokenizer()
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tok.vocab_size)).eval(), tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout_graceful_shutdown: float | None = None) -> Iterator[tuple[uvicorn.Server, int]]:
    """Serve a `build_app` app (`server.make_server`) on a free loopback port in a background thread; shut it down
    on exit."""
    from nanoseek.infer.server import make_server

    port = free_port()
    server = make_server(app, "127.0.0.1", port, log_level="warning",
                         timeout_graceful_shutdown=timeout_graceful_shutdown)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "the server did not shut down"


def wait_until(cond, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def run_threads(fn: Callable[[int], None], n: int, timeout: float) -> list[BaseException]:
    """Run fn(0) .. fn(n-1) in n threads at once (e.g. concurrent clients) and join them; returns what they raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
