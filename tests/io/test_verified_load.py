"""Loading for inference checks what it loads: the manifest's checksums, non-finite weights, and a run directory
whose newest checkpoint is broken falls back to the newest valid one (as --resume does)."""

import argparse
import json
import warnings

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.data import train_tokenizer
from nanoseek.infer.commands import load_for_inference
from nanoseek.io import CheckpointError, save
from nanoseek.io.paths import find_checkpoint
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import save_training_checkpoint

VOCAB = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training output with checkpoints at steps 1 and 2 (different weights), each with its tokenizer."""
    out = tmp_path_factory.mktemp("run")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=VOCAB, show_progress=False)
    tok.save(out / "tokenizer.json")
    for step in (1, 2):
        torch.manual_seed(step)
        model = Transformer(tiny_config(vocab_size=VOCAB)).eval()
        save_training_checkpoint(out / "checkpoints", step, model, torch.optim.AdamW(model.parameters()),
                                 {"run_id": "r"}, extra_files=[out / "tokenizer.json"])
    (out / "config.json").write_text(json.dumps({"model": {}, "train": {}}))  # as a run's resolved config
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _weights(path):
    return load_file(path / "model.safetensors")


def test_run_dir_falls_back_past_a_truncated_checkpoint(run, tmp_path):
    out = _copy(run, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"skipping 1 newer invalid checkpoint.*step_00000002.*using step_00000001"):
        model = nanoseek.load(out)
    ref = _weights(out / "checkpoints" / "step_00000001")
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"])
    # `generate` / `serve` load through here: the same fallback, with the checkpoint's own tokenizer
    args = argparse.Namespace(checkpoint=str(out), tokenizer=None, device="cpu")
    with pytest.warns(UserWarning, match="step_00000002"):
        model, tok, ckpt = load_for_inference(args)
    assert ckpt.name == "step_00000001" and tok.vocab_size <= VOCAB
    x = torch.tensor([tok.encode("def f(x):")])
    assert torch.isfinite(model(x).logits).all()
    # every checkpoint broken: one line, naming them
    older = out / "checkpoints" / "step_00000001" / "model.safetensors"
    older.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint among 2"):
        find_checkpoint(out)
    with pytest.raises(SystemExit, match=r"nanoseek: .*no valid checkpoint among 2 .*step_00000002.*step_00000001"):
        load_for_inference(args)


def test_flipped_bits_fail_the_manifest_check(run, tmp_path):
    ckpt = _copy(run / "checkpoints" / "step_00000002", tmp_path / "ckpt")
    (ckpt / "optimizer.safetensors").unlink()  # stripped of its training state to ship it: the model still loads
    (ckpt / "rng.safetensors").write_bytes(b"")
    nanoseek.load(ckpt)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the first byte of the first tensor: a low mantissa bit (fp32)
    data[start] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        nanoseek.load(ckpt)
    with pytest.raises(SystemExit, match="checksum mismatch"):
        load_for_inference(argparse.Namespace(checkpoint=str(ckpt), tokenizer=None, device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nanoseek.load(ckpt, verify=False)  # the opt-out for speed: loads what is there


def test_non_finite_weights_are_refused(run, tmp_path):
    ckpt = tmp_path / "hf"
    save(Transformer(tiny_config(vocab_size=VOCAB)), ckpt)  # the HF layout: no manifest
    tensors = _weights(ckpt)
    tensors["model.layers.1.self_attn.kv_b_proj.weight"][3, 5] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.kv_b_proj"
                                              r"\.weight holds 1 non-finite value"):
        nanoseek.load(ckpt)
    with pytest.raises(CheckpointError, match="non-finite"):
        nanoseek.load(ckpt, verify=False)  # not a matter of checksums: always refused
    (ckpt / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    with pytest.raises(SystemExit, match=r"nanoseek: .*kv_b_proj\.weight holds 1 non-finite"):
        load_for_inference(argparse.Namespace(checkpoint=str(ckpt), tokenizer=None, device="cpu"))
