"""`nanoseek generate` and `nanoseek chat` on a saved checkpoint with its tokenizer."""

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.cli import main
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.infer.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    tok = train_tokenizer(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = nanoseek.load(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256))
    d = tmp_path_factory.mktemp("ckpt")
    nanoseek.save(model, d)
    tok.save(d / "tokenizer.json")
    return d, model, tok


def test_generate_streams_the_engines_text(checkpoint, capsys):
    d, model, tok = checkpoint
    assert main(["generate", str(d), "import os", "--max-tokens", "12"]) == 0
    out = capsys.readouterr()
    ids = [tok.bos_id] + tok.encode("import os", allow_special=False)
    ref = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=12))[0]
    assert out.out == ref.text + "\n"
    assert f"{len(ids)} prompt + {len(ref.output_ids)} generated tokens" in out.err
    # speculative decoding and the naive cache print the same greedy text
    for extra in (["--speculative"], ["--cache", "naive"]):
        assert main(["generate", str(d), "import os", "--max-tokens", "12", *extra]) == 0
        assert capsys.readouterr().out == ref.text + "\n"


def test_generate_chat_template_and_errors(checkpoint, capsys, tmp_path):
    d, _, _ = checkpoint
    assert main(["generate", str(d), "hello", "--chat", "--system", "be brief", "--max-tokens", "4",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    assert "prompt +" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["generate", str(tmp_path), "x"])
    (tmp_path / "c").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "c" / f).write_bytes((d / f).read_bytes())
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["generate", str(tmp_path / "c"), "x"])
    with pytest.raises(SystemExit, match="context"):
        main(["generate", str(d), "word " * 400, "--max-tokens", "4"])


def test_chat_repl(checkpoint, capsys, monkeypatch):
    d, _, _ = checkpoint
    lines = iter(["hi there", "/reset", "", "second question", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(d), "--max-tokens", "5", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("nanoseek chat:")
    assert out.err.count("generated tokens") == 2
