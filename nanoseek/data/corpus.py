"""Corpus sources: the Python standard library (the embedded default) and user files, folders and JSONL."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, MissingDataError

# Files picked up when a folder is given (explicitly named files are always read, whatever their extension).
TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh",
    ".rs", ".go", ".java", ".kt", ".scala", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".swift", ".m",
    ".cs", ".lua", ".pl", ".r", ".jl", ".hs", ".ml", ".sh", ".bash", ".zsh", ".sql", ".html", ".htm", ".css",
    ".xml", ".json", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".csv", ".tsv",
})
JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson"})
_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
# a document needs one character that is neither white space nor a control character (NUL padding is not text)
_CONTENT_RE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]")
_STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                             "pydoc_data"})  # pydoc_data: generated, ~0.7M chars of prose in one file


@dataclass
class CorpusStats:
    """Counters filled in while reading a corpus."""

    files: int = 0  # files opened (including empty ones)
    documents: int = 0  # documents yielded
    skipped_empty: int = 0  # files or JSONL records with no text (nothing but white space / control characters)
    skipped_binary: int = 0  # plain files holding NUL bytes (binary data, or text in UTF-16/32)
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    chars: int = 0  # characters yielded


def stdlib_root() -> Path:
    """The interpreter's standard-library folder (sysconfig 'stdlib')."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, without site-packages, test folders and pydoc_data; sorted."""
    root = stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        if _STDLIB_EXCLUDE.isdisjoint(p.relative_to(root).parts[:-1]) and p.is_file():
            out.append(p)
    return sorted(out)


def _key(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def is_heldout(key: str, frac: float) -> bool:
    """Whether the document named `key` is held out: a fixed function of the key (sha256), not of any seed."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < frac * 2**64


def split_heldout(paths: list[Path], frac: float = 0.05, root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, heldout): a path is held out by the hash of its posix path relative to `root` (as given when root is
    None or not a parent), so the split is fixed across runs, machines and changes to the rest of the list."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"heldout frac must be in [0, 1], got {frac}")
    train, held = [], []
    for p in paths:
        (held if is_heldout(_key(Path(p), root), frac) else train).append(p)
    return train, held


def has_text(text: str) -> bool:
    """Whether `text` holds a character other than white space and control characters (NUL padding, ...)."""
    return _CONTENT_RE.search(text) is not None


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD for each invalid sequence; also the number of bytes replaced. A BOM is dropped."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts: list[str] = []
    bad = pos = 0
    view = memoryview(data)
    while True:
        try:
            parts.append(bytes(view[pos:]).decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            parts.append(bytes(view[pos:pos + e.start]).decode("utf-8"))
            parts.append("\ufffd")
            bad += e.end - e.start
            pos += e.end
    return "".join(parts), bad


def _expand(source: str | Path) -> Iterator[tuple[Path, str]]:
    """(file, key) for a source: a file (key = its name) or a folder (text-like files, recursive, sorted; key = the
    path relative to the folder). Hidden files and folders are skipped inside folders."""
    src = Path(source)
    if src.is_file():
        yield src, src.name
    elif src.is_dir():
        files = []
        for p in src.rglob("*"):
            rel = p.relative_to(src)
            if any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts):
                continue
            suffix = p.suffix.lower()
            if (suffix in TEXT_EXTENSIONS or suffix in JSONL_EXTENSIONS) and p.is_file():
                files.append((rel.as_posix(), p))
        for rel, p in sorted(files):
            yield p, rel
    else:
        raise MissingDataError(f"corpus source {source}: no such file or folder")


def source_files(sources: list[str | Path]) -> list[tuple[Path, str]]:
    """Every (file, key) the sources expand to, in reading order."""
    return [fk for s in sources for fk in _expand(s)]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-empty line of a UTF-8 JSONL file (gzip-compressed when it ends in
    .gz); DataError (a ValueError) naming the file and line for one that is not JSON, or the file when it is not
    UTF-8 (or not gzip)."""
    lineno = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                yield lineno, value
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (after line {lineno}: {e.reason})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: not a complete gzip file ({e})") from None


def _jsonl_records(path: Path, key: str, stats: CorpusStats, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line, bad = decode_counting(raw)
            stats.replaced_bytes += bad
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no {text_field!r} field (found: {keys})")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            if not has_text(text):
                stats.skipped_empty += 1
                continue
            yield f"{key}:{lineno}", text


def read_documents(path: Path, key: str, stats: CorpusStats, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) of the documents in one file (one for a text file, one per record for JSONL). Counts the file,
    replaced bytes and skipped empty or binary documents in `stats` (documents and chars are left to the caller).
    A plain file holding NUL bytes is binary (or UTF-16/32 text) and is skipped; so is a document with no text
    (nothing but white space and control characters)."""
    stats.files += 1
    if path.suffix.lower() in JSONL_EXTENSIONS:
        yield from _jsonl_records(path, key, stats, text_field)
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if b"\0" in data:
        stats.skipped_binary += 1
        return
    text, bad = decode_counting(data)
    stats.replaced_bytes += bad
    if not has_text(text):
        stats.skipped_empty += 1
        return
    yield key, text


def iter_keyed_documents(sources: list[str | Path], stats: CorpusStats | None = None,
                         text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) for every document; key names the file (relative to its source folder), plus ':line' in JSONL."""
    stats = stats if stats is not None else CorpusStats()
    for path, key in source_files(sources):
        for k, text in read_documents(path, key, stats, text_field):
            stats.documents += 1
            stats.chars += len(text)
            yield k, text


def iter_documents(sources: list[str | Path], stats: CorpusStats | None = None,
                   text_field: str = "text") -> Iterator[str]:
    """Document texts from files and folders (one document per file) and JSONL files (one per record's
    `text_field`). Undecodable bytes become U+FFFD and are counted; empty documents and binary files are skipped and
    counted; a malformed JSONL line, or one without a string `text_field`, raises DataError naming file:line; a
    missing source MissingDataError (a FileNotFoundError too)."""
    for _, text in iter_keyed_documents(sources, stats, text_field):
        yield text
