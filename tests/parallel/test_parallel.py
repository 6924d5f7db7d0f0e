"""Scale-out on torch.distributed (gloo on the CPU, processes oversubscribed on two cores, launched with torchrun):
FSDP2, expert parallelism and FSDP x EP against the single process; node-limited routing and its traffic; sharded
checkpoints (resume at the same and at another world size, SIGKILL, export); failures that end with one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import train_configs

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.data import prepare_corpus
from nanoseek.io import CheckpointError, load_checkpoint
from nanoseek.parallel import ParallelConfig
from nanoseek.parallel.pipeline import check_stages, microbatches
from nanoseek.train import Trainer
from nanoseek.train.checkpoint import list_checkpoints, load_model

WORKER = str(Path(__file__).with_name("dist_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(n: int, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and p.returncode:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---- one step ------------------------------------------------------------------------------------------------
def _check_step(res: dict, spec: str, tol: float = 1e-5) -> None:
    assert rel(res["loss"], res["ref_loss"]) < tol, spec
    worst = max(res["grad_rel"], key=res["grad_rel"].get)
    assert res["grad_rel"][worst] < tol, (spec, worst, res["grad_rel"][worst])
    assert rel(res["norm"], res["ref_norm"]) < tol, spec


def test_one_step_world_2_fsdp_and_ep(tmp_path):
    out = tmp_path / "r.json"
    torchrun(2, WORKER, "step", str(out), "dp=2", "ep=2", "dp=2,meta_init=true|meta")
    res = json.loads(out.read_text())
    for spec in ("dp=2", "ep=2"):
        _check_step(res[spec], spec)
    assert res["ep=2"]["traffic"]["rows"] > 0  # tokens really went to the other rank
    # built on meta: each rank allocated half the model and drew its own values (no shard repeats another)
    meta = res["dp=2,meta_init=true|meta"]
    assert meta["local_numel"] * 2 <= meta["numel"] + 10_000 and not meta["duplicated_halves"]
    assert all(abs(s / meta["init_std"] - 1) < 0.2 for s in meta["stds"].values())
    assert abs(meta["main_loss"] - math.log(97)) < 1.0


def test_one_step_world_4_and_node_limited_routing(tmp_path):
    out = tmp_path / "r.json"
    specs = ["dp=4", "dp=2,ep=2", "ep=4,nodes=4", "ep=4,nodes=4|nolimit",
             "ep=4,nodes=2,activation_checkpoint=true,reshard_after_forward=false", "ep=4,fp8_dispatch=true"]
    torchrun(4, WORKER, "step", str(out), *specs)
    res = json.loads(out.read_text())
    for spec in specs[:-1]:
        _check_step(res[spec], spec)
    # FP8 dispatch: the experts see 1x128-tile FP8 activations (V3 §3.3): close, not equal
    assert rel(res[specs[-1]]["loss"], res[specs[-1]]["ref_loss"]) < 1e-3
    for spec in ("ep=4,nodes=4", "ep=4,nodes=4|nolimit", specs[4]):
        t = res[spec]["traffic"]
        # the bytes the dispatch counted are the formula's: 2 x (slots whose expert is on another node) x H x 4 B
        assert t["measured_cross_node_bytes"] == t["formula_cross_node_bytes"], spec
        assert sum(t["measured_cross_node_bytes"]) > 0
        assert t["max_nodes_measured"] == t["max_nodes_from_routing"]
    # with one expert group per node, no token reaches more than topk_group = 2 nodes ...
    assert res["ep=4,nodes=4"]["traffic"]["max_nodes_measured"] <= 2
    assert res[specs[4]]["traffic"]["max_nodes_measured"] <= 2
    # ... which binds: the same routing without the group limit sends tokens to 3 nodes (top-3 experts)
    assert res["ep=4,nodes=4|nolimit"]["traffic"]["max_nodes_measured"] == 3


# ---- training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_corpus(None, d, vocab_size=512, max_chars=200_000, seed=0)
    return d


def _sets(steps: int, **changes) -> list[str]:
    m, t = train_configs(steps, **changes)
    model_keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group")
    train_keys = ("batch_size", "micro_batch_size", "seq_len", "eval_every", "eval_batches", "ckpt_every",
                  "keep_last", "warmup_frac", "batch_ramp_frac", "bias_update_speed")
    out = []
    for k in (*model_keys, *(k for k in changes if hasattr(m, k) and k not in model_keys)):
        out += ["--set", f"{k}={getattr(m, k)}"]
    for k in (*train_keys, *(k for k in changes if hasattr(t, k) and k not in train_keys)):
        out += ["--set", f"{k}={getattr(t, k)}"]
    return out + ["--steps", str(steps)]


STEPS = 20


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    m, t = train_configs(STEPS)
    out = tmp_path_factory.mktemp("single")
    Trainer(m, t, data_dir, out, progress=False).run()
    return out


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
    """20 steps of `torchrun -m nanoseek pretrain --parallel ep=2` (the uninterrupted run of the SIGKILL test)."""
    out = tmp_path_factory.mktemp("ep2") / "run"
    torchrun(2, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(out), "--parallel", "ep=2",
             *_sets(STEPS))
    return out


def test_training_tracks_single_process(single_run, cli_run):
    a, b = records(single_run), records(cli_run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "main_loss", "mtp_loss"):
            assert rel(y[k], x[k]) < 1e-4, (x["step"], k, y[k], x[k])
        assert y["ep_bytes"] > 0
    for x, y in zip(records(single_run, "eval"), records(cli_run, "eval"), strict=True):
        assert rel(y["heldout_loss"], x["heldout_loss"]) < 1e-4
    # rank 0 alone writes the run's outputs; the checkpoints are sharded (one DCP file per rank)
    for name in ("config.json", "loss.png", "expert_load.png"):
        assert (cli_run / name).is_file()
    last = list_checkpoints(cli_run / "checkpoints")[-1]
    assert sorted(p.name for p in (last / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow  # out of the default suite's 15 minutes (make test-slow runs it)
def test_fp8_training_under_fsdp2(data_dir, tmp_path):
    """`--fp8` (V3's recipe: FP8 GEMMs, BF16 moments) under FSDP2 follows the single-process FP8 run."""
    steps = 4
    args = ["pretrain", "--data", str(data_dir), "--fp8", *_sets(steps)]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, "-m", "nanoseek", *args, "--out", str(tmp_path / "two"), "--parallel", "dp=2")
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert rel(two[0]["loss"], one[0]["loss"]) < 1e-6  # the first forward: the same FP8 GEMMs on the same weights
    # after updates, 1e-3: the ranks' summed gradients differ from one process's in the last bits, and FP8 (3
    # mantissa bits) and the BF16 moments turn a last-bit difference at a rounding boundary into a visible one
    for x, y in zip(one, two, strict=True):
        assert rel(y["loss"], x["loss"]) < 1e-3, (x["step"], y["loss"], x["loss"])


def test_sft_from_a_sharded_checkpoint_matches_one_process(cli_run, tmp_path):
    """SFT (loss masks: assistant tokens only) initialised from a distributed run's sharded checkpoint, in one process
    and on 2 ranks with EP: the same losses (the MTP module's too: it is trained on the assistant tokens, sharded like
    the blocks), and the same held-out loss over the assistant tokens."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n"
                            for a in range(10) for b in range(0, 40, 3)))
    args = ["sft", "--init", str(cli_run), "--data", str(chat), "--steps", "4", "--set", "batch_size=4",
            "--set", "micro_batch_size=2", "--set", "seq_len=32"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, "-m", "nanoseek", *args, "--out", str(tmp_path / "two"), "--parallel", "ep=2")
    for kind in ("train", "eval"):
        keys = ("loss", "mtp_loss") if kind == "train" else ("heldout_loss",)
        for x, y in zip(records(tmp_path / "one", kind), records(tmp_path / "two", kind), strict=True):
            for key in keys:
                assert rel(y[key], x[key]) < 1e-5, (kind, x["step"], key, y[key], x[key])
    assert all(r["mtp_loss"] > 0 and r["mtp_lambda"] > 0 for r in records(tmp_path / "two"))


def test_sigkill_and_resume_logs_the_uninterrupted_losses(data_dir, cli_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nanoseek",
           "pretrain", "--data", str(data_dir), "--out", str(out), "--parallel", "ep=2", *_sets(STEPS)]
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None:
        if metrics.exists() and len(records(out)) >= 7:  # past the checkpoint at step 6
            break
        time.sleep(0.02)
    assert agent.poll() is None, "the run ended before it could be killed"
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                               text=True).stdout.split()]
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun stops the others
    agent.communicate(timeout=120)
    assert agent.returncode != 0
    done = len(records(out))
    assert done < STEPS
    torchrun(2, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(out), "--parallel", "ep=2",
             "--resume", *_sets(STEPS))
    def losses(run: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["main_loss"], r["grad_norm"]) for r in records(run)]

    assert losses(out) == losses(cli_run)


def test_sigterm_checkpoints_from_every_rank(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nanoseek",
           "pretrain", "--data", str(data_dir), "--out", str(out), "--parallel", "dp=2", *_sets(200)]
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None:
        if (out / "metrics.jsonl").exists() and len(records(out)) >= 2:
            break
        time.sleep(0.02)
    # SIGTERM to every rank, as a cluster scheduler sends it (signalling torchrun itself also works -- it passes the
    # signal on -- but its own teardown then races the ranks' checkpoint: once in a loaded CI run it was lost)
    for pid in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    text, _ = agent.communicate(timeout=120)
    assert agent.returncode == 0  # the ranks checkpointed and exited cleanly
    assert "interrupted: checkpoint written to" in text, text[-3000:]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    assert 2 <= step < 200 and step == records(out)[-1]["step"]  # the step both ranks agreed to stop after
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow  # out of the default suite's 15 minutes (make test-slow); the pipelined test reshards too
def test_sharded_checkpoints_resume_reshard_and_export(data_dir, tmp_path):
    steps, spec = 6, "dp=2,ep=2"
    a, b = tmp_path / "a", tmp_path / "b"
    torchrun(4, WORKER, "train", str(tmp_path / "a.json"), spec, str(data_dir), str(a), str(steps))
    torchrun(4, WORKER, "train", str(tmp_path / "b1.json"), spec, str(data_dir), str(b), str(steps), "4")
    assert [p.name for p in list_checkpoints(b / "checkpoints")] == ["step_00000003"]
    c = tmp_path / "c"
    shutil.copytree(b, c)
    torchrun(4, WORKER, "train", str(tmp_path / "b2.json"), spec, str(data_dir), str(b), str(steps))
    assert json.loads((tmp_path / "b2.json").read_text())["start"] == 3
    # resumed at the same world size: the uninterrupted run's losses, bit for bit
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in records(b)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in records(a)]
    # resumed at another world size and mesh (4 ranks dp=2 x ep=2 -> 2 ranks dp=2): DCP reshards
    torchrun(2, WORKER, "train", str(tmp_path / "c2.json"), "dp=2", str(data_dir), str(c), str(steps))
    for x, y in zip(records(a), records(c), strict=True):
        assert x["step"] == y["step"] and rel(y["loss"], x["loss"]) < 1e-5
    m, t = train_configs(steps)
    Trainer(m, t, data_dir, tmp_path / "single", progress=False).run()
    for x, y in zip(records(a), records(tmp_path / "single"), strict=True):  # and FSDP x EP tracks one process
        assert rel(x["loss"], y["loss"]) < 1e-4
    # the sharded checkpoint, exported to the HF layout, gives the distributed model's logits
    hf = tmp_path / "hf"
    assert main(["export", str(list_checkpoints(a / "checkpoints")[-1]), "--out", str(hf)]) == 0
    res = json.loads((tmp_path / "a.json").read_text())
    model = load_checkpoint(hf).eval()
    with torch.no_grad():
        logits = model(torch.tensor(res["tokens"])).logits
    assert torch.allclose(logits, torch.tensor(res["logits"]), atol=1e-5, rtol=1e-5)
    assert (hf / "tokenizer.json").is_file()
    # nanoseek.load (and so generate / serve) reads the sharded checkpoint itself; the HF loader says what it is
    direct = nanoseek.load(list_checkpoints(a / "checkpoints")[-1]).eval()
    with torch.no_grad():
        assert torch.equal(direct(torch.tensor(res["tokens"])).logits, logits)
    with pytest.raises(CheckpointError, match="nanoseek export"):
        load_checkpoint(list_checkpoints(a / "checkpoints")[-1])


@pytest.mark.parametrize("mesh", ["ep=2", "dp=2"])
def test_grpo_training_side_matches_one_process(grpo_runs, mesh):
    """GRPO with the policy under EP x FSDP (ep=2) and FSDP (dp=2) on 2 ranks (one launch): each rank samples half
    of the step's questions with the seeds the single process gives them, so rewards, the clipped-ratio statistics
    and the held-out accuracy are the single-process run's; MTP module 1, sharded like the blocks, is distilled on
    each rank's share with the single process's losses, gradient norms and weights."""
    from safetensors.torch import load_file

    tmp_path, one_weights, init = grpo_runs
    one, two = records(tmp_path / "one"), records(tmp_path / "two" / mesh)
    assert [r["step"] for r in two] == [1, 2, 3]
    for x, y in zip(one, two, strict=True):
        for k in ("reward_mean", "accuracy", "completion_len", "all_equal_groups"):
            assert y[k] == pytest.approx(x[k], rel=1e-6), (x["step"], k)
        # (a small learning rate: after an update the weights differ in the last bits, which Adam's first steps,
        # sign-like for near-zero gradients, would make visible at 3e-3; the loss is a small difference of large
        # terms: compared absolutely)
        for k in ("entropy", "grad_norm"):
            assert rel(y[k], x[k]) < 1e-4, (x["step"], k, y[k], x[k])
        for k in ("loss", "kl", "clip_frac", "mtp_loss", "mtp_agree", "mtp_grad_norm"):
            if k in x:
                assert abs(y[k] - x[k]) < 1e-5, (x["step"], k, y[k], x[k])
        assert x["mtp_loss"] > 0 and x["mtp_grad_norm"] > 0
    # each rank's rollout copy holds the trained policy after every update
    res = json.loads((tmp_path / "r.json").read_text())[mesh]
    assert res == {"rollout_equals_policy": True, "rollout_moved": True}
    assert [r["heldout_accuracy"] for r in records(tmp_path / "one", "eval")] == [
        r["heldout_accuracy"] for r in records(tmp_path / "two" / mesh, "eval")]
    assert (list_checkpoints(tmp_path / "two" / mesh / "checkpoints")[-1] / "ref.safetensors").is_file()
    # the trained weights, MTP module included, are the single process's (measured: 1e-7); its MTP weights moved by
    # more than that tolerance (6e-5), so a run that skipped the MTP update would fail
    two_weights = load_file(tmp_path / "two" / mesh / "final.safetensors")
    assert two_weights.keys() == one_weights.keys()
    for k, v in one_weights.items():
        assert (two_weights[k] - v).abs().max() < 1e-5, k
    assert max((two_weights[k] - init[k]).abs().max() for k in init if k.startswith("mtp.")) > 3e-5


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """The GRPO runs of test_grpo_training_side_matches_one_process: one process, then ep=2 and dp=2 in one launch.
    Returns (their directory, the single process's trained weights, the initial weights)."""
    from dist_worker import grpo_setup, has_e

    from nanoseek.data import stdlib_sources, train_tokenizer
    from nanoseek.rl.grpo import GRPOTrainer

    tmp_path = tmp_path_factory.mktemp("grpo")
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    train_tokenizer(texts, vocab_size=300, show_progress=False).save(tmp_path / "tokenizer.json")
    tok, model, cfg = grpo_setup(str(tmp_path / "tokenizer.json"))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tr = GRPOTrainer(model, tok, cfg, tmp_path / "one", progress=False, reward_fn=has_e)
    tr.run()
    torchrun(2, WORKER, "grpo", str(tmp_path / "r.json"), "ep=2+dp=2", str(tmp_path / "tokenizer.json"),
             str(tmp_path / "two"))
    return tmp_path, tr.model.state_dict(), init


# ---- pipeline parallelism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,schedules", [(2, ["gpipe", "1f1b", "interleaved", "dualpipev"]),
                                             (4, ["1f1b", "dualpipev"])])
def test_pipeline_schedules_match_one_process(tmp_path, world, schedules):
    """Each schedule over `world` pipeline ranks (max(4, 2 world) micro-batches; a model of 2 x world layers + 1
    MTP module, so DualPipeV has 2 stages per rank with the embedding, head and MTP on rank 0): the step's loss --
    main, MTP and every stage's balance loss -- each gradient of each rank's stages, and the expert loads, as one
    process."""
    out = tmp_path / "r.json"
    torchrun(world, WORKER, "pipeline", str(out), *schedules)
    res = json.loads(out.read_text())
    for s in schedules:
        r = res[s]
        assert r["loss_rel"] < 1e-6 and r["worst_grad_rel"] < 1e-5 and r["load_diff"] == 0, (s, r)
        assert r["ranks_with_loss"] == 1


def test_pipelined_training_matches_one_process_and_resumes_on_another_mesh(data_dir, tmp_path):
    """`pretrain --parallel pp=2,ep=2,pp_schedule=dualpipev,overlap=true` (4 ranks: embedding, head and MTP on
    pipeline rank 0, experts split over 2 ranks in each stage, DualPipeV's paired chunks taking turns at their
    all-to-alls) logs the single process's losses, held-out loss and ends with its weights; its step-2 checkpoint
    (each pipeline rank wrote only its stages) resumes under pp=2 with 1F1B (the MTP module's embedding then a second
    copy on the last rank) and again ends where the single process does."""
    changes = dict(num_hidden_layers=4, batch_size=8, ckpt_every=2, lr=3e-4)  # (a small lr: see the GRPO test)
    m, t = train_configs(4, **changes)
    Trainer(m, t, data_dir, tmp_path / "one", progress=False).run()
    a = tmp_path / "pp"
    torchrun(4, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(a), *_sets(4, **changes),
             "--parallel", "pp=2,ep=2,pp_schedule=dualpipev,overlap=true")
    b = tmp_path / "resumed"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000004")
    torchrun(2, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(b), *_sets(4, **changes),
             "--parallel", "pp=2,pp_schedule=1f1b", "--resume")
    one, held_one = records(tmp_path / "one"), records(tmp_path / "one", "eval")[-1]["heldout_loss"]
    for run in (a, b):
        got = records(run)
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for x, y in zip(one, got, strict=True):
            for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm"):
                assert rel(y[k], x[k]) < 1e-5, (run.name, x["step"], k, y[k], x[k])
            assert y["maxvio_batch"] == x["maxvio_batch"] and y["expert_load"] == x["expert_load"]
        assert rel(records(run, "eval")[-1]["heldout_loss"], held_one) < 1e-5
        ref = load_model(list_checkpoints(tmp_path / "one" / "checkpoints")[-1]).state_dict()
        mine = load_model(list_checkpoints(run / "checkpoints")[-1]).state_dict()
        assert mine.keys() == ref.keys()
        for k in ref:
            assert (mine[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-12, (run.name, k)
    assert records(a)[0]["ep_bytes"] > 0
    assert all(r["ep_a2a_overlapped"] > 0 for r in records(a))  # the overlap ran (all-to-alls beside compute)
    assert len(list((list_checkpoints(a / "checkpoints")[-1] / "dcp").glob("*.distcp"))) == 4


def test_pipeline_mesh_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"pp=2,pp_schedule=dualpipev needs 4 stages .* 2 layers"):
        check_stages(2, 2, "dualpipev")
    check_stages(2, 2, "1f1b")
    with pytest.raises(ConfigError, match=r"at least 4 micro-batches .* micro_batch_size=2 make 2"):
        microbatches(4, 2, 2, "interleaved")
    assert microbatches(6, 4, 2, "1f1b") == 3  # equal micro-batches of 2 (the largest size <= 4 dividing 6)
    with pytest.raises(ConfigError, match="pp_schedule"):
        ParallelConfig.parse("pp=2,pp_schedule=zb")


# ---- failures ------------------------------------------------------------------------------------------------
def test_bad_mesh_is_one_line_before_any_work(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--parallel", "dp=2,ep=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "mesh of 4 ranks" in err and "torchrun --nproc-per-node 4" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--parallel", "dq=2"])
    err = capsys.readouterr().err
    assert "dq" in err and "dp" in err and len(err.strip().splitlines()) == 1
    p = torchrun(2, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "y"),
                 "--parallel", "dp=4", check=False)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("nanoseek:")]
    # each rank that reports (torchrun may stop the second once the first has failed) says it in one line
    assert lines and all("torchrun started 2 processes" in ln for ln in lines)
    assert not (tmp_path / "y" / "checkpoints").exists()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_rendezvous_is_one_line_within_the_timeout(data_dir, tmp_path):
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out",
                        str(tmp_path / "x"), "--parallel", "dp=2,timeout=3"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1 and time.time() - t < 60
    assert p.stderr.strip().splitlines()[-1].startswith("nanoseek: rank 0: no rendezvous")
    assert len(p.stderr.strip().splitlines()) == 1


def test_unreachable_rank_ends_the_others_with_one_line(tmp_path):
    p = torchrun(2, WORKER, "hang", str(tmp_path / "r.json"), check=False, timeout=120)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("nanoseek:")]
    assert lines == [lines[0]] and "rank 0: lost contact with the other ranks" in lines[0] and "Timed out" in lines[0]
