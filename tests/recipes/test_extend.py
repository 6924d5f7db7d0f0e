"""`nanoseek extend`: YaRN set for the final length on unchanged weights, two stages at growing lengths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.data import Tokenizer, prepare_corpus
from nanoseek.recipes.extend import extend, with_config, yarn_for
from nanoseek.train.config import TrainConfig


def test_yarn_for_sets_the_final_length_and_keeps_weights():
    cfg = tiny_config(max_position_embeddings=128)  # conftest's YaRN: original 16
    ext = yarn_for(cfg, 512)
    assert ext.rope_scaling["factor"] == 32 and ext.rope_scaling["original_max_position_embeddings"] == 16
    assert ext.max_position_embeddings == 512 and ext.rope_scaling["beta_fast"] == cfg.rope_scaling["beta_fast"]
    torch.manual_seed(0)
    model = nanoseek.load(cfg).eval()
    moved = with_config(model, ext).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), moved.state_dict().values(), strict=True))
    with torch.no_grad():  # only the positions' rotation changed: a different function on long inputs
        assert not torch.allclose(model(ids).logits, moved(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="not beyond"):
        yarn_for(cfg, 16)


def test_two_stages_from_a_checkpoint(tmp_path):
    data = tmp_path / "data"
    prepare_corpus(None, data, vocab_size=512, max_chars=200_000, seed=0, progress=False)
    tok = Tokenizer.load(data / "tokenizer.json")
    torch.manual_seed(0)
    src = tmp_path / "base"
    nanoseek.save(nanoseek.load(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=64,
                                            rope_scaling=None)), src)
    pre = TrainConfig(batch_size=4, micro_batch_size=4, seq_len=64, lr=1e-3)  # the pre-training run's recipe
    s = extend(src, data, tmp_path / "ext", stages=(96, 192), steps=2, pretrain_cfg=pre, progress=False,
               sets=["eval_batches=1"])
    assert [(st["batch_size"], st["lr"]) for st in s["stages"]] == [(2, pytest.approx(1e-3 * pre.final_lr_ratio)),
                                                                     (1, pytest.approx(1e-3 * pre.final_lr_ratio))]
    assert [st["length"] for st in s["stages"]] == [96, 192]
    last = nanoseek.load(s["stages"][-1]["checkpoint"])
    assert last.config.max_position_embeddings == 192 and last.config.rope_scaling["factor"] == 3.0
    assert json.loads((tmp_path / "ext" / "stage_192" / "config.json").read_text())["train"]["seq_len"] == 192
    first = nanoseek.load(s["stages"][0]["checkpoint"])
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values(),
                                                     strict=True))
