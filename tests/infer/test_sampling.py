"""Batched on-device sampling and incremental detokenisation."""

import random

import pytest
import torch
from infer_helpers import small_tokenizer

from nanoseek.infer.sampling import Detokenizer, sample_token, sample_tokens

TEXT = "def grüße(name):\n    return f'héllo {name} — 日本語 🚀 ½ ≠ 0.5'\n" * 3


def test_batched_rows_equal_one_at_a_time():
    """Each row draws from its own generator: a batch of mixed greedy / sampled / filtered rows gives each row's
    own token, so seeded requests are reproducible batched or alone."""
    logits = torch.randn(6, 50)
    temps = [0.0, 1.0, 0.7, 1.3, 0.0, 1.0]
    ks = [None, None, 5, None, 3, 10]
    ps = [None, 0.9, None, 0.5, None, 0.8]
    for trial in range(20):
        gens = [torch.Generator().manual_seed(trial * 10 + r) for r in range(6)]
        batched = sample_tokens(logits, temps, ks, ps, gens).tolist()
        gens = [torch.Generator().manual_seed(trial * 10 + r) for r in range(6)]
        alone = [sample_token(logits[r], temps[r], ks[r], ps[r], gens[r]) for r in range(6)]
        assert batched == alone
    assert batched[0] == int(logits[0].argmax()) and batched[4] == int(logits[4].argmax())


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    n = 6000
    draws = sample_tokens(logits.expand(n, 4), [1.0] * n, None, None, [g] * n)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, logits.softmax(-1), atol=0.02)
    # top-k 2 renormalises over {2, 3}
    draws = sample_tokens(logits.expand(n, 4), [1.0] * n, [2] * n, None, [g] * n)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert freq[:2].sum() == 0 and abs(float(freq[3]) - float(torch.tensor([2.0, 3.0]).softmax(-1)[1])) < 0.02


def _pieces(tok, ids):
    return [tok.decode(ids[:n]) for n in range(len(ids) + 1)]


def test_detokenizer_text_equals_the_full_decode():
    tok = small_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) > 100
    d = Detokenizer(tok)
    streamed = ""
    for n in range(1, len(ids) + 1):
        streamed += d.update(ids[:n])
        full = tok.decode(ids[:n])
        assert d.text == streamed and full.startswith(d.text)
        # only an incomplete character at the end is held back
        assert full[len(d.text):].strip("\ufffd") == ""
    assert d.finish(ids) == tok.decode(ids) == TEXT


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detokenizer_on_arbitrary_ids(seed):
    """Byte tokens that are not valid UTF-8 (a model can emit them): the final text is still the full decode."""
    tok = small_tokenizer()
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(300)]
    d = Detokenizer(tok)
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        assert tok.decode(ids[:n]).startswith(d.text)
    assert d.finish(ids) == tok.decode(ids)


def test_detokenizer_work_is_linear():
    """Each step decodes a window of a few tokens, not the whole output (which is quadratic in its length)."""
    tok = small_tokenizer()

    class Counting:
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return tok.decode(ids)

    ids = (tok.encode(TEXT) * 10)[:2000]
    d = Detokenizer(Counting())
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
    assert d.finish(ids) == tok.decode(ids)
    assert Counting.decoded < 8 * len(ids)  # the full re-decode would read ~2,000,000 ids
