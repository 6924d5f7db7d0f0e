"""Fill-in-the-Middle (prefix-suffix-middle order) and document tokenisation for packing."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from .tokenizer import Tokenizer


def fim_split(text: str, rng: random.Random, rate: float) -> tuple[str, str, str] | None:
    """(prefix, middle, suffix) with probability `rate`, else None. The two cut points are uniform over the
    character positions 0..len(text). Always draws the same random numbers for a given outcome, so a stream of
    documents transforms identically however it is batched."""
    if rng.random() >= rate:
        return None
    n = len(text)
    i, j = sorted((rng.randint(0, n), rng.randint(0, n)))
    return text[:i], text[i:j], text[j:]


def _check_fim(tok: Tokenizer) -> tuple[int, int, int]:
    if tok.fim_begin_id is None or tok.fim_hole_id is None or tok.fim_end_id is None:
        raise ValueError("FIM needs <｜fim▁begin｜>, <｜fim▁hole｜> and <｜fim▁end｜>, which this tokenizer lacks")
    return tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id


def _assemble(tok: Tokenizer, plain: list[int] | None, psm: tuple[list[int], list[int], list[int]] | None,
              ) -> list[int]:
    if psm is None:
        assert plain is not None
        return plain + [tok.eos_id]
    begin, hole, end = _check_fim(tok)
    prefix, middle, suffix = psm
    return [begin, *prefix, hole, *suffix, end, *middle, tok.eos_id]


def apply_fim(text: str, rng: random.Random, tok: Tokenizer, rate: float = 0.1) -> list[int]:
    """Token ids of one document, ending in eos. With probability `rate` it is rearranged as
    `<fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>` (PSM), else it is `text <eos>`.
    Special-token strings inside `text` are encoded as ordinary text."""
    if rate > 0:
        _check_fim(tok)
    parts = fim_split(text, rng, rate)
    if parts is None:
        return _assemble(tok, tok.encode(text, allow_special=False), None)
    prefix, middle, suffix = parts
    enc = tok.encode_batch([prefix, middle, suffix], allow_special=False)
    return _assemble(tok, None, (enc[0], enc[1], enc[2]))


def tokenize_documents(texts: Iterable[str], tok: Tokenizer, rng: random.Random | None = None, rate: float = 0.0,
                       batch_docs: int = 256) -> Iterator[list[int]]:
    """`apply_fim` over a stream of documents (same ids, same random draws), encoding in parallel batches."""
    if rate > 0:
        _check_fim(tok)
        if rng is None:
            raise ValueError("a FIM rate > 0 needs an rng")
    rng = rng if rng is not None else random.Random(0)

    def flush(batch: list[tuple[str, ...]]) -> Iterator[list[int]]:
        flat = [piece for pieces in batch for piece in pieces]
        enc = tok.encode_batch(flat, allow_special=False) if flat else []
        k = 0
        for pieces in batch:
            if len(pieces) == 1:
                yield _assemble(tok, enc[k], None)
            else:
                yield _assemble(tok, None, (enc[k], enc[k + 1], enc[k + 2]))
            k += len(pieces)

    batch: list[tuple[str, ...]] = []
    for text in texts:
        parts = fim_split(text, rng, rate)
        batch.append((text,) if parts is None else parts)
        if len(batch) >= batch_docs:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)
