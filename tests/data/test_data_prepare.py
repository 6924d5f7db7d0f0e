import json

import pytest

from nanoseek.data import PackedBatches, Tokenizer, TokenShard, heldout_batches, iter_documents, prepare_corpus


def _split_docs(ids: list[int], eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in ids:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # every document ends in eos
    return docs


def test_prepare_stdlib_small_and_reuse(tmp_path, capsys):
    out = tmp_path / "data"
    info = prepare_corpus(None, out, vocab_size=512, max_chars=300_000, progress=False)
    assert not info["reused"]
    for name in ("tokenizer.json", "train.bin", "val.bin", "val_docs.jsonl", "data.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == ["data.json", "tokenizer.json", "tokenizer_config.json",
                                                       "train.bin", "val.bin", "val_docs.jsonl"]  # no temp files left

    tok = Tokenizer.load(out / "tokenizer.json")
    meta = json.loads((out / "data.json").read_text())
    assert meta == {k: v for k, v in info.items() if k != "reused"}
    assert meta["tokenizer_hash"] == tok.hash and meta["vocab_size"] == tok.vocab_size == 512
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert meta["stats"]["chars"] == 300_000 == meta["train"]["chars"] + meta["val"]["chars"]
    assert meta["val"]["chars"] == 15_000 and meta["stats"]["replaced_bytes"] == 0
    assert meta["seed"] == 0 and meta["fim_rate"] == 0.1 and meta["sources"][0].startswith("stdlib:")

    train = TokenShard.open(out / "train.bin", tok.hash)
    val = TokenShard.open(out / "val.bin", tok.hash)
    assert len(train) == meta["train"]["tokens"] > 50_000 and len(val) == meta["val"]["tokens"] > 2_000
    assert train.header.dtype == "uint16"
    train_ids = train.tokens.tolist()
    assert train_ids.count(tok.eos_id) == meta["train"]["documents"]
    assert train_ids.count(tok.fim_begin_id) == meta["train"]["fim_documents"]
    assert 0 not in train_ids  # no bos: documents are separated by eos only

    # val: plain documents (no FIM); val_docs.jsonl holds raw pieces of the same held-out text
    val_ids = val.tokens.tolist()
    assert tok.fim_begin_id not in val_ids
    val_texts = [tok.decode(d) for d in _split_docs(val_ids, tok.eos_id)]
    assert len(val_texts) == meta["val"]["documents"]
    records = [json.loads(line) for line in (out / "val_docs.jsonl").read_text().splitlines()]
    assert len(records) == meta["val_docs"] >= len(val_texts)
    assert all(0 < len(r["text"]) <= 4000 for r in records)
    n_docs = len({r["source"] for r in records})
    assert n_docs == len(val_texts) and [r["piece"] for r in records[:n_docs]] == [0] * n_docs  # round-robin
    first = [r for r in records if r["source"] == records[0]["source"]]
    assert val_texts[0].startswith("".join(r["text"] for r in first))

    # the trainer's view
    x, y = PackedBatches(train, batch_size=4, seq_len=64).next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 512
    assert len(heldout_batches(val, 2, 64, 4)) == 4

    capsys.readouterr()
    mtime = (out / "train.bin").stat().st_mtime_ns
    again = prepare_corpus(None, out, vocab_size=512, max_chars=300_000, progress=False)
    assert again["reused"] and "reusing" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert {k: v for k, v in again.items() if k != "reused"} == meta

    # another seed: redone, with the given tokenizer (not retrained); the held-out split stays a fixed function
    other = prepare_corpus(None, out, vocab_size=512, max_chars=300_000, seed=1, tokenizer=tok, progress=False)
    assert not other["reused"] and other["tokenizer_hash"] == tok.hash and other["train"] != meta["train"]


def test_prepare_user_sources(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}  # ✓\n"}) for i in range(120)]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "notes.md").write_bytes(b"# notes \xff\n" * 30)
    (src / "empty.txt").write_text("")
    out = tmp_path / "out"
    info = prepare_corpus([src], out, vocab_size=0, fim_rate=0.5, heldout_frac=0.2, tokenizer=tok, progress=False)
    assert info["stats"]["documents"] == 121 and info["stats"]["skipped_empty"] == 1
    assert info["stats"]["replaced_bytes"] == 30
    assert info["train"]["documents"] + info["val"]["documents"] == 121
    assert 10 < info["val"]["documents"] < 40 and info["train"]["fim_documents"] > 20
    val_ids = TokenShard.open(out / "val.bin", tok.hash).tokens.tolist()
    assert tok.fim_begin_id not in val_ids and val_ids.count(tok.eos_id) == info["val"]["documents"]  # no FIM
    records = [json.loads(line) for line in (out / "val_docs.jsonl").read_text().splitlines()]
    assert all(r["source"].startswith("docs.jsonl:") or r["source"] == "notes.md" for r in records)
    assert {r["text"] for r in records} <= set(iter_documents([src]))
    assert Tokenizer.load(out / "tokenizer.json").hash == tok.hash

    # editing a source invalidates the reuse
    assert prepare_corpus([src], out, 0, 0.5, heldout_frac=0.2, tokenizer=tok, progress=False)["reused"]
    (src / "extra.py").write_text("print('new')\n")
    redo = prepare_corpus([src], out, 0, 0.5, heldout_frac=0.2, tokenizer=tok, progress=False)
    assert not redo["reused"] and redo["stats"]["documents"] == 122


def test_prepare_named_stdlib_source_mixed_with_files(tmp_path, tok):
    """"stdlib" names the default corpus among other sources, read in the order given (a mix, e.g. arithmetic text
    before the standard library, is kept whole under a max_chars cap that cuts the library)."""
    docs = tmp_path / "maths.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(50)))
    a = prepare_corpus(None, tmp_path / "a", 0, tokenizer=tok, max_chars=40_000, progress=False)
    b = prepare_corpus(["stdlib"], tmp_path / "b", 0, tokenizer=tok, max_chars=40_000, progress=False)
    assert a["sources"] == b["sources"] and a["train"] == b["train"]
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    mix = prepare_corpus([docs, "stdlib"], tmp_path / "mix", 0, fim_rate=0.0, tokenizer=tok, max_chars=40_000,
                         progress=False)
    assert mix["sources"] == [str(docs.resolve()), a["sources"][0]]
    assert mix["stats"]["chars"] == 40_000 and mix["stats"]["documents"] > 50
    text = tok.decode(TokenShard.open(tmp_path / "mix" / "train.bin", tok.hash).tokens.tolist())
    held = {r["source"] for r in map(json.loads, (tmp_path / "mix" / "val_docs.jsonl").read_text().splitlines())}
    kept = [i for i in range(50) if f"maths.jsonl:{i + 1}" not in held]
    assert kept and all(f"{i} + {i} = {2 * i}" in text for i in kept) and "def " in text


def test_prepare_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare_corpus([bad], out, 512, tokenizer=tok, progress=False)
    assert not (out / "data.json").exists() and not (out / "train.bin").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp shards removed
    with pytest.raises(FileNotFoundError):
        prepare_corpus([tmp_path / "nothing"], out, 512, tokenizer=tok, progress=False)
