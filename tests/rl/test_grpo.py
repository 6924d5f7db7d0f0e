"""GRPO trainer: rollouts through the engine, the update direction, metrics, and exact resume."""

import io
import json

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer, problem_prompt, score
from nanoseek.rl.rewards import format_reward
from nanoseek.rl.tasks import generate


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    return train_tokenizer(texts, vocab_size=300, show_progress=False)


def has_e(prompt: str, completion: str, **_) -> float:
    """A reward a random model earns sometimes: a completion that contains the letter e."""
    return float("e" in completion)


def _cfg(**kw) -> GRPOConfig:
    base = dict(task="arithmetic", task_knobs={"digits": 1}, steps=2, questions_per_step=2, group_size=4,
                max_new_tokens=8, eval_n=4, eval_every=2, ckpt_every=1, lr=3e-3, mu=2, micro_batch=3)
    return GRPOConfig(**{**base, **kw})


def _model(tok):
    torch.manual_seed(0)
    return nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.05))


def test_update_raises_the_log_prob_of_better_completions(tok, tmp_path):
    tr = GRPOTrainer(_model(tok), tok, _cfg(beta=0.01), tmp_path, progress=False, reward_fn=has_e)
    problems = list(generate("arithmetic", 2, seed=5, digits=1))
    rolls = tr.rollout(problems, 8, __import__("nanoseek").infer.engine.SamplingParams(
        max_new_tokens=8, temperature=1.0), seed=3)
    seqs = [(p, c) for p, c, _ in rolls]
    rewards = torch.tensor([has_e("", t) for _, _, t in rolls])
    assert 0 < rewards.sum() < len(rewards)  # both kinds present

    def mean_logp():
        with torch.no_grad():
            lp, _, m = tr.token_logp(tr.model, seqs)
        return (lp * m).sum(1) / m.sum(1)

    before = mean_logp()
    # feed these rollouts to the update by replaying train_step's optimisation on them
    from nanoseek.rl.grpo_loss import group_advantages, grpo_loss
    adv = group_advantages(rewards, 8)
    with torch.no_grad():
        old, _, m = tr.token_logp(tr.model, seqs)
    for _ in range(3):
        tr.optimizer.zero_grad()
        lp, _, m = tr.token_logp(tr.model, seqs)
        loss, _ = grpo_loss(lp, old, None, adv, m)
        loss.backward()
        tr.optimizer.step()
    delta = mean_logp() - before
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_train_steps_metrics_plot_and_exact_resume(tok, tmp_path):
    full = GRPOTrainer(_model(tok), tok, _cfg(steps=3, beta=0.01, log_completions=3), tmp_path / "full",
                       progress=False, reward_fn=has_e)
    recs = full.run()
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "completion_len", "kl", "clip_frac",
                "entropy", "all_equal_groups"):
        assert key in train[0]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 2, 3]
    assert (tmp_path / "full" / "grpo.png").stat().st_size > 1000
    assert (tmp_path / "full" / "checkpoints" / "step_00000003" / "ref.safetensors").is_file()

    part = GRPOTrainer(_model(tok), tok, _cfg(steps=2, beta=0.01, log_completions=3), tmp_path / "part",
                       progress=False, reward_fn=has_e)
    part.run()  # stopped after step 2, resumed from its step-1 checkpoint: step 2's logged rows are dropped
    (tmp_path / "part" / "checkpoints" / "step_00000002").rename(tmp_path / "step2")
    resumed = GRPOTrainer(_model(tok), tok, _cfg(steps=3, beta=0.01, log_completions=3), tmp_path / "part",
                          resume=True, progress=False, reward_fn=has_e)
    assert resumed.step == 1
    resumed.run()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    # log_completions: each step's first 3 rollouts with their rewards; a resumed run drops the later steps' rows
    logged = [json.loads(x) for x in (tmp_path / "full" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(r["reward"] == has_e("", r["completion"]) and r["question"].startswith("Compute ") for r in logged)
    assert all(r["format"] == format_reward("", r["completion"]) for r in logged)
    part_log, full_log = (tmp_path / "part" / "completions.jsonl"), (tmp_path / "full" / "completions.jsonl")
    assert part_log.read_text() == full_log.read_text()


def test_time_budget_progress_bar_and_resume(tok, tmp_path):
    """max_minutes: a tqdm of seconds spent / budget with the step (not a placeholder step count with an ETA); the run
    stops at the budget with an evaluation and a checkpoint, and a resumed run has only the seconds left."""
    cfg = _cfg(steps=100_000, max_minutes=0.02, eval_every=1000, ckpt_every=1000)  # 1.2 s of training steps
    tr = GRPOTrainer(_model(tok), tok, cfg, tmp_path, progress=True, reward_fn=has_e)
    tr.bar_file = io.StringIO()
    recs = tr.run()
    n = tr.step
    assert n >= 1 and [r["kind"] for r in recs] == ["eval", *["train"] * n, "eval"]
    bar = tr.bar_file.getvalue()
    assert f"/1 s, step={n}, reward=" in bar and "100000" not in bar and "it/s" not in bar
    train_seconds = [r["seconds"] for r in recs if r["kind"] == "train"]
    assert sum(train_seconds[:-1]) <= 1.2  # a step starts only while the budget has time for it
    state = json.loads((tmp_path / "checkpoints" / f"step_{n:08d}" / "trainer.json").read_text())
    assert state["budget"]["seconds"] == 1.2 and state["budget"]["spent"] >= sum(train_seconds) - 0.01
    again = GRPOTrainer(_model(tok), tok, cfg, tmp_path, resume=True, progress=False, reward_fn=has_e)
    assert again.step == n and again.spent == state["budget"]["spent"]
    assert again.run() == [] and again.step == n  # the budget was spent


def test_default_reward_and_prompts(tok):
    p = next(generate("arithmetic", 1, seed=0, digits=1))
    assert score(p, p.solution, 0.1) == (1.1, 1.0, 1.0)
    assert score(p, "<think>x</think> <answer>99999</answer>", 0.1) == (0.1, 0.0, 1.0)
    assert score(p, "no idea", 0.1) == (0.0, 0.0, 0.0)
    chat = problem_prompt(p, tok, "chat")
    assert tok.decode(chat).endswith("<\uff5cAssistant\uff5c>")
    assert tok.decode(problem_prompt(p, tok, "r1-zero")).endswith("Assistant:")
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")
