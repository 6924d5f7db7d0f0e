"""Output directories that hold other checkpoints: pruning keeps to the run's own lineage, a fresh run refuses a used
--out, and --resume with nothing usable fails instead of starting over."""

import json
import random
import shutil

import pytest
import torch
from conftest import tiny_config

from nanoseek.cli import main
from nanoseek.data import write_shard
from nanoseek.model import Transformer, preset
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.checkpoint import (
    RunDirError,
    list_checkpoints,
    load_latest,
    save_training_checkpoint,
)

VOCAB = 512
SMALL = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "seq_len=16", "--set", "batch_size=2",
         "--set", "micro_batch_size=2", "--set", "eval_batches=1", "--set", "vocab_size=512"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared data directory of random tokens (no tokenizer training: only the trainer reads it)."""
    d = tmp_path_factory.mktemp("tokens")
    rng = random.Random(0)
    for split, n in (("train", 4000), ("val", 400)):
        write_shard(d / f"{split}.bin", [[rng.randrange(VOCAB) for _ in range(n)]], "h" * 16, VOCAB)
    (d / "data.json").write_text(json.dumps({"tokenizer_hash": "h" * 16, "vocab_size": VOCAB}))
    return d


def _cfgs(steps, **kw):
    m = preset("tiny", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    t = TrainConfig(steps=steps, batch_size=2, micro_batch_size=2, seq_len=16, eval_every=100, eval_batches=1,
                    ckpt_every=1, **kw)
    return m, t


def _save(root, step, run_id, keep_last=2):
    model = Transformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    return save_training_checkpoint(root, step, model, opt, {"run_id": run_id}, keep_last=keep_last)


def _names(root):
    return [p.name for p in list_checkpoints(root)]


def cli_error(capsys, argv) -> str:
    """The one line a failing command ends with (printed by argparse, or the message of its SystemExit)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert err.startswith("nanoseek: ") and "\n" not in err.strip(), err
    return err.strip()


def test_new_checkpoints_survive_higher_numbered_ones(tmp_path):
    """An earlier, longer run left step 100 (valid) and step 200 (corrupt): the new run's checkpoints are kept (by
    name, each one was the oldest and was removed right after it was written), and the others are not touched."""
    root = tmp_path / "checkpoints"
    _save(root, 100, "earlier")
    shutil.copytree(root / "step_00000100", root / "step_00000200")
    (root / "step_00000200" / "model.safetensors").write_bytes(b"truncated")
    for step in (1, 2, 3):
        written = _save(root, step, "new", keep_last=2)
        assert written.is_dir()  # never the one just written
    assert _names(root) == ["step_00000002", "step_00000003", "step_00000100", "step_00000200"]


def test_pruning_keeps_to_the_runs_lineage(tmp_path):
    """A resumed run (same run id) writing below a corrupt newer checkpoint of its own: its older checkpoints are
    pruned, the higher-numbered one is left alone, and so is one that cannot be attributed."""
    root = tmp_path / "checkpoints"
    _save(root, 3, "r", keep_last=5)
    _save(root, 9, "r", keep_last=5)
    (root / "step_00000009" / "model.safetensors").write_bytes(b"")  # the newest is corrupt: resume takes step 3
    (root / "step_00000001").mkdir()  # unreadable trainer.json: whose it is cannot be told
    _save(root, 6, "r", keep_last=1)
    assert _names(root) == ["step_00000001", "step_00000006", "step_00000009"]


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    _save(out / "checkpoints", 50, "earlier")
    m, t = _cfgs(2)
    with pytest.raises(RunDirError, match=r"holds 1 checkpoint\(s\) of an earlier run .*--resume.*fresh --out"):
        Trainer(m, t, data_dir, out, progress=False)
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()  # nothing written
    # the command line: one line, no training
    err = cli_error(capsys, ["pretrain", "--data", str(data_dir), "--out", str(out), "--steps", "1", *SMALL])
    assert err.startswith(f"nanoseek: {out}: holds 1 checkpoint(s)")
    assert _names(out / "checkpoints") == ["step_00000050"]


def test_resume_with_no_usable_checkpoint_fails(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    _save(out / "checkpoints", 4, "r")
    (out / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"truncated")
    (out / "checkpoints" / "step_00000008").mkdir()  # an empty one too
    with pytest.raises(RunDirError, match=r"cannot resume: none of its 2 checkpoint\(s\) is usable .*step_00000008.*"
                                          r"step_00000004"):
        load_latest(out / "checkpoints")
    err = cli_error(capsys, ["pretrain", "--data", str(data_dir), "--out", str(out), "--resume", "--steps", "1",
                             *SMALL])
    assert err.startswith(f"nanoseek: {out / 'checkpoints'}: cannot resume")
    assert not (out / "metrics.jsonl").exists()
    # no checkpoints at all: --resume starts afresh, as before
    assert load_latest(tmp_path / "empty" / "checkpoints") is None


def test_resumed_run_keeps_its_id_and_prunes_its_own(tmp_path, data_dir):
    out = tmp_path / "run"
    m, t = _cfgs(2, keep_last=1)
    Trainer(m, t, data_dir, out, progress=False).run()
    first = json.loads((out / "checkpoints" / "step_00000002" / "trainer.json").read_text())["run_id"]
    assert isinstance(first, str) and _names(out / "checkpoints") == ["step_00000002"]
    m, t = _cfgs(3, keep_last=1)
    tr = Trainer(m, t, data_dir, out, resume=True, progress=False)
    assert tr.step == 2 and tr.run_id == first
    tr.run()
    assert _names(out / "checkpoints") == ["step_00000003"]
    assert json.loads((out / "checkpoints" / "step_00000003" / "trainer.json").read_text())["run_id"] == first
