"""The same `nanoseek pretrain` command gives the same run, bit for bit: in two processes, and across a SIGKILL and
`--resume`. The runs are multi-threaded and large enough (tokens x top-K x hidden >= 32768 per MoE layer) that a
threaded accumulating kernel would race: the MoE permutation's backward once did (nanoseek.model.moe.dispatch_combine).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.data import prepare_corpus

STEPS, CKPT_EVERY, KILL_AFTER = 16, 4, 6
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--seed", "0"] + [
    arg for kv in ("hidden_size=64", "intermediate_size=128", "moe_intermediate_size=32", "num_hidden_layers=2",
                   "seq_len=64", "batch_size=4", "micro_batch_size=4", "eval_every=8", "eval_batches=1",
                   f"ckpt_every={CKPT_EVERY}", "keep_last=5")
    for arg in ("--set", kv)]
# at least two threads, so that the multi-threaded kernels run even on a one-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
# every logged loss and what the next step depends on (not the timings)
KEYS = ("kind", "step", "lr", "loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio_batch",
        "maxvio_seq", "expert_load", "heldout_loss")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro_data")
    prepare_corpus(None, d, vocab_size=512, max_chars=200_000, seed=0, progress=False)
    return d


def _cmd(data_dir, out, *extra):
    return [sys.executable, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(out), *ARGS, *extra]


def _pretrain(data_dir, out, *extra) -> str:
    p = subprocess.run(_cmd(data_dir, out, *extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _records(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in KEYS} for r in recs]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run's records."""
    out = tmp_path_factory.mktemp("repro_ref")
    _pretrain(data_dir, out)
    recs = _records(out)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, STEPS + 1))
    return recs


def test_two_processes_log_identical_losses(data_dir, reference, tmp_path):
    _pretrain(data_dir, tmp_path / "again")
    assert _records(tmp_path / "again") == reference  # exact floats


def _logged_steps(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a line being written
            pass
    return max(steps)


def test_resume_after_sigkill_is_bit_exact(data_dir, reference, tmp_path):
    """Killed after logging steps past its first checkpoint (records --resume must drop), then resumed."""
    out = tmp_path / "killed"
    first = out / "checkpoints" / f"step_{CKPT_EVERY:08d}"  # renamed into place once complete
    proc = subprocess.Popen(_cmd(data_dir, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while (not first.is_dir() or _logged_steps(out / "metrics.jsonl") < KILL_AFTER) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no handler runs, no final checkpoint (a no-op if it has finished)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert killed_at < STEPS
    text = _pretrain(data_dir, out, "--resume")
    assert f"resumed from {out / 'checkpoints' / f'step_{killed_at:08d}'}" in text
    assert _records(out) == reference
