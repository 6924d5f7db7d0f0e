"""The inference engine against the full forward and against itself (batched vs alone, speculative vs plain)."""

import pytest
import torch
from conftest import tiny_config, train_periodic

from nanoseek import preset
from nanoseek.infer.cache import KVCache, kv_values_per_token
from nanoseek.infer.engine import Engine, SamplingParams, sample_token
from nanoseek.infer.sample import generate_simple
from nanoseek.model import Transformer

PROMPTS = [[5, 9, 13, 2, 40, 41, 7, 7, 8], [3, 4], [60, 61, 62, 63, 64, 65, 66], [11]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


@pytest.mark.parametrize("cache", ["latent", "naive"])
@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_cached_logits_equal_full_forward(model, cache, chunk):
    tokens = torch.randint(0, model.config.vocab_size, (23,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0]
    cached = Engine(model, max_batch=2, max_len=64, cache=cache).score(tokens, chunk=chunk)
    assert (cached - full).abs().max().item() <= 1e-4


def test_cached_logits_at_yarn_extended_positions(model):
    """Positions past the YaRN original context (16 in the test config) and a slot other than 0."""
    tokens = torch.randint(0, model.config.vocab_size, (80,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0]
    eng = Engine(model, max_batch=3, max_len=100)
    eng.slots[0] = eng.slots[1] = object()  # occupy slots 0 and 1: score() must use slot 2
    cached = eng.score(tokens, chunk=7)
    assert (cached - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cache", ["latent", "naive"])
def test_greedy_equals_uncached_reference(model, cache):
    eng = Engine(model, max_batch=4, max_len=64, cache=cache, prefill_chunk=4)
    reqs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, r in zip(PROMPTS, reqs, strict=True):
        assert r.output_ids == generate_simple(model, p, 12)
        assert r.finish_reason == "length"


def test_batched_equals_one_at_a_time_with_queueing(model):
    """Prompts of different lengths, more prompts than slots (continuous batching), chunked prefill."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], params)[0].output_ids for p in PROMPTS]
    batched = Engine(model, max_batch=2, max_len=64, prefill_chunk=3).generate(PROMPTS, params)
    assert [r.output_ids for r in batched] == alone
    assert len({tuple(a) for a in alone}) == len(alone)  # the prompts really lead to different answers


def test_sampled_batched_equals_alone_with_same_seed(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], params)[0].output_ids for p in PROMPTS]
    batched = Engine(model, max_batch=4, max_len=64).generate(PROMPTS, params)
    assert [r.output_ids for r in batched] == alone
    other = Engine(model, max_batch=1, max_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True))[0].output_ids
    assert other != alone[0]


def test_stop_tokens_length_and_stream(model):
    eng = Engine(model, max_batch=2, max_len=64)
    ref = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].output_ids
    stop_at = ref[5]
    first = ref.index(stop_at)
    r = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert r.output_ids == ref[:first] and r.finish_reason == "stop"
    assert list(eng.stream(PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True))) == ref
    # the context limit ends a request with 'length'
    short = Engine(model, max_batch=1, max_len=12)
    r = short.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(PROMPTS[0]) + len(r.output_ids) == 12 and r.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        short.submit(list(range(12)))


def test_cancel_frees_slot(model):
    eng = Engine(model, max_batch=1, max_len=64)
    a = eng.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
    b = eng.submit(PROMPTS[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.step()
    eng.step()
    assert len(a.output_ids) >= 1 and not b.output_ids  # b waits for the only slot
    a.cancelled = True
    while not b.finished:
        eng.step()
    assert a.finish_reason == "cancelled" and len(b.output_ids) == 3
    assert not eng.has_work()


@pytest.mark.parametrize("cache", ["latent", "naive"])
def test_speculative_greedy_equals_plain_greedy(model, cache):
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    plain = Engine(model, max_batch=4, max_len=64, cache=cache).generate(PROMPTS, params)
    spec_eng = Engine(model, max_batch=4, max_len=64, cache=cache, speculative=True, prefill_chunk=4)
    spec = spec_eng.generate(PROMPTS, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert spec_eng.stats.drafted > 0


def test_speculative_accepts_drafts_of_a_trained_model():
    m, cycle = train_periodic()
    prompt = cycle[:5].tolist()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain_eng = Engine(m, max_batch=2, max_len=64)
    plain = plain_eng.generate([prompt, cycle[3:10].tolist()], params)
    spec_eng = Engine(m, max_batch=2, max_len=64, speculative=True)
    spec = spec_eng.generate([prompt, cycle[3:10].tolist()], params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert plain[0].output_ids[:8] == cycle.repeat(4)[5:13].tolist()  # it did learn the cycle
    assert spec_eng.stats.acceptance_rate > 0.8
    assert spec_eng.stats.decode_forwards < 0.7 * plain_eng.stats.decode_forwards


def test_sample_token_distribution_and_filters():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(logits, 1.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.1, 0.2, 0.3, 0.4])).abs().max() < 0.03
    assert sample_token(logits) == 3  # greedy
    assert set(sample_token(logits, 1.0, top_k=2, generator=g) for _ in range(200)) == {2, 3}
    # nucleus 0.65: the smallest set reaching it is {3, 2} (0.4 + 0.3)
    assert set(sample_token(logits, 1.0, top_p=0.65, generator=g) for _ in range(200)) == {2, 3}
    assert set(sample_token(logits, 1.0, top_p=0.3, generator=g) for _ in range(50)) == {3}
    # low temperature concentrates on the argmax
    assert set(sample_token(logits, 0.01, generator=g) for _ in range(50)) == {3}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)


def test_latent_cache_is_small():
    v3 = preset("v3")
    assert kv_values_per_token(v3, latent=True) == 576
    assert kv_values_per_token(v3, latent=False) == 128 * (192 + 128)
    assert kv_values_per_token(v3, False) / kv_values_per_token(v3, True) >= 50
    cfg = tiny_config()
    lat, nai = KVCache(cfg, 2, 10, latent=True), KVCache(cfg, 2, 10, latent=False)
    L = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert lat.nbytes == 2 * 11 * L * kv_values_per_token(cfg, True) * 4
    assert nai.nbytes == 2 * 11 * L * kv_values_per_token(cfg, False) * 4


@pytest.mark.slow
def test_compiled_decode_equals_eager(model):
    """torch.compile'd static-shape decode (inductor; needs a C++ compiler) gives the eager tokens."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eager = Engine(model, max_batch=2, max_len=48).generate(PROMPTS[:3], params)
    compiled = Engine(model, max_batch=2, max_len=48, compile=True).generate(PROMPTS[:3], params)
    assert [r.output_ids for r in compiled] == [r.output_ids for r in eager]


@pytest.mark.slow
def test_compiled_engines_keep_their_own_graphs_and_follow_model_changed(model):
    """The compiled step skips dynamo's checks of the modules: two engines over two models (other weights, other
    depth) each run their own graphs, and after `model_changed` a hook added to the model takes effect."""
    torch.manual_seed(1)
    other = Transformer(tiny_config(num_hidden_layers=3)).eval()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = PROMPTS[:2]
    engines = [Engine(m, max_batch=2, max_len=32, compile=True) for m in (model, other)]
    for m, eng in zip((model, other), engines, strict=True):
        want = [r.output_ids for r in Engine(m, max_batch=2, max_len=32).generate(prompts, params)]
        assert [r.output_ids for r in eng.generate(prompts, params)] == want
    token = 17

    def boost(_module, _args, out):  # every position's logits favour `token`
        out = out.clone()
        out[..., token] += 1e4
        return out

    handle = model.lm_head.register_forward_hook(boost)
    try:
        engines[0].model_changed()
        got = engines[0].generate(prompts, params)
        assert all(r.output_ids == [token] * 6 for r in got)
    finally:
        handle.remove()
    engines[0].model_changed()
    assert [r.output_ids for r in engines[0].generate(prompts, params)] == \
        [r.output_ids for r in Engine(model, max_batch=2, max_len=32).generate(prompts, params)]


@pytest.mark.slow
def test_compiled_speculative_equals_plain_greedy():
    """The compiled verify (2-token static step) and MTP draft graphs: the plain greedy tokens, drafts accepted."""
    m, cycle = train_periodic()
    prompts = [cycle[:5].tolist(), cycle[3:10].tolist(), cycle[1:4].tolist()]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = Engine(m, max_batch=2, max_len=64).generate(prompts, params)
    eng = Engine(m, max_batch=2, max_len=64, speculative=True, compile=True)
    spec = eng.generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert eng.stats.acceptance_rate > 0.8
