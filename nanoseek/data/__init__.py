"""Pre-training data: byte-level BPE with DeepSeek's specials, corpus reading (the Python standard library by
default), Fill-in-the-Middle, memory-mapped token shards and packed, resumable batches.

    from nanoseek.data import prepare_corpus, TokenShard, PackedBatches
    info = prepare_corpus(None, Path("runs/data"), vocab_size=8192)       # stdlib -> tokenizer.json, train.bin, ...
    shard = TokenShard.open(Path("runs/data/train.bin"), info["tokenizer_hash"])
    x, y = PackedBatches(shard, batch_size=8, seq_len=512).next_batch()
"""

from .corpus import (
    CorpusStats,
    decode_counting,
    has_text,
    is_heldout,
    iter_documents,
    iter_jsonl,
    iter_keyed_documents,
    split_heldout,
    stdlib_root,
    stdlib_sources,
)
from .errors import DataError, MissingDataError
from .fim import apply_fim, fim_split, tokenize_documents
from .loader import PackedBatches, heldout_batches
from .prepare import prepare_corpus
from .shards import HEADER_SIZE, MAGIC, ShardError, ShardHeader, ShardWriter, TokenShard, read_header, write_shard
from .tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = [
    "HEADER_SIZE", "MAGIC", "SPECIAL_TOKENS", "CorpusStats", "DataError", "MissingDataError", "PackedBatches",
    "ShardError", "ShardHeader", "ShardWriter", "TokenShard", "Tokenizer", "apply_fim", "decode_counting", "fim_split",
    "has_text", "heldout_batches",
    "is_heldout", "iter_documents", "iter_jsonl", "iter_keyed_documents", "prepare_corpus", "read_header",
    "split_heldout", "stdlib_root", "stdlib_sources", "tokenize_documents", "train_tokenizer", "write_shard",
]
