"""prepare_corpus: sources -> tokenizer.json, train.bin (with FIM), val.bin, val_docs.jsonl, data.json."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..io.atomic import atomic_write_text
from .corpus import (
    JSONL_EXTENSIONS,
    CorpusStats,
    is_heldout,
    read_documents,
    source_files,
    stdlib_root,
    stdlib_sources,
)
from .errors import DataError
from .fim import tokenize_documents
from .shards import ShardError, ShardWriter, TokenShard, shard_dtype
from .tokenizer import Tokenizer, train_tokenizer

FORMAT = 2  # 2: tokenizers trained with DeepSeek-V3's pre-tokenizer splits
STDLIB = "stdlib"  # the source name of the Python standard library (a folder of that name: "./stdlib")
VAL_DOCS = 200  # held-out text pieces kept raw in val_docs.jsonl (for FIM exact-match evaluation)
VAL_DOC_CHARS = 4000  # at most this many characters each
TOKENIZER_TRAIN_CHARS = 200_000_000  # BPE training sees at most this much of the training split
_BATCH_DOCS = 256


def _fingerprint(pairs: list[tuple[Path, str]]) -> str:
    h = hashlib.sha256()
    for path, key in pairs:
        st = path.stat()
        h.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _docs(pairs: list[tuple[Path, str]], frac: float, caps: dict[bool, int | None], stats: CorpusStats,
          text_field: str, bar: tqdm) -> Iterator[tuple[bool, str, str]]:
    """(held_out, key, text) in file order, each split capped at caps[held_out] characters (the document that
    crosses the cap is truncated; None = no cap). A plain file of a split that is already full is not read."""
    left = dict(caps)
    for path, key in pairs:
        bar.update(1)
        if all(v is not None and v <= 0 for v in left.values()):
            break
        if path.suffix.lower() not in JSONL_EXTENSIONS:
            cap = left[is_heldout(key, frac)]
            if cap is not None and cap <= 0:
                continue
        for k, text in read_documents(path, key, stats, text_field):
            held = is_heldout(k, frac)
            cap = left[held]
            if cap is not None:
                if cap <= 0:
                    continue
                text = text[:cap]
                left[held] = cap - len(text)
            stats.documents += 1
            stats.chars += len(text)
            yield held, k, text


def _pieces(text: str, size: int, limit: int) -> list[str]:
    """Up to `limit` consecutive pieces of at most `size` characters, cut after a newline where possible."""
    out, start = [], 0
    while start < len(text) and len(out) < limit:
        end = start + size
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        piece = text[start:end]
        if piece.strip():
            out.append(piece)
        start = end
    return out


def _reusable(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    meta = out_dir / "data.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("settings") != settings or not (out_dir / "val_docs.jsonl").is_file():
        return None
    try:
        if Tokenizer.load(out_dir / "tokenizer.json").hash != info["tokenizer_hash"]:
            return None
        for split in ("train", "val"):
            if len(TokenShard.open(out_dir / f"{split}.bin", info["tokenizer_hash"])) != info[split]["tokens"]:
                return None
    except (OSError, ValueError, KeyError):  # ShardError is a ValueError
        return None
    return info


def prepare_corpus(sources: list[str | Path] | None, out_dir: Path, vocab_size: int, fim_rate: float = 0.1,
                   seed: int = 0, heldout_frac: float = 0.05, tokenizer: Tokenizer | None = None,
                   max_chars: int | None = None, text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Tokenise a corpus into out_dir: tokenizer.json, train.bin (FIM at `fim_rate`, PSM), val.bin (no FIM),
    val_docs.jsonl (raw held-out text: the first VAL_DOCS held-out documents cut at line ends into pieces of at
    most VAL_DOC_CHARS characters; up to VAL_DOCS records taken round-robin: every document's first piece, then
    every second piece, ...) and data.json (settings, stats, token counts).

    `sources` None means the Python standard library (files in a seeded random order); so does the name "stdlib"
    among other sources (e.g. ["maths.jsonl", "stdlib"]: files are read in the order given). Documents are held out by
    a hash of their name (file path relative to its source folder, plus ':line' for JSONL), fixed across seeds.
    The tokenizer is trained on the training split unless one is given (then `vocab_size` is ignored).
    `max_chars` caps the corpus: (1 - heldout_frac) of it for training, the rest held out. Outputs made with the
    same settings (and unchanged source files) are reused. Returns the data.json content plus "reused"."""
    if not 0.0 <= fim_rate <= 1.0:
        raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate}")
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sources is None:
        sources = [STDLIB]
    elif isinstance(sources, (str, Path)):
        sources = [sources]
    pairs: list[tuple[Path, str]] = []
    source_names: list[str] = []
    for src in sources:
        if src == STDLIB:  # the named source: the standard library's files, in a seeded random order
            root = stdlib_root()
            files = [(p, p.relative_to(root).as_posix()) for p in stdlib_sources()]
            random.Random(seed).shuffle(files)
            pairs += files
            source_names.append(f"stdlib:{root}")
        else:
            pairs += source_files([src])
            source_names.append(str(Path(src).resolve()))
    if not pairs:
        raise DataError(f"{', '.join(source_names)}: no corpus files (folders are searched for text files by "
                        f"extension, e.g. .txt .md .py, and for JSONL .jsonl .ndjson; hidden files are skipped)")
    settings = {
        "format": FORMAT, "sources": source_names, "fingerprint": _fingerprint(pairs),
        "vocab_size": None if tokenizer is not None else vocab_size, "fim_rate": fim_rate, "seed": seed,
        "heldout_frac": heldout_frac, "max_chars": max_chars, "text_field": text_field,
        "tokenizer": tokenizer.hash if tokenizer is not None else None,
    }
    info = _reusable(out_dir, settings)
    if info is not None:
        print(f"prepare_corpus: reusing {out_dir} ({info['train']['tokens']:,} train / {info['val']['tokens']:,} "
              f"val tokens; same settings)")
        return {**info, "reused": True}
    (out_dir / "data.json").unlink(missing_ok=True)  # a half-written redo must never look complete

    if max_chars is None:
        caps: dict[bool, int | None] = {False: None, True: None}
    else:
        val_cap = round(max_chars * heldout_frac)
        caps = {False: max_chars - val_cap, True: val_cap}

    if tokenizer is None:
        train_caps: dict[bool, int | None] = {False: caps[False], True: 0}
        if train_caps[False] is None or train_caps[False] > TOKENIZER_TRAIN_CHARS:
            train_caps[False] = TOKENIZER_TRAIN_CHARS
        with tqdm(total=len(pairs), desc="reading for the tokenizer", unit="file", disable=not progress) as bar:
            texts = (t for _, _, t in _docs(pairs, heldout_frac, train_caps, CorpusStats(), text_field, bar))
            tokenizer = train_tokenizer(texts, vocab_size, show_progress=progress)
    tok = tokenizer
    tok.save(out_dir / "tokenizer.json")

    stats = CorpusStats()
    rng = random.Random(seed)
    counts = {split: {"documents": 0, "chars": 0, "tokens": 0} for split in ("train", "val")}
    counts["train"]["fim_documents"] = 0
    val_pieces: list[tuple[str, list[str]]] = []  # (key, pieces) of the first VAL_DOCS held-out documents
    writers = {False: ShardWriter(out_dir / "train.bin", tok.hash, tok.vocab_size),
               True: ShardWriter(out_dir / "val.bin", tok.hash, tok.vocab_size)}
    pending: dict[bool, list[str]] = {False: [], True: []}
    bar = tqdm(total=len(pairs), desc="tokenizing", unit="file", disable=not progress)

    def flush(held: bool) -> None:
        batch, pending[held] = pending[held], []
        c = counts["val" if held else "train"]
        # val: no FIM (rate 0, which draws from its own throwaway rng, leaving the training stream's untouched)
        stream = tokenize_documents(batch, tok, random.Random(0) if held else rng, 0.0 if held else fim_rate)
        for ids in stream:
            writers[held].write(ids)
            c["tokens"] += len(ids)
            if not held and tok.fim_begin_id is not None and ids[0] == tok.fim_begin_id:
                c["fim_documents"] += 1
        bar.set_postfix(train=f"{counts['train']['tokens']:,}", val=f"{counts['val']['tokens']:,}", refresh=False)

    try:
        for held, key, text in _docs(pairs, heldout_frac, caps, stats, text_field, bar):
            c = counts["val" if held else "train"]
            c["documents"] += 1
            c["chars"] += len(text)
            if held and len(val_pieces) < VAL_DOCS:
                val_pieces.append((key, _pieces(text, VAL_DOC_CHARS, VAL_DOCS)))
            pending[held].append(text)
            if len(pending[held]) >= _BATCH_DOCS:
                flush(held)
        flush(False)
        flush(True)
        headers = {held: w.close() for held, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    if counts["train"]["tokens"] == 0:
        where = ", ".join(source_names)
        if not stats.documents:
            raise DataError(f"{where}: no text in {stats.files} file(s) ({stats.skipped_empty} empty, "
                            f"{stats.skipped_binary} binary)")
        raise DataError(f"{where}: all {stats.documents} document(s) are held out for evaluation, none is left for "
                        f"training (a fraction {heldout_frac} of the documents is held out, chosen by a hash of their "
                        f"names): add more documents")
    val_docs = [json.dumps({"source": key, "piece": i, "text": pieces[i]}, ensure_ascii=False)
                for i in range(VAL_DOCS) for key, pieces in val_pieces if i < len(pieces)][:VAL_DOCS]
    atomic_write_text(out_dir / "val_docs.jsonl", "".join(line + "\n" for line in val_docs))

    info = {
        "format": FORMAT,
        "settings": settings,
        "sources": source_names,
        "seed": seed,
        "fim_rate": fim_rate,
        "heldout_frac": heldout_frac,
        "max_chars": max_chars,
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids,
        "dtype": shard_dtype(tok.vocab_size),
        "stats": asdict(stats),
        "train": counts["train"],
        "val": counts["val"],
        "val_docs": len(val_docs),
        "files": {"tokenizer": "tokenizer.json", "train": "train.bin", "val": "val.bin",
                  "val_docs": "val_docs.jsonl"},
        "python": sys.version.split()[0],
    }
    for held, split in ((False, "train"), (True, "val")):
        if headers[held].count != info[split]["tokens"]:
            raise ShardError(f"{split}.bin: wrote {headers[held].count} tokens but counted {info[split]['tokens']}")
    atomic_write_text(out_dir / "data.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    if progress:
        print(f"prepare_corpus: {out_dir}: {stats.documents:,} documents ({stats.skipped_empty} empty and "
              f"{stats.skipped_binary} binary skipped, {stats.replaced_bytes} bytes replaced), "
              f"{info['train']['tokens']:,} train / {info['val']['tokens']:,} val tokens, vocab {tok.vocab_size}")
    return {**info, "reused": False}
