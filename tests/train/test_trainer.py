"""The trainer end to end on a small real corpus: exact resume, corrupt-checkpoint fallback, signals, outputs."""

import json
import os
import shutil
import signal

import pytest
import torch

from nanoseek.data import prepare_corpus
from nanoseek.io import load_checkpoint
from nanoseek.model import preset
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_corpus(None, d, vocab_size=512, max_chars=300_000, seed=0)
    return d


def _cfgs(steps=8, **kw):
    m = preset("tiny", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    t = TrainConfig(steps=steps, batch_size=4, micro_batch_size=2, seq_len=32, eval_every=4, eval_batches=2,
                    ckpt_every=3, keep_last=5, warmup_frac=0.25, batch_ramp_frac=0.3, **kw)
    return m, t


def _losses(out_dir):
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("main_loss"), r.get("heldout_loss")) for r in recs]


def test_resume_is_bit_exact(data_dir, tmp_path):
    m, t = _cfgs()
    full = Trainer(m, t, data_dir, tmp_path / "full", progress=False)
    full.run()
    a = tmp_path / "split"
    first = Trainer(m, t, data_dir, a, progress=False)
    first.run(max_steps=5)  # checkpoint at step 3 (every 3) ... and stop after step 5 without one
    assert [p.name for p in list_checkpoints(a / "checkpoints")] == ["step_00000003"]
    second = Trainer(m, t, data_dir, a, resume=True, progress=False)
    assert second.step == 3
    second.run()
    assert _losses(a) == _losses(tmp_path / "full")  # identical floats, bit for bit
    ma = load_checkpoint(list_checkpoints(a / "checkpoints")[-1])
    mb = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k
    # outputs a user expects next to the run
    for name in ("config.json", "metrics.jsonl", "loss.png", "expert_load.png"):
        assert (a / name).is_file(), name


def test_bias_moves_and_balance_metrics_logged(data_dir, tmp_path):
    m, t = _cfgs(steps=4, bias_update_speed=0.01)
    tr = Trainer(m, t, data_dir, tmp_path, progress=False)
    tr.run()
    bias = tr.model.moe_gates()[0].e_score_correction_bias
    assert bias.abs().max().item() > 0  # updated by the sign rule, outside the optimizer
    assert bias.abs().max().item() <= 4 * 0.01 + 1e-6
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][0]
    for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s",
              "maxvio_batch", "maxvio_seq", "expert_load"):
        assert k in rec, k


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path):
    m, t = _cfgs(steps=6)
    Trainer(m, t, data_dir, tmp_path, progress=False).run()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    f = ckpts[-1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match="skipping checkpoint step_00000006"):
        tr = Trainer(m, t, data_dir, tmp_path, resume=True, progress=False)
    assert tr.step == 3
    # an interrupted write (temporary directory) is never taken for a checkpoint
    shutil.copytree(ckpts[0], tmp_path / "checkpoints" / ".step_00000009.tmp")
    assert all(not p.name.startswith(".") for p in list_checkpoints(tmp_path / "checkpoints"))


def test_sigterm_writes_checkpoint(data_dir, tmp_path):
    m, t = _cfgs(steps=50)
    tr = Trainer(m, t, data_dir, tmp_path, progress=False)
    orig = tr.train_step

    def step_then_signal():
        rec = orig()
        if tr.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    tr.train_step = step_then_signal
    res = tr.run()
    assert res.interrupted and res.steps_done == 2
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_fp8_training_runs_close_to_fp32_and_resumes(data_dir, tmp_path):
    from nanoseek.fp8 import Fp8Linear

    m, t = _cfgs(steps=4)
    ref = Trainer(m, t, data_dir, tmp_path / "fp32", progress=False)
    ref.run()
    t8 = TrainConfig.from_dict({**t.to_dict(), "fp8": True})
    tr = Trainer(m, t8, data_dir, tmp_path / "fp8", progress=False)
    assert isinstance(tr.model.model.layers[0].self_attn.kv_b_proj, Fp8Linear)
    tr.run(max_steps=3)
    again = Trainer(m, t8, data_dir, tmp_path / "fp8", resume=True, progress=False)
    assert isinstance(again.model.model.layers[0].self_attn.kv_b_proj, Fp8Linear)
    again.run()
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "fp8")
    assert [r[0] for r in a] == [r[0] for r in b]
    for (_, la, _, _), (_, lb, _, _) in zip(a, b, strict=True):
        if la is not None:
            assert la != lb and abs(la - lb) / la < 0.02  # FP8 changes the numbers, not the trajectory


def test_sft_sets_the_balance_loss_weight_without_touching_the_model_config(data_dir, tmp_path):
    """`nanoseek sft --init CKPT --set aux_loss_alpha=0`: alpha is a training field (TrainConfig), set on the MoE
    layers; the model config stays the checkpoint's, so the checkpoint matches the requested model."""
    import nanoseek
    from nanoseek.cli import main

    m, _ = _cfgs()
    init = tmp_path / "init"
    torch.manual_seed(0)
    nanoseek.save(nanoseek.load(m), init)
    shutil.copyfile(data_dir / "tokenizer.json", init / "tokenizer.json")
    rows = [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                          {"role": "assistant", "content": f"<think>{a}+{b}</think>{a + b}"}]}
            for a in range(5) for b in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(init), "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--steps", "2",
                 "--set", "aux_loss_alpha=0", "--set", "seq_len=32", "--set", "batch_size=2",
                 "--set", "micro_batch_size=2", "--set", "eval_batches=1"]) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["aux_loss_alpha"] == 0 and resolved["model"]["aux_loss_alpha"] == m.aux_loss_alpha
    assert all(r["balance_loss"] == 0 for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train")
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).config.to_dict() == m.to_dict()
    # the trainer's weight, not the model config's, is the one in the forward
    t = TrainConfig.from_dict({**_cfgs()[1].to_dict(), "aux_loss_alpha": 0.05, "init_from": str(init)})
    tr = Trainer(m.replace(aux_loss_alpha=0.0, mtp_loss_weight=1.0), t, data_dir, tmp_path / "w", progress=False)
    assert tr.model.config.aux_loss_alpha == m.aux_loss_alpha
    assert {b.mlp.alpha for b in [*tr.model.model.layers, *tr.model.mtp] if hasattr(b.mlp, "alpha")} == {0.05}
    assert tr.train_step()["balance_loss"] > 0


def test_mismatched_resume_names_the_fields_and_both_values(data_dir, tmp_path):
    m, t = _cfgs(steps=1)
    Trainer(m, t, data_dir, tmp_path, progress=False).run()
    other = m.replace(hidden_size=128, num_attention_heads=8)
    with pytest.raises(ValueError, match=r"checkpoint model config differs from the requested one: hidden_size 64 "
                                         r"\(checkpoint\) vs 128 \(requested\), num_attention_heads 4 \(checkpoint\) "
                                         r"vs 8 \(requested\)$"):
        Trainer(other, t, data_dir, tmp_path, resume=True, progress=False)
