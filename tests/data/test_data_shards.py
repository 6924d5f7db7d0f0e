import numpy as np
import pytest

from nanoseek.data import HEADER_SIZE, MAGIC, ShardError, ShardHeader, TokenShard, read_header, write_shard

HASH = "0123456789abcdef"


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 512, size=n).tolist() for n in (5, 0, 17, 1, 300)]


def test_round_trip_uint16(tmp_path):
    path = tmp_path / "train.bin"
    docs = _docs()
    header = write_shard(path, iter(docs), HASH, vocab_size=512)
    flat = [t for d in docs for t in d]
    assert header == ShardHeader("uint16", len(flat), HASH, 512)
    assert path.stat().st_size == HEADER_SIZE + 2 * len(flat) and HEADER_SIZE == 64
    assert path.read_bytes()[:8] == MAGIC
    shard = TokenShard.open(path, HASH)
    assert isinstance(shard.tokens, np.memmap) and shard.tokens.dtype == np.uint16
    assert len(shard) == len(flat) and shard.tokens.tolist() == flat
    assert shard.header == header and TokenShard.open(path).header.tokenizer_hash == HASH
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]  # no temp files left behind


def test_round_trip_uint32(tmp_path):
    path = tmp_path / "big.bin"
    ids = [0, 65535, 65536, 129279]
    header = write_shard(path, [ids], HASH, vocab_size=129280)
    assert header.dtype == "uint32"
    assert TokenShard.open(path).tokens.tolist() == ids
    assert write_shard(tmp_path / "edge.bin", [[65535]], HASH, vocab_size=65536).dtype == "uint16"


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", [], HASH, vocab_size=10)
    shard = TokenShard.open(tmp_path / "e.bin", HASH)
    assert len(shard) == 0 and shard.tokens.size == 0


def test_truncated_and_padded(tmp_path):
    path = tmp_path / "t.bin"
    write_shard(path, _docs(), HASH, vocab_size=512)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ShardError, match=r"header says 323 uint16 tokens .* truncated"):
        TokenShard.open(path)
    path.write_bytes(data + b"\0\0")
    with pytest.raises(ShardError, match="trailing bytes"):
        TokenShard.open(path)
    path.write_bytes(data[:20])
    with pytest.raises(ShardError, match="too small"):
        TokenShard.open(path)
    with pytest.raises(FileNotFoundError):
        TokenShard.open(tmp_path / "missing.bin")


def test_corrupted_magic_and_version(tmp_path):
    path = tmp_path / "m.bin"
    write_shard(path, _docs(), HASH, vocab_size=512)
    data = bytearray(path.read_bytes())
    bad = bytes(data)
    path.write_bytes(b"GARBAGE!" + bad[8:])
    with pytest.raises(ShardError, match="not a nanoseek token shard"):
        TokenShard.open(path)
    data[8] = 99  # version
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="version 99"):
        read_header(path)
    data[8], data[12] = 1, 7  # dtype code
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="dtype code 7"):
        read_header(path)
    assert issubclass(ShardError, ValueError)


def test_tokenizer_hash_mismatch(tmp_path):
    path = tmp_path / "h.bin"
    write_shard(path, _docs(), HASH, vocab_size=512)
    with pytest.raises(ShardError, match=f"made with tokenizer {HASH} but tokenizer ffffffffffffffff is in use"):
        TokenShard.open(path, "ffffffffffffffff")


def test_bad_ids_leave_nothing_behind(tmp_path):
    path = tmp_path / "x.bin"
    write_shard(path, [[1, 2, 3]], HASH, vocab_size=512)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(path, [[1, 2], [511, 512]], HASH, vocab_size=512)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(path, [[-1]], HASH, vocab_size=512)
    assert path.read_bytes() == before  # the old shard is untouched (atomic replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with pytest.raises(ValueError, match="longer than 32"):
        write_shard(tmp_path / "y.bin", [[1]], "f" * 33, vocab_size=512)
