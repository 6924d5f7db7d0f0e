import json
import random

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from nanoseek.data import SPECIAL_TOKENS, Tokenizer, apply_fim, train_tokenizer

BOS, EOS, PAD = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"]


def test_special_spellings():
    assert BOS == "<｜begin▁of▁sentence｜>" and EOS == "<｜end▁of▁sentence｜>" and PAD == "<｜▁pad▁｜>"
    assert SPECIAL_TOKENS["fim_hole"] == "<｜fim▁hole｜>" and SPECIAL_TOKENS["user"] == "<｜User｜>"


def test_train_save_load_round_trip(tok, tmp_path, unicode_code):
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.pad_id == 2 and (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (3, 4, 5)
    assert 300 < tok.vocab_size <= 512
    ids = tok.encode(unicode_code)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # nothing added
    assert tok.decode(ids) == unicode_code
    assert tok.decode(np.array(ids, dtype=np.uint16)) == tok.decode(torch.tensor(ids)) == unicode_code
    assert len(ids) < len(unicode_code.encode())  # merges were learnt

    path = tmp_path / "tokenizer.json"
    tok.save(path)
    raw = path.read_text(encoding="utf-8")
    assert "<｜begin▁of▁sentence｜>" in raw and "<｜fim▁hole｜>" in raw  # stored as real characters, not escapes
    back = Tokenizer.load(path)
    assert back.hash == tok.hash and len(back.hash) >= 16
    assert back.special_ids == tok.special_ids and back.vocab_size == tok.vocab_size
    assert back.encode(unicode_code) == ids
    assert back.decode(back.encode(unicode_code)) == unicode_code
    assert Tokenizer.load(tmp_path).hash == tok.hash  # a directory holding tokenizer.json


def test_specials_in_text(tok):
    text = "a <think>b</think> <｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    assert tok.special_ids["think"] in ids and tok.eos_id in ids
    plain = tok.encode(text, allow_special=False)
    assert set(plain).isdisjoint(tok.special_ids.values())
    assert tok.decode(plain) == text
    assert tok.decode([tok.bos_id, *tok.encode("x = 1"), tok.eos_id], skip_special=True) == "x = 1"
    assert tok.decode([tok.bos_id, *tok.encode("x")]) == BOS + "x"


def test_hash_tracks_content(tok, stdlib_texts):
    other = train_tokenizer(stdlib_texts[:3], vocab_size=400, show_progress=False)
    assert other.hash != tok.hash
    assert train_tokenizer(stdlib_texts[:3], vocab_size=400, show_progress=False).hash == other.hash


def test_vocab_too_small():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def _deepseek_style_tokenizer_json(path, texts):
    """A tokenizer.json shaped like the DeepSeek-V3/R1 release: BPE model, Split-regex + ByteLevel pre-tokenizer
    sequence, bos/eos/pad at ids 0-2, and the other specials added far above the BPE vocabulary (no <answer>)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\s*[\r\n]+|\s+(?!\S)|\s+| ?[^\s\p{L}\p{N}]+| ?\p{L}+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens([f"<｜place▁holder▁no▁{i}｜>" for i in range(700 - n)])
    tok.add_special_tokens([SPECIAL_TOKENS[k] for k in ("fim_hole", "fim_begin", "fim_end", "user", "assistant")]
                           + ["<|EOT|>"])
    tok.add_tokens([SPECIAL_TOKENS["think"], SPECIAL_TOKENS["think_end"]])  # R1: added, but not special
    tok.save(str(path))
    return tok


def test_deepseek_structured_tokenizer_loads_unchanged(tmp_path, stdlib_texts, unicode_code):
    path = tmp_path / "tokenizer.json"
    _deepseek_style_tokenizer_json(path, stdlib_texts[:6])
    before = path.read_bytes()
    spec = json.loads(before)
    assert [t["id"] for t in spec["added_tokens"][:3]] == [0, 1, 2]
    assert spec["pre_tokenizer"]["type"] == "Sequence" and spec["model"]["type"] == "BPE"

    ref = tokenizers.Tokenizer.from_file(str(path))
    ours = Tokenizer.load(path)
    assert path.read_bytes() == before  # loading never rewrites the file
    for text in (unicode_code, stdlib_texts[0][:3000], "x = 1234567 + 89\n", "<｜User｜>hi<｜Assistant｜><think>"):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids
        ref_ids = ref.encode(text, add_special_tokens=False).ids
        assert ours.decode(ours.encode(text)) == ref.decode(ref_ids, skip_special_tokens=False)
        assert ours.decode(ours.encode(text), skip_special=True) == ref.decode(ref_ids, skip_special_tokens=True)
    assert ref.encode("x", add_special_tokens=True).ids[0] == 0  # its template adds bos; our encode does not

    assert ours.bos_id == 0 and ours.eos_id == 1 and ours.pad_id == 2
    for name in ("fim_begin", "fim_hole", "fim_end", "user", "assistant", "think", "think_end"):
        assert ours.special_ids[name] == ref.token_to_id(SPECIAL_TOKENS[name]) >= 700
    assert ours.fim_begin_id == ref.token_to_id("<｜fim▁begin｜>")
    assert "answer" not in ours.special_ids and "answer_end" not in ours.special_ids
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)

    out = tmp_path / "copy" / "tokenizer.json"
    ours.save(out)  # saving keeps the structure: same canonical JSON, same hash, same behaviour
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(ref.to_str())
    assert Tokenizer.load(out).hash == ours.hash

    ids = apply_fim("print('hello')\n", random.Random(0), ours, rate=1.0)
    assert ids[0] == ours.fim_begin_id and ids[-1] == 1


def test_non_deepseek_tokenizer(tmp_path, stdlib_texts):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stdlib_texts[:2], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                  show_progress=False))
    tok.save(str(tmp_path / "gpt2ish.json"))
    ours = Tokenizer.load(tmp_path / "gpt2ish.json")
    assert ours.eos_id == ours.bos_id == 0 and ours.pad_id is None and ours.fim_begin_id is None

    bare = tokenizers.Tokenizer(models.BPE())
    bare.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=30, show_progress=False))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="end-of-sentence"):
        Tokenizer.load(tmp_path / "bare.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
