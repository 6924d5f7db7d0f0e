import json
import random
import sysconfig
from pathlib import Path

import pytest

from nanoseek.data import (
    CorpusStats,
    decode_counting,
    is_heldout,
    iter_documents,
    iter_keyed_documents,
    split_heldout,
    stdlib_root,
    stdlib_sources,
)


def test_stdlib_sources():
    paths = stdlib_sources()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_root() == root
    assert len(paths) > 200 and paths == sorted(paths)
    assert root / "os.py" in paths and root / "json" / "decoder.py" in paths
    for p in paths:
        rel = p.relative_to(root).parts
        assert p.suffix == ".py" and p.is_file()
        assert not {"site-packages", "test", "tests", "idle_test", "pydoc_data"} & set(rel[:-1]), p


def test_split_is_fixed_and_disjoint(tmp_path):
    paths = stdlib_sources()
    root = stdlib_root()
    train, held = split_heldout(paths, 0.05, root)
    assert (train, held) == split_heldout(list(paths), 0.05, root)  # deterministic
    assert not set(train) & set(held) and sorted(train + held) == paths
    assert 0.02 < len(held) / len(paths) < 0.1
    # membership depends only on the path itself (relative to root), not on the rest of the list or its order
    subset = random.Random(1).sample(paths, 100)
    sub_train, sub_held = split_heldout(subset, 0.05, root)
    assert set(sub_held) == set(held) & set(subset) and set(sub_train) == set(train) & set(subset)
    moved = [tmp_path / p.relative_to(root) for p in paths]
    assert [p.relative_to(tmp_path) for p in split_heldout(moved, 0.05, tmp_path)[1]] == [
        p.relative_to(root) for p in held]
    # pinned: changing the hash would silently move documents between train and validation
    keys = [f"pkg/mod_{i}.py" for i in range(200)]
    assert [k for k in keys if is_heldout(k, 0.05)] == [
        "pkg/mod_4.py", "pkg/mod_23.py", "pkg/mod_25.py", "pkg/mod_47.py", "pkg/mod_55.py", "pkg/mod_88.py",
        "pkg/mod_147.py", "pkg/mod_188.py"]
    assert split_heldout(paths, 0.0, root) == (paths, []) and split_heldout(paths, 1.0, root) == ([], paths)
    with pytest.raises(ValueError):
        split_heldout(paths, 1.5)


def test_decode_counting_matches_replace():
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        data += "ü€😀".encode()[: rng.randrange(10)]
        text, bad = decode_counting(data)
        assert text == data.decode("utf-8", errors="replace")
        assert bad == 0 if text == data.decode("utf-8", errors="ignore") else bad > 0
    assert decode_counting(b"a\xffb\xc3") == ("a\ufffdb\ufffd", 2)
    assert decode_counting(b"\xe2\x82") == ("\ufffd", 2)  # one truncated sequence of two bytes
    assert decode_counting("\ufeffhi".encode()) == ("hi", 0)  # BOM dropped


def _write_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.py").write_text("print('héllo')\n", encoding="utf-8")
    (root / "pkg" / "bad.txt").write_bytes(b"ok \xff\xfe end \xc3")
    (root / "pkg" / "empty.md").write_bytes(b"")
    (root / "pkg" / "sub" / "blank.rs").write_text("  \n\t\n")
    (root / "pkg" / "sub" / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "pkg" / "image.png").write_bytes(b"\x89PNG\r\n")  # not text-like: ignored inside folders
    (root / ".git" / "HEAD.txt").write_text("ref: x\n")  # hidden: ignored
    records = [{"text": "first record"}, {"text": ""}, {"text": "third ✓", "meta": 1}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (root / "pkg" / "data.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n", encoding="utf-8")


def test_iter_documents_folder(tmp_path):
    _write_tree(tmp_path)
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path], stats))
    assert docs == ["print('héllo')\n", "ok \ufffd\ufffd end \ufffd", "first record", "third ✓",
                    "int main(void) { return 0; }\n"]  # sorted by relative path: a.py, pkg/bad.txt, ...
    assert stats.replaced_bytes == 3
    assert stats.skipped_empty == 3  # empty.md, blank.rs and the empty JSONL record
    assert stats.files == 6 and stats.documents == 5 and stats.chars == sum(map(len, docs))

    keyed = dict(iter_keyed_documents([tmp_path]))
    assert keyed["pkg/data.jsonl:1"] == "first record" and keyed["pkg/data.jsonl:4"] == "third ✓"
    assert keyed["pkg/sub/main.c"].startswith("int main")

    # an explicitly named file is read whatever its extension; counters accumulate over calls
    assert list(iter_documents([tmp_path / "pkg" / "image.png"], stats)) == ["\ufffdPNG\r\n"]
    assert stats.files == 7 and stats.replaced_bytes == 4


def test_jsonl_fields_and_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"content": "alpha"}\n{"content": "beta", "text": "no"}\n')
    assert list(iter_documents([good], text_field="content")) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no 'text' field \(found: content\)"):
        list(iter_documents([good]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    it = iter_documents([bad])
    assert next(it) == "ok"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        next(it)

    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"typed\.jsonl:1: field 'text' is int"):
        list(iter_documents([typed]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_documents([tmp_path / "nope"]))


def test_unreadable_bytes_in_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a\xffb"}\n')
    stats = CorpusStats()
    assert list(iter_documents([str(p)], stats)) == ["a\ufffdb"]
    assert stats.replaced_bytes == 1 and stats.documents == 1


def test_stdlib_reads_cleanly():
    stats = CorpusStats()
    docs = list(iter_documents(stdlib_sources()[:40], stats))
    assert len(docs) + stats.skipped_empty == 40 and stats.replaced_bytes == 0
