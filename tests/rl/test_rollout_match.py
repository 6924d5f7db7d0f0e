"""Rollouts that match training: the routing record / replay hook, the engine's recorded routing, and GRPO's
rollout-vs-trainer metrics with routing replay and the three sources of pi_old."""

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.model.moe import routing_hooks, swiglu
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    return train_tokenizer(texts, vocab_size=300, show_progress=False)


def test_replayed_experts_run_with_current_gate_weights_and_train_the_router():
    torch.manual_seed(0)
    moe = Transformer(tiny_config()).model.layers[1].mlp
    x = torch.randn(1, 5, 64)
    xf = x.reshape(5, 64)
    _, own, s = moe.gate(xf)
    forced = (own + 1) % 8  # different experts for every token but the last, which keeps its own choice
    forced[-1] = -1
    with routing_hooks([moe.gate], [forced], record=True) as logs:
        y, _ = moe(x)
    used = torch.cat([forced[:-1], own[-1:]])
    assert torch.equal(logs[0][0], used)
    # independent reference: sum_k g_k Expert_k(x) + Shared(x), g = the normalised affinities at the used experts
    g = s.gather(1, used)
    g = g / g.sum(-1, keepdim=True) * moe.gate.scale
    ref = moe.shared_experts(xf)
    for t in range(5):
        for k in range(3):
            e = used[t, k]
            gate, up = (moe.experts.gate_up_proj[e] @ xf[t]).chunk(2)
            ref[t] = ref[t] + g[t, k] * (moe.experts.down_proj[e] @ swiglu(gate, up))
    torch.testing.assert_close(y.reshape(5, 64), ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    # outside the block the router chooses again; a replay of the wrong size is refused
    assert moe.gate.replay is None and torch.equal(moe.gate(xf)[1], own)
    with pytest.raises(ValueError, match="routing replay"), routing_hooks([moe.gate], [forced[:2]]):
        moe(x)


def test_engine_records_the_experts_of_every_token_it_read():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = [5, 17, 3, 40, 8, 21, 9]
    for spec in (False, True):  # the speculative verify reads 1 or 2 tokens per step: only the accepted ones count
        eng = Engine(model, max_batch=2, max_len=64, speculative=spec, prefill_chunk=4)
        [req] = eng.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True, routed_experts=True))
        routing = req.routing()
        assert routing.shape == (len(prompt) + 9, 2, 3)  # the last output token is sampled, never read
        with torch.no_grad(), routing_hooks(model.moe_gates()[:2], record=True) as logs:
            model(torch.tensor([prompt + req.output_ids[:-1]]))
        whole = torch.stack([log[0] for log in logs], dim=1)  # the full-sequence forward's own choice
        assert torch.equal(routing.long().sort(-1).values, whole.sort(-1).values)
    with pytest.raises(ValueError, match="routed_experts"):
        eng.generate([prompt], SamplingParams(max_new_tokens=2))[0].routing()


def _step(tok, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.05)).to(dtype)
    cfg = GRPOConfig(task="arithmetic", task_knobs={"digits": 1}, steps=1, questions_per_step=2, group_size=4,
                     max_new_tokens=10, eval_n=2, micro_batch=8, lr=3e-3, mtp_lambda=0, **kw)
    tr = GRPOTrainer(model, tok, cfg, "unused", progress=False)
    return tr, tr.train_step()


def test_matching_path_gives_ratio_one_and_no_routing_disagreement(tok, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen = []
    real = nanoseek.rl.grpo.grpo_loss

    def spy(logp, old_logp, *a, **k):
        seen.append(torch.exp(logp.detach() - old_logp))
        return real(logp, old_logp, *a, **k)

    monkeypatch.setattr(nanoseek.rl.grpo, "grpo_loss", spy)
    tr, rec = _step(tok, routing_replay=True)  # pi_old = the first pass's own log-probs
    assert tr.engine.stats.prefix_hit_tokens > 0  # (the group's samples shared their prompt's read and routing)
    assert torch.all(seen[0] == 1.0) and rec["ratio_dev_max"] == 0.0
    assert rec["routing_disagree"] == 0.0 and rec["routing_disagree_decisions"] == 0.0
    # the engine's log-probs differ from the trainer's only by fp32 rounding (decode vs full-sequence kernels)
    assert 0.0 < rec["logprob_diff_max"] < 1e-5 and rec["logprob_diff_mean"] < 1e-6
    for key in ("time_rollout", "time_score", "time_logprob", "time_train"):
        assert rec[key] >= 0
    assert sum(rec[k] for k in ("time_rollout", "time_score", "time_logprob", "time_train")) <= rec["seconds"] + 1e-3
    # pi_old = the rollout's log-probs: the first-pass ratio is the engine / trainer difference (~1e-6 in fp32),
    # and no forward is spent on it
    seen.clear()
    _, rec = _step(tok, routing_replay=True, old_logprobs="rollout")
    assert 0.0 < rec["ratio_dev_max"] < 1e-5 and (seen[0] - 1).abs().max() < 1e-5
    assert rec["time_logprob"] < 0.05  # no reference (beta 0), no recompute
    seen.clear()
    _, rec = _step(tok, old_logprobs="recompute")
    assert rec["ratio_dev_max"] < 1e-5


def test_rollouts_sharing_the_prompt_read_are_the_unshared_ones(tok, monkeypatch, tmp_path):
    """With the rollout engine's prefix cache (the default) each question's prompt is read once per group, and two
    steps sample what they sample without it: the same completions, log-probs and recorded experts (the prompt's
    copied from the group's first sample), also after the update (the keys the first step's rollouts left were
    computed with the old weights and are not reused); replay keeps the ratio at 1 and no routing disagreement."""
    monkeypatch.chdir(tmp_path)
    got: list[list] = []
    real = GRPOTrainer.sample

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        got[-1].append(out)
        return out

    monkeypatch.setattr(GRPOTrainer, "sample", spy)
    recs, stats = {}, {}
    for cache in (False, True):
        got.append([])
        tr, first = _step(tok, routing_replay=True, prefix_cache=cache)
        recs[cache], stats[cache] = [first, tr.train_step()], tr.engine.stats
    plain, cached = got
    for step_plain, step_cached in zip(plain, cached, strict=True):
        for a, b in zip(step_cached, step_plain, strict=True):
            assert (a.prompt, a.completion) == (b.prompt, b.completion)
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            assert a.routing.shape == (len(a.prompt) + len(a.completion) - 1, 2, 3)
            assert torch.equal(a.routing, b.routing)
    groups = [rolls[g : g + 4] for rolls in cached for g in range(0, len(rolls), 4)]
    assert stats[True].prefill_tokens == sum(len(g[0].prompt) + 3 for g in groups)
    assert stats[True].prefix_hit_tokens == sum(3 * (len(g[0].prompt) - 1) for g in groups)
    assert stats[False].prefix_hit_tokens == 0
    for rec in recs[True]:
        assert rec["ratio_dev_max"] == 0.0 and rec["routing_disagree"] == 0.0 and rec["logprob_diff_max"] < 1e-5


def test_bf16_rollouts_disagree_on_routing_and_replay_removes_it(tok, monkeypatch, tmp_path):
    """In bf16 the engine's one-token decode and the trainer's full-sequence forward round differently, enough
    to flip router decisions; replaying the rollout's experts removes those flips and most of the log-prob gap."""
    monkeypatch.chdir(tmp_path)
    _, off = _step(tok, torch.bfloat16)
    _, on = _step(tok, torch.bfloat16, routing_replay=True)
    assert off["routing_disagree"] > 0 and off["routing_disagree_decisions"] > 0
    assert on["routing_disagree"] == 0.0 and on["routing_disagree_decisions"] == 0.0
    assert on["logprob_diff_max"] < off["logprob_diff_max"]
    assert on["ratio_dev_max"] == 0.0
