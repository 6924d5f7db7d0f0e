"""Memory-mapped token shards: a 64-byte header, then the token ids.

Header (little endian): magic b"NSEEKTOK" | u32 version | u32 dtype code (1 = uint16, 2 = uint32) | u64 token count
| u64 tokenizer vocab size | 32 bytes tokenizer hash (ASCII, NUL padded)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from ..io.atomic import AtomicFile
from .errors import DataError, MissingDataError

MAGIC = b"NSEEKTOK"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = _HEADER.size  # 64
_DTYPES = {1: "uint16", 2: "uint32"}
_CODES = {v: k for k, v in _DTYPES.items()}


class ShardError(DataError):
    """A token shard that is corrupted, truncated, or made with a different tokenizer."""


@dataclass
class ShardHeader:
    dtype: str  # "uint16" or "uint32"
    count: int  # number of tokens
    tokenizer_hash: str
    vocab_size: int = 0

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def pack(self) -> bytes:
        h = self.tokenizer_hash.encode("ascii")
        if len(h) > 32:
            raise ValueError(f"tokenizer hash {self.tokenizer_hash!r} is longer than 32 bytes")
        return _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.count, self.vocab_size, h)


def shard_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} out of range")
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Streams token ids into a shard; the file appears (atomically) only on a successful `close`."""

    def __init__(self, path: Path, tokenizer_hash: str, vocab_size: int) -> None:
        self.path = Path(path)
        self.header = ShardHeader(shard_dtype(vocab_size), 0, tokenizer_hash, vocab_size)
        self.header.pack()  # validates the hash early
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = AtomicFile(self.path, "wb")
        self._f = self._out.file
        self._f.write(b"\0" * HEADER_SIZE)
        self._np_dtype = np.dtype(self.header.dtype).newbyteorder("<")

    def write(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.header.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.header.vocab_size})")
        self._f.write(arr.astype(self._np_dtype).tobytes())
        self.header.count += int(arr.size)

    def close(self) -> ShardHeader:
        f = self._f
        f.seek(0)
        f.write(self.header.pack())
        self._out.commit()
        return self.header

    def abort(self) -> None:
        self._out.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: Path, token_iter: Iterable[list[int]], tokenizer_hash: str, vocab_size: int) -> ShardHeader:
    """Write the concatenation of `token_iter` as a shard at `path` (atomically)."""
    with ShardWriter(path, tokenizer_hash, vocab_size) as w:
        for ids in token_iter:
            w.write(ids)
    return w.header


def read_header(path: Path) -> ShardHeader:
    """The header of a shard, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: no such token shard")
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise ShardError(f"{path}: {size} bytes is too small for a token shard header ({HEADER_SIZE} bytes)")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    magic, version, code, count, vocab, h = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a nanoseek token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardError(f"{path}: token shard version {version} is not supported (this nanoseek reads {VERSION})")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code} in the header")
    header = ShardHeader(_DTYPES[code], count, h.rstrip(b"\0").decode("ascii", "replace"), vocab)
    expected = HEADER_SIZE + count * header.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: header says {count} {header.dtype} tokens ({expected} bytes in all) but the file has {size} "
            f"bytes; the shard is {'truncated' if size < expected else 'corrupted (trailing bytes)'}; prepare it again"
        )
    return header


class TokenShard:
    """A read-only, memory-mapped token shard; `tokens` is a 1-D numpy array (memmap)."""

    def __init__(self, path: Path, header: ShardHeader, tokens: np.ndarray) -> None:
        self.path, self.header, self.tokens = path, header, tokens

    @classmethod
    def open(cls, path: Path, tokenizer_hash: str | None = None) -> TokenShard:
        """Open a shard; ShardError on bad magic, a header/size mismatch or (when given) a different tokenizer."""
        path = Path(path)
        header = read_header(path)
        if tokenizer_hash is not None and header.tokenizer_hash != tokenizer_hash:
            raise ShardError(
                f"{path}: made with tokenizer {header.tokenizer_hash} but tokenizer {tokenizer_hash} is in use; "
                f"re-tokenise the corpus with the current tokenizer"
            )
        dtype = np.dtype(header.dtype).newbyteorder("<")
        if header.count == 0:
            tokens = np.zeros(0, dtype=dtype)
        else:
            tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))
        return cls(path, header, tokens)

    def __len__(self) -> int:
        return self.header.count

    def __repr__(self) -> str:
        return f"TokenShard({self.path}, {self.header.count} {self.header.dtype} tokens)"
