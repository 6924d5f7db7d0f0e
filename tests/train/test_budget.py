"""Time-budgeted training: the schedules follow the time spent, the run fills its budget whatever the first steps cost,
and a resumed run continues from the progress in its checkpoint."""

import io
import json
import os
import signal
import time

import pytest

from nanoseek.data import prepare_corpus
from nanoseek.model import preset
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.loop import TimeBudget
from nanoseek.train.schedule import batch_at, bias_speed_at, lr_at, mtp_lambda_at


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_corpus(None, d, vocab_size=512, max_chars=200_000, seed=0)
    return d


def _cfgs(**kw):
    m = preset("tiny", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    base = dict(steps=10**6, batch_size=2, micro_batch_size=2, seq_len=32, eval_batches=1, keep_last=2,
                warmup_frac=0.05, constant_until=0.2, cosine_until=0.4, tail_until=0.5, batch_ramp_frac=0.1,
                mtp_lambda_switch=0.3, bias_freeze_frac=0.5, bias_update_speed=0.01)
    return m, TrainConfig(**{**base, **kw})


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_time_schedules_follow_progress():
    cfg = TrainConfig(steps=100, batch_size=16, micro_batch_size=4)
    # step-driven: unchanged formulas
    assert lr_at(cfg, 0) == cfg.lr / 5 and lr_at(cfg, 99) == cfg.lr * cfg.final_lr_ratio
    assert batch_at(cfg, 0) == 3 and batch_at(cfg, 10) == 16
    # time-budgeted: the same phases at fractions of the budget
    assert lr_at(cfg, 0, 0.0) == pytest.approx(cfg.lr * 0.01)  # the first step's cost is not known yet
    assert lr_at(cfg, 7, 0.03) == pytest.approx(cfg.lr * 0.6)
    assert lr_at(cfg, 7, 0.5) == cfg.lr
    assert lr_at(cfg, 7, 0.8) < cfg.lr and lr_at(cfg, 7, 0.999) == cfg.lr * cfg.final_lr_ratio
    assert batch_at(cfg, 0, 0.0) == 3 and batch_at(cfg, 0, 0.016) == 9 and batch_at(cfg, 0, 0.05) == 16
    assert mtp_lambda_at(cfg, 0, 0.6) == cfg.mtp_lambda and mtp_lambda_at(cfg, 0, 0.7) == cfg.mtp_lambda_late
    assert bias_speed_at(cfg, 0, 0.9) == cfg.bias_update_speed and bias_speed_at(cfg, 0, 0.97) == 0.0
    with pytest.raises(ValueError, match="positive number of seconds"):
        TimeBudget(0)


def test_budget_holds_when_the_first_steps_are_slow(data_dir, tmp_path):
    """A machine busy for the first steps: they take seconds, then steps are fast. The run still ends within its
    budget, uses most of it, and its LR schedule reaches its final phase (a plan fixed from the first two steps
    would have stopped after ~budget / 3 s steps and far too early)."""
    m, t = _cfgs()
    budget = 30.0
    tr = Trainer(m, t, data_dir, tmp_path, progress=True, budget=TimeBudget(budget, eval_every=0.25, ckpt_every=0.5))
    tr.bar_file = io.StringIO()
    orig = tr.train_step

    def busy_first_steps():
        rec = orig()
        if rec["step"] <= 2:
            time.sleep(3.0)
        return rec

    tr.train_step = busy_first_steps
    t0 = time.perf_counter()
    res = tr.run()
    wall = time.perf_counter() - t0
    train = [r for r in res.history if r["kind"] == "train"]
    slowest = max(r["tokens"] / r["tokens_per_s"] for r in train[2:])
    final = slowest + tr._overhead_s["eval"] + tr._overhead_s["save"]  # a step, the final evaluation and checkpoint
    assert not res.interrupted and res.steps_done == len(train)
    assert res.seconds <= budget + slowest + 1.0, (res.seconds, slowest)  # within the budget (+ one step's noise)
    assert res.seconds > 0.8 * budget or budget - res.seconds < final + 1.0, (res.seconds, final)  # and using it
    assert wall < budget + slowest + 10  # plots included
    prog = [r["progress"] for r in train]
    assert prog == sorted(prog) and prog[2] > 0.15  # the slow steps took a share of the budget, not of a step plan
    last = train[-1]
    assert last["lr"] == pytest.approx(t.lr * t.final_lr_ratio)  # the LR schedule reached its end
    assert last["mtp_lambda"] == t.mtp_lambda_late and last["batch"] == t.batch_size
    evals = [r for r in res.history if r["kind"] == "eval"]
    assert len(evals) >= 3 and evals[-1]["step"] == res.steps_done  # at 25/50/75% of the budget and at the end
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert ckpt.name == f"step_{res.steps_done:08d}"
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["budget"]["seconds"] == budget and 0.8 * budget < state["budget"]["spent"] <= res.seconds
    bar = tr.bar_file.getvalue()  # seconds spent / budget with the step, not a step count with an ETA
    assert f"/{budget:.0f} s, step=" in bar and "it/s" not in bar


def test_resume_continues_the_budget(data_dir, tmp_path):
    m, t = _cfgs()
    tr = Trainer(m, t, data_dir, tmp_path, progress=False, budget=TimeBudget(600, ckpt_every=0.5))
    orig = tr.train_step

    def interrupt_after_two():
        rec = orig()
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec

    tr.train_step = interrupt_after_two
    first = tr.run()
    assert first.interrupted and first.steps_done == 2
    state = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "trainer.json").read_text())
    spent, progress = state["budget"]["spent"], state["budget"]["progress"]
    assert state["step"] == 2 and 0 < spent <= first.seconds and 0 < progress < 0.5
    time.sleep(1.0)  # the pause before the resume does not count
    again = Trainer(m, t, data_dir, tmp_path, resume=True, progress=False)  # the checkpoint's budget is kept
    assert again.budget == TimeBudget(600, ckpt_every=0.5) and again.spent == spent
    second = again.run(max_steps=1)
    assert again.spent == pytest.approx(spent + second.seconds, abs=0.05)
    assert second.history[0]["progress"] >= round(progress, 5)  # (records round the progress to 5 places)
    # resumed with a budget that has only a few seconds left: it stops there, with an evaluation and a checkpoint
    third = Trainer(m, t, data_dir, tmp_path, resume=True, progress=False, budget=TimeBudget(spent + 6))
    assert third.step == 2 and third.spent == spent
    res = third.run()
    train = [r for r in res.history if r["kind"] == "train"]
    slowest = max(r["tokens"] / r["tokens_per_s"] for r in train)
    assert not res.interrupted and res.steps_done >= 3 and third.spent <= spent + 6 + slowest + 1.0
    assert res.history[-1] == {"kind": "eval", "step": res.steps_done, "heldout_loss": res.final_heldout_loss}
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{res.steps_done:08d}"
    rows = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, res.steps_done + 1))
    prog = [r["progress"] for r in rows]
    assert prog == sorted(prog)
    # a step-driven checkpoint is not silently turned into a time-budgeted run
    step_run = tmp_path / "steps"
    _, ts = _cfgs(steps=2, ckpt_every=1)
    Trainer(m, ts, data_dir, step_run, progress=False).run()
    with pytest.raises(ValueError, match="step-driven run .* resume it without a time budget"):
        Trainer(m, ts, data_dir, step_run, resume=True, progress=False, budget=TimeBudget(10))
