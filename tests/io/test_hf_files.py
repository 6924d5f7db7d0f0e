"""A checkpoint's tokenizer_config.json and generation_config.json, read by transformers as DeepSeek's releases
are: special tokens, bos added, the same token ids as nanoseek and the same chat rendering."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoTokenizer, GenerationConfig

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.infer.chat import encode_chat, render_chat

TRICKY = ["def f(x):\n    return x  + 1", "café ünïcode – ≠ 漢字 🙂", "tabs\t\tand   spaces  \n\n\n", "12345 + 678",
          "<｜begin▁of▁sentence｜>text<｜end▁of▁sentence｜>", "<think>why</think> so", ""]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>easy</think>4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x\n\ny"}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "ckpt"
    tok = train_tokenizer([p.read_text(errors="ignore") for p in stdlib_sources()[:30]], 600, show_progress=False)
    torch.manual_seed(0)
    nanoseek.save(nanoseek.load(tiny_config(vocab_size=tok.vocab_size)), d)
    tok.save(d, model_max_length=512)
    return d, tok


def test_transformers_tokenizer_matches_nanoseek(ckpt):
    d, tok = ckpt
    hf = AutoTokenizer.from_pretrained(d)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.model_max_length == 512
    for text in TRICKY:
        assert hf(text).input_ids == [tok.bos_id, *tok.encode(text)]  # bos first, as DeepSeek's
        assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_chat_template_renders_like_nanoseek(ckpt):
    d, tok = ckpt
    hf = AutoTokenizer.from_pretrained(d)
    for chat in CHATS:
        for gen in (True, False):
            assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == render_chat(
                chat, tok, add_generation_prompt=gen)
        ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(ids) == encode_chat(chat, tok)


def test_generation_config(ckpt):
    d, _ = ckpt
    g = GenerationConfig.from_pretrained(d)
    assert (g.bos_token_id, g.eos_token_id, g.temperature, g.top_p, g.do_sample) == (0, 1, 0.6, 0.95, True)
    assert json.loads((d / "tokenizer_config.json").read_text())["add_bos_token"] is True
