import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.data import Tokenizer, apply_fim, fim_split, tokenize_documents


def _parts(tok, ids):
    """(prefix, middle, suffix) decoded from a PSM sequence, checking its structure."""
    b, h, e = tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id
    assert ids.count(b) == ids.count(h) == ids.count(e) == 1
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id and ids[0] == b
    ih, ie = ids.index(h), ids.index(e)
    assert 0 < ih < ie < len(ids) - 1
    return tok.decode(ids[1:ih]), tok.decode(ids[ie + 1:-1]), tok.decode(ids[ih + 1:ie])


def test_fim_rate_one_is_psm(tok, stdlib_texts, unicode_code):
    for seed, text in enumerate([unicode_code, stdlib_texts[0][:2000], "x", "", "héllo wörld 🚀🚀"]):
        ids = apply_fim(text, random.Random(seed), tok, rate=1.0)
        prefix, middle, suffix = _parts(tok, ids)
        assert prefix + middle + suffix == text
        # each part is exactly the tokenizer's own encoding of that text
        expected = [tok.fim_begin_id, *tok.encode(prefix), tok.fim_hole_id, *tok.encode(suffix), tok.fim_end_id,
                    *tok.encode(middle), tok.eos_id]
        assert ids == expected


def test_fim_rate_zero_is_plain(tok, unicode_code):
    rng = random.Random(0)
    for _ in range(20):
        assert apply_fim(unicode_code, rng, tok, rate=0.0) == tok.encode(unicode_code) + [tok.eos_id]


def test_fim_empirical_rate_and_uniform_cuts(tok):
    rng = random.Random(123)
    doc = "abcdefghij" * 10
    n_fim, prefix_frac, middle_frac = 0, 0.0, 0.0
    for _ in range(3000):
        ids = apply_fim(doc, rng, tok)  # default rate 0.1
        if ids[0] == tok.fim_begin_id:
            n_fim += 1
            prefix, middle, _ = _parts(tok, ids)
            prefix_frac += len(prefix) / len(doc)
            middle_frac += len(middle) / len(doc)
        else:
            assert ids == tok.encode(doc) + [tok.eos_id]
    assert 0.08 < n_fim / 3000 < 0.12
    # two uniform cut points: E[min] = 1/3 of the text before the middle, E[|difference|] = 1/3 in the middle
    assert abs(prefix_frac / n_fim - 1 / 3) < 0.06 and abs(middle_frac / n_fim - 1 / 3) < 0.06


def test_fim_split_is_character_level():
    rng = random.Random(5)
    cuts = set()
    for _ in range(500):
        parts = fim_split("日本語🚀", rng, 1.0)
        assert "".join(parts) == "日本語🚀"
        cuts.add(len(parts[0]))
    assert cuts == {0, 1, 2, 3, 4}


def test_special_strings_in_documents_stay_text(tok):
    text = "s = '<｜end▁of▁sentence｜>' + '<｜fim▁hole｜>'\n"
    for rate in (0.0, 1.0):
        ids = apply_fim(text, random.Random(1), tok, rate=rate)
        assert ids.count(tok.eos_id) == 1 and ids.count(tok.fim_hole_id) == int(rate)


def test_tokenize_documents_matches_apply_fim(tok, stdlib_texts):
    docs = [t[:1500] for t in stdlib_texts] * 3 + ["", "é"]
    rng = random.Random(7)
    expected = [apply_fim(d, rng, tok, 0.5) for d in docs]
    got = list(tokenize_documents(iter(docs), tok, random.Random(7), 0.5, batch_docs=4))
    assert got == expected
    assert sum(ids[0] == tok.fim_begin_id for ids in got) > 5
    assert list(tokenize_documents(docs, tok)) == [tok.encode(d) + [tok.eos_id] for d in docs]


def test_fim_needs_fim_tokens(tmp_path):
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                                 show_progress=False))
    tok = Tokenizer(raw)
    assert apply_fim("hi", random.Random(0), tok, rate=0.0) == tok.encode("hi") + [tok.eos_id]
    with pytest.raises(ValueError, match="fim"):
        apply_fim("hi", random.Random(0), tok, rate=0.1)
