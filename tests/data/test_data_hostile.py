"""Corpora that cannot be trained on: binary and NUL-only files are no documents, and an empty folder, a missing path or
a corpus too small to train or evaluate on end with one line naming the path (DataError), not a traceback."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.data import CorpusStats, DataError, iter_documents, prepare_corpus


def cli_error(capsys, argv) -> str:
    """The line a failing command ends with (after any progress bars), and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = e.value.code if isinstance(e.value.code, str) else err.strip().splitlines()[-1]
    assert line.startswith("nanoseek: ") and "\n" not in line, err
    return line


def test_nul_and_binary_files_are_not_documents(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 1000)
    (tmp_path / "utf16.txt").write_text("hello", encoding="utf-16")  # NUL bytes: not UTF-8 text
    (tmp_path / "controls.md").write_text("\x01\x02 \x1b\n\x7f")
    (tmp_path / "recs.jsonl").write_text(json.dumps({"text": "\u0000\u0000"}) + "\n" + json.dumps({"text": "ok"}))
    (tmp_path / "real.py").write_text("x = 1\n")
    stats = CorpusStats()
    assert list(iter_documents([tmp_path], stats)) == ["x = 1\n", "ok"]  # real.py, recs.jsonl
    assert stats.skipped_binary == 2 and stats.skipped_empty == 2  # controls.md and the NUL record
    with pytest.raises(DataError, match=r"nul: no text in 1 file\(s\) \(0 empty, 1 binary\)"):
        (tmp_path / "nul").mkdir()
        (tmp_path / "nul" / "z.txt").write_bytes(b"\0" * 64)
        prepare_corpus([tmp_path / "nul"], tmp_path / "out", vocab_size=300, progress=False)
    assert not (tmp_path / "out" / "data.json").exists()


def test_empty_folder_missing_path_and_all_held_out(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    (empty / ".git" / "HEAD.txt").write_text("hidden")
    with pytest.raises(DataError, match=f"{empty}: no corpus files"):
        prepare_corpus([empty], tmp_path / "d1", vocab_size=300, progress=False)
    with pytest.raises(FileNotFoundError):  # a MissingDataError is a FileNotFoundError too
        prepare_corpus([tmp_path / "nope"], tmp_path / "d2", vocab_size=300, progress=False)
    held = tmp_path / "held"
    held.mkdir()
    (held / "1.txt").write_text("def f(): pass\n" * 20)  # "1.txt" falls in the 5% held out by name
    with pytest.raises(DataError, match=f"{held}: all 1 document.* held out .* add more documents"):
        prepare_corpus([held], tmp_path / "d3", vocab_size=300, progress=False)
    # the command line: one line each
    out = str(tmp_path / "run")
    assert f"{empty}: no corpus files" in cli_error(capsys, ["pretrain", "--data", str(empty), "--out", out])
    assert "nope: no such file or folder" in cli_error(capsys, ["pretrain", "--data", str(tmp_path / "nope"),
                                                                "--out", out])


def test_tiny_corpus_in_a_speedrun_is_one_line(tmp_path, capsys):
    """One small document: the training split has it, nothing is held out; the speedrun (which calls the trainer
    directly, not through the pretrain command's error handling) ends with one line too."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.txt").write_text(" ".join(["alpha", "beta", "gamma", "delta"] * 300))
    err = cli_error(capsys, ["speedrun", "--data", str(one), "--out", str(tmp_path / "sr"), "--steps", "1",
                             "--no-post-train", "--set", "seq_len=32", "--set", "batch_size=2",
                             "--set", "micro_batch_size=2", "--set", "hidden_size=64",
                             "--set", "num_hidden_layers=2"])
    assert "val.bin: 0 held-out tokens are too few for one evaluation window" in err
