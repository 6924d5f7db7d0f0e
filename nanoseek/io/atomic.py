"""Atomic file writes: write to a temporary name beside the target, fsync, rename over it, fsync the directory.

A reader (or a crash) sees the old file or the new one, never a half-written one. Every writer of tokenizers,
token shards, data manifests, checkpoints and traces goes through these helpers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """fsync the finished temporary file `tmp` and rename it to `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


class AtomicFile:
    """An open temporary file that becomes `path` on `commit()` and disappears on `abort()` (for writers that
    keep the file open across calls; `atomic_open` is the context-manager form)."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(self.path)
        self.file: IO[Any] = open(self.tmp, mode, **open_kwargs)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`with atomic_open(p) as f: f.write(...)`: `p` appears complete when the block ends without an error;
    an error leaves `p` as it was."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    af = AtomicFile(path, mode, **open_kwargs)
    try:
        yield af.file
    except BaseException:
        af.abort()
        raise
    af.commit()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path for a library that writes files itself (safetensors' `save_file`); renamed to `path`
    (after an fsync) when the block ends without an error."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Replace directory `final` by the finished directory `tmp` (its files already fsynced)."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
