"""Prefix caching (`Engine(prefix_cache=True)`, `serve --prefix-cache`): a request starts after the longest prefix of
its prompt whose keys a slot holds -- left by a finished request (reused in place) or written by a running one
(copied) -- and generates what it would without the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.model.moe import routing_hooks

SYSTEM = [5 + (7 * i) % 90 for i in range(40)]  # a shared "system prompt" of 40 tokens
SUFFIXES = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [11, 12, 14]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams, one_by_one: bool) -> list:
    if one_by_one:
        return [engine.generate([p], params)[0] for p in prompts]
    return engine.generate(prompts, params)


@pytest.mark.parametrize("sampled", [False, True])
def test_same_outputs_with_and_without_the_cache(model, sampled):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=1,
                            **(dict(temperature=1.0, seed=3) if sampled else {}))
    prompts = [SYSTEM + s for s in SUFFIXES]
    plain = _run(Engine(model, max_batch=2, max_len=128, prefill_chunk=16), prompts, params, one_by_one=True)
    engine = Engine(model, max_batch=2, max_len=128, prefill_chunk=16, prefix_cache=True)
    cached = _run(engine, prompts, params, one_by_one=True)
    assert [r.output_ids for r in cached] == [r.output_ids for r in plain]
    for a, b in zip(cached, plain, strict=True):  # the same distributions, not just the same argmax
        got, ref = torch.tensor([x.logprob for x in a.logprobs]), torch.tensor([x.logprob for x in b.logprobs])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # request 2 reuses the system prompt, 3 too, 4 shares [11, 12] more with request 1 (still in a free slot)
    assert engine.stats.prefix_hit_tokens == 40 + 40 + 42
    assert engine.stats.prefill_tokens == sum(len(p) for p in prompts) - engine.stats.prefix_hit_tokens


def _check_routing(model, req) -> None:
    """req's recorded experts are, at every position it read, those of one full-sequence forward over them (an
    independent computation: no cache, no engine)."""
    routing = req.routing()
    assert routing.shape == (len(req.prompt_ids) + len(req.output_ids) - 1, 2, 3)
    with torch.no_grad(), routing_hooks(model.moe_gates()[:2], record=True) as logs:
        model(torch.tensor([req.prompt_ids + req.output_ids[:-1]]))
    whole = torch.stack([log[0] for log in logs], dim=1)
    assert torch.equal(routing.long().sort(-1).values, whole.sort(-1).values)


@pytest.mark.parametrize("routed", [False, True])
def test_copied_from_a_running_request_and_the_same_prompt_again(model, routed):
    """A running request's first 32 positions, then a finished one's whole prompt, are reused; a request recording
    its routing takes the holder's experts for those positions with the keys."""
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, routed_experts=routed)
    long = SYSTEM + SUFFIXES[0]
    ref = Engine(model, max_batch=2, max_len=128).generate([long, SYSTEM + SUFFIXES[1]], params)
    engine = Engine(model, max_batch=2, max_len=128, prefill_chunk=16, prefix_cache=True)
    a = engine.submit(long, params)
    engine.step()  # a has written its first 16 positions
    engine.step()  # ... and 32
    b = engine.submit(SYSTEM + SUFFIXES[1], params)  # starts from a's 32 positions, copied into the other slot
    while not (a.finished and b.finished):
        engine.step()
    assert engine.stats.prefix_hit_tokens == 32
    assert [a.output_ids, b.output_ids] == [r.output_ids for r in ref]
    again = engine.generate([long], params)[0]  # all but the last prompt token from the finished request
    assert engine.stats.prefix_hit_tokens == 32 + len(long) - 1 and again.output_ids == ref[0].output_ids
    if routed:
        for got, want in zip([a, b, again], [*ref, ref[0]], strict=True):
            assert torch.equal(got.routing(), want.routing())
            _check_routing(model, got)


def test_requests_that_need_every_prompt_position_skip_it(model):
    engine = Engine(model, max_batch=2, max_len=128, prefix_cache=True)
    engine.generate([SYSTEM + SUFFIXES[0]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    r = engine.generate([SYSTEM + SUFFIXES[1]], SamplingParams(max_new_tokens=2, ignore_eos=True,
                                                                prompt_logprobs=0))[0]
    assert engine.stats.prefix_hit_tokens == 0 and len(r.prompt_logprobs) == len(SYSTEM) + 2


def test_recorded_routing_needs_a_holder_that_recorded_it(model):
    """A request recording its routing does not start from keys whose experts were not recorded (it reads the
    prompt); one that does not record it starts from any holder."""
    engine = Engine(model, max_batch=1, max_len=128, prefix_cache=True)
    engine.generate([SYSTEM + SUFFIXES[0]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    r = engine.generate([SYSTEM + SUFFIXES[1]], SamplingParams(max_new_tokens=2, ignore_eos=True,
                                                                routed_experts=True))[0]
    assert engine.stats.prefix_hit_tokens == 0
    _check_routing(model, r)
    engine.generate([SYSTEM + SUFFIXES[2]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert engine.stats.prefix_hit_tokens == len(SYSTEM)
    engine.forget_prefixes()  # (after a weight update): nothing is reused
    engine.generate([SYSTEM + SUFFIXES[2]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert engine.stats.prefix_hit_tokens == len(SYSTEM)


def test_groups_read_each_prompt_once(model):
    """generate_groups (GRPO's rollouts): with the cache, the k samples of a prompt share one prefill and sample
    what they would without it (the same seeds)."""
    prompts = [SYSTEM + s for s in SUFFIXES[:3]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    plain = Engine(model, max_batch=8, max_len=128).generate_groups(prompts, 4, params, seed=5)
    engine = Engine(model, max_batch=8, max_len=128, prefix_cache=True)
    cached = engine.generate_groups(prompts, 4, params, seed=5)
    assert [[r.output_ids for r in g] for g in cached] == [[r.output_ids for r in g] for g in plain]
    assert engine.stats.prefix_hit_tokens == sum(3 * (len(p) - 1) for p in prompts)
    assert engine.stats.prefill_tokens == sum(len(p) + 3 for p in prompts)


def test_groups_that_record_routing_read_each_prompt_once(model):
    """GRPO's rollouts record their experts: with the cache the k samples of a prompt still share one prefill,
    sample what they would without it, and report the routing of every position they read -- the prompt's
    copied from the group's first sample -- equal to the routing recorded without the cache."""
    prompts = [SYSTEM + s for s in SUFFIXES[:3]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True, logprobs=0, routed_experts=True)
    plain = Engine(model, max_batch=8, max_len=128).generate_groups(prompts, 4, params, seed=5)
    engine = Engine(model, max_batch=8, max_len=128, prefix_cache=True)
    cached = engine.generate_groups(prompts, 4, params, seed=5)
    assert engine.stats.prefix_hit_tokens == sum(3 * (len(p) - 1) for p in prompts)
    assert engine.stats.prefill_tokens == sum(len(p) + 3 for p in prompts)
    for group, ref in zip(cached, plain, strict=True):
        for a, b in zip(group, ref, strict=True):
            assert a.output_ids == b.output_ids
            torch.testing.assert_close(torch.tensor([x.logprob for x in a.logprobs]),
                                       torch.tensor([x.logprob for x in b.logprobs]), atol=1e-5, rtol=0)
            assert torch.equal(a.routing(), b.routing())
        _check_routing(model, group[1])
