"""`nanoseek speedrun` drives its pre-training by the time budget (no step plan from timed first steps)."""

import inspect

import pytest

from nanoseek.config import ConfigError
from nanoseek.recipes import speedrun as sr


class _Stop(Exception):
    pass


def test_speedrun_pretraining_is_time_budgeted(tmp_path, monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, model_cfg, cfg, data_dir, out_dir, budget=None, **kw):
            seen.append((cfg, budget))
            raise _Stop

    monkeypatch.setattr(sr, "Trainer", Recorder)
    with pytest.raises(_Stop):
        sr.speedrun(tmp_path / "a", minutes=3, max_chars=60_000, sets=["vocab_size=512"], post_train=False)
    cfg, budget = seen[-1]
    assert 3 * 60 - sr.REPORT_SECONDS - 60 < budget.seconds <= 3 * 60 - sr.REPORT_SECONDS
    assert (budget.eval_every, budget.ckpt_every) == (0.1, 0.25) and cfg.steps == sr.STEP_CAP
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data"]  # no throwaway calibration run
    # --steps N: a step-driven run, as before
    with pytest.raises(_Stop):
        sr.speedrun(tmp_path / "b", minutes=3, max_chars=60_000, steps=40, sets=["vocab_size=512"], post_train=False)
    cfg, budget = seen[-1]
    assert budget is None and (cfg.steps, cfg.eval_every, cfg.ckpt_every) == (40, 4, 10)
    # the same --out again: refused before any work, unless --overwrite (which replaces the earlier stages)
    with pytest.raises(ConfigError, match="earlier speedrun .*--overwrite"):
        sr.speedrun(tmp_path / "b", minutes=3, max_chars=60_000, steps=40, sets=["vocab_size=512"], post_train=False)
    (tmp_path / "b" / "data" / "marker").write_text("old")
    with pytest.raises(_Stop):
        sr.speedrun(tmp_path / "b", minutes=3, max_chars=60_000, steps=40, sets=["vocab_size=512"], post_train=False,
                    overwrite=True)
    assert not (tmp_path / "b" / "data" / "marker").exists()
    with pytest.raises(ConfigError, match=r"teacher_slip must be in \[0, 1\], got 1.5"):  # before any work
        sr.speedrun(tmp_path / "c", minutes=3, teacher_slip=1.5)
    assert not (tmp_path / "c").exists()


def test_cli_leaves_the_post_training_defaults_to_the_recipe(monkeypatch):
    """`nanoseek speedrun` without --sft-steps / --grpo-minutes / --teacher-slip runs the recipe's defaults
    (nanoseek.recipes.posttrain); given, they reach the recipe."""
    from nanoseek.cli import main
    from nanoseek.recipes import posttrain

    params = inspect.signature(sr.speedrun).parameters
    assert params["sft_steps"].default == posttrain.SFT_STEPS
    assert params["grpo_minutes"].default == posttrain.GRPO_MINUTES
    assert params["teacher_slip"].default == posttrain.TEACHER_SLIP
    calls = []
    monkeypatch.setattr(sr, "speedrun", lambda *a, **kw: calls.append(kw) or {})
    assert main(["speedrun", "--out", "unused"]) == 0
    assert not {"sft_steps", "grpo_minutes", "teacher_slip"} & set(calls[-1])
    assert main(["speedrun", "--out", "unused", "--sft-steps", "50", "--grpo-minutes", "2.5",
                 "--teacher-slip", "0"]) == 0
    assert (calls[-1]["sft_steps"], calls[-1]["grpo_minutes"], calls[-1]["teacher_slip"]) == (50, 2.5, 0.0)
