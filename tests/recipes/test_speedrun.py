"""`nanoseek speedrun` drives its pre-training by the time budget (no step plan from timed first steps)."""

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
