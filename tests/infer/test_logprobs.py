"""Log-probs, echo and n choices on the OpenAI-compatible server: what lm-evaluation-harness's `local-completions`
and OpenAI clients use. The prompt log-probs a server returns equal `nanoseek.eval.loglik` on the same ids, the
generated tokens' equal the raw model distribution's (before temperature), and the real lm-eval scores a
multiple-choice task through the server exactly as `nanoseek eval` does locally (optional suite: -m lmeval)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import openai
import pytest
import torch
from conftest import tiny_config
from infer_helpers import running_server, tiny_model_and_tokenizer

from nanoseek.eval.loglik import loglikelihood
from nanoseek.infer.api import TokenSpeller
from nanoseek.infer.chat import encode_prompt
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.server import build_app
from nanoseek.model import Transformer

MODEL = "tiny"
MAX_LEN = 128
TOL = 1e-4


@pytest.fixture(scope="module")
def srv():
    model, tok = tiny_model_and_tokenizer()
    engine = Engine(model, tok, max_batch=4, max_len=MAX_LEN, prefill_chunk=16)  # long prompts: several chunks
    with running_server(build_app(engine, tok, MODEL)) as (_, port):
        yield SimpleNamespace(tok=tok, model=model, engine=engine, port=port, spell=TokenSpeller(tok),
                              client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-",
                                                   max_retries=0, timeout=60))


def per_token(model: Transformer, ids: list[int]) -> list[float]:
    """log p(ids[k] | ids[:k]) for k >= 1, by `nanoseek.eval.loglik` (the local scoring path of `nanoseek eval`)."""
    return [r.logprob for r in loglikelihood(model, [(ids[:k], ids[k : k + 1]) for k in range(1, len(ids))])]


def raw_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward over ids: [len(ids), V]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


PROMPTS = ["def fibonacci(n):\n    return", "import heapq\n", "x", "class Queue:\n    def put(self, item):\n" * 3]


def test_echo_prompt_logprobs_equal_loglikelihood(srv):
    """echo + max_tokens 0 (score only): every echoed token's log-prob equals nanoseek.eval.loglik's within 1e-4.
    A text prompt is scored after the bos the server puts first, which is not echoed (the echo is the prompt as
    sent: tokens and text_offset spell its text); token ids are taken as given, their first token has no log-prob
    (null), and so has a text that starts with the bos itself."""
    for prompt in PROMPTS:
        ids = srv.tok.encode(prompt)
        out = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        [choice] = out.choices
        lp = choice.logprobs
        assert choice.text == prompt and choice.finish_reason == "length"
        assert out.usage.prompt_tokens == len(ids) + 1 and out.usage.completion_tokens == 0  # the bos counts
        assert lp.tokens == [srv.spell(t)[0] for t in ids] and "".join(lp.tokens) == prompt
        assert lp.token_logprobs == pytest.approx(per_token(srv.model, [srv.tok.bos_id, *ids]), abs=TOL)
        assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(ids))]
        for got, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
            assert 2 <= len(top) <= 3 and max(top.values()) >= got - TOL  # the 2 most likely + the prompt's token
    ids = srv.tok.encode(PROMPTS[0])
    for prompt in ([ids], srv.tok.decode([srv.tok.bos_id, *ids])):  # token ids (batched as lm-eval sends them)
        out = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        lp = out.choices[0].logprobs
        sent = prompt[0] if isinstance(prompt, list) else [srv.tok.bos_id, *ids]
        assert len(lp.tokens) == len(sent) == out.usage.prompt_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(per_token(srv.model, sent), abs=TOL)
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the prompt's token alone


def test_lm_eval_loglikelihood_request(srv):
    """The request lm-eval 0.4.13's local-completions sends for a loglikelihood (echo, max_tokens 1, logprobs 1,
    token ids) and its parsing: sum(token_logprobs[ctxlen:-1]) is log p(continuation | context), and is_greedy
    compares each token with max(top_logprobs)."""
    ctx = [srv.tok.bos_id, *srv.tok.encode("Question: what is 2 plus 2?\nAnswer:")]
    for option in (" 4", " four", " fish"):
        cont = srv.tok.encode(option)
        body = {"model": MODEL, "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        choice = srv.client.completions.create(**body).choices[0]
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ctx) + len(cont) + 1  # the prompt's, then the generated token's
        got = sum(lp.token_logprobs[len(ctx) : -1])
        greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(ctx) : -1],
                                                                lp.top_logprobs[len(ctx) : -1], strict=True))
        [ref] = loglikelihood(srv.model, [(ctx, cont)])
        assert got == pytest.approx(ref.logprob, abs=TOL) and greedy == ref.is_greedy


def test_generated_logprobs_are_the_raw_distribution(srv):
    """Generated tokens' log-probs (with and without echo) are those of the model's own distribution, before
    temperature (at temperature 0 and at 1.7 alike); top_logprobs holds the most likely tokens and the chosen
    one."""
    prompt = "def fibonacci(n):\n"
    ids = [srv.tok.bos_id, *srv.tok.encode(prompt)]
    for temperature in (0, 1.7):
        out = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3, seed=5,
                                            temperature=temperature, extra_body={"ignore_eos": True})
        lp = out.choices[0].logprobs
        [ref] = Engine(srv.model, srv.tok, max_batch=1, max_len=MAX_LEN).generate(
            [ids], SamplingParams(max_new_tokens=8, temperature=temperature, seed=5, ignore_eos=True))
        assert out.choices[0].text == ref.text and lp.tokens == [srv.spell(t)[0] for t in ref.output_ids]
        dist = raw_logprobs(srv.model, ids + ref.output_ids)[len(ids) - 1 : -1]
        want = [float(row[t]) for row, t in zip(dist, ref.output_ids, strict=True)]
        assert lp.token_logprobs == pytest.approx(want, abs=TOL)
        for row, top, t in zip(dist, lp.top_logprobs, ref.output_ids, strict=True):
            best = row.topk(3)
            most = {srv.spell(i)[0]: v for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)}
            most.setdefault(srv.spell(t)[0], float(row[t]))
            assert top == pytest.approx(most, abs=TOL)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    echoed = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3, temperature=0,
                                           echo=True, extra_body={"ignore_eos": True}).choices[0]
    plain = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0]
    n = len(ids) - 1  # the echo leaves out the bos
    assert echoed.text == prompt + plain.text
    assert echoed.logprobs.tokens[n:] == plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
    assert echoed.logprobs.text_offset[n:] == [len(prompt) + o for o in plain.logprobs.text_offset]


def test_stop_string_cuts_the_logprobs_too(srv):
    """Tokens of the stop string (after the cut) are left out of the log-probs; the text is cut before it."""
    body = dict(model=MODEL, prompt="import bisect\n", max_tokens=16, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True})
    full = srv.client.completions.create(**body).choices[0]
    offsets = full.logprobs.text_offset
    cut = next(c for c in offsets[4:] if len(stop := full.text[c : c + 2]) == 2 and "\ufffd" not in stop
               and full.text.find(stop) == c)  # a stop string first seen there
    short = srv.client.completions.create(**{**body, "stop": [full.text[cut : cut + 2]]}).choices[0]
    assert short.text == full.text[:cut] and short.finish_reason == "stop"
    assert short.logprobs.text_offset == [o for o in offsets if o < cut]
    assert short.logprobs.tokens == full.logprobs.tokens[: len(short.logprobs.tokens)]


def test_engine_reports_the_stop_tokens_logprob():
    """lm-eval reads token_logprobs[ctxlen:-1]: a request that ends on a stop token still reports that token's
    log-prob (after the output's), and scoring a prompt as long as the context works."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    eng = Engine(model, max_batch=2, max_len=32)
    prompt = [0, 5, 9, 13, 2]
    [free] = eng.generate([prompt], SamplingParams(max_new_tokens=3, ignore_eos=True))
    stop = free.output_ids[1]
    [r] = eng.generate([prompt], SamplingParams(max_new_tokens=3, stop_token_ids=[stop], ignore_eos=True,
                                                logprobs=0))
    assert r.output_ids == free.output_ids[:1] and r.finish_reason == "stop"
    assert [e.token for e in r.logprobs] == free.output_ids[:2]
    long = list(range(1, 33))
    [s] = eng.generate([long], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    assert s.finish_reason == "length" and not s.output_ids and s.prompt_logprobs[0] is None
    assert [e.logprob for e in s.prompt_logprobs[1:]] == pytest.approx(per_token(model, long), abs=TOL)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)  # generating nothing only makes sense when scoring the prompt


def test_speculative_decoding_reports_the_same_logprobs():
    """With MTP drafting, a token that comes out of an accepted draft gets its log-prob from the verify forward's
    second position: the same numbers as plain decoding."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompts = [[5, 9, 13, 2, 40, 41, 7, 7, 8], [3, 4], [60, 61, 62, 63, 64, 65, 66], [11]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2)
    plain = Engine(model, max_batch=4, max_len=64).generate(prompts, params)
    spec = Engine(model, max_batch=4, max_len=64, speculative=True)
    for a, b in zip(plain, spec.generate(prompts, params), strict=True):
        assert [e.token for e in a.logprobs] == [e.token for e in b.logprobs] == a.output_ids == b.output_ids
        assert [e.logprob for e in b.logprobs] == pytest.approx([e.logprob for e in a.logprobs], abs=TOL)
        assert [[i for i, _ in e.top] for e in b.logprobs] == [[i for i, _ in e.top] for e in a.logprobs]
    assert spec.stats.accepted >= 1


def test_streamed_echo_and_logprobs_equal_the_whole_answer(srv):
    """Streaming with echo and logprobs: the chunks' texts and log-probs join to the non-streamed choice."""
    body = dict(model=MODEL, prompt="def heappop(heap):\n", max_tokens=6, temperature=0, echo=True, logprobs=1,
                extra_body={"ignore_eos": True})
    whole = srv.client.completions.create(**body).choices[0]
    text, tokens, lps, offsets = "", [], [], []
    for chunk in srv.client.completions.create(stream=True, **body):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert lps == pytest.approx(whole.logprobs.token_logprobs, abs=TOL)


def test_n_choices_reproducible_with_a_seed(srv):
    """n choices with their own indices; with a seed, choice 0 is the n = 1 answer and the others are derived
    from it (the same answers again); streaming gives each choice the same text."""
    body = dict(model=MODEL, prompt="def heappush(heap, item):\n", max_tokens=8, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})
    a = srv.client.completions.create(n=3, **body)
    b = srv.client.completions.create(n=3, **body)
    one = srv.client.completions.create(n=1, **body)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.text for c in b.choices]
    assert texts[0] == one.choices[0].text and len(set(texts)) == 3
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == one.usage.prompt_tokens
    streamed = ["", "", ""]
    finish = {}
    for chunk in srv.client.completions.create(n=3, stream=True, **body):
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert streamed == texts and finish == {0: "length", 1: "length", 2: "length"}

    msgs = [{"role": "user", "content": "Write a queue."}]
    chat = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    c2 = srv.client.chat.completions.create(n=2, **chat)
    assert [c.index for c in c2.choices] == [0, 1]
    assert c2.choices[0].message.content == srv.client.chat.completions.create(**chat).choices[0].message.content
    assert c2.choices[0].message.content != c2.choices[1].message.content


def test_chat_logprobs_and_top_logprobs(srv):
    """Chat `logprobs: true` + `top_logprobs`: one entry per generated token (token, logprob, bytes, the top
    alternatives), as the engine records them; the same whole and streamed."""
    msgs = [{"role": "user", "content": "Sort a list."}]
    body = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    out = srv.client.chat.completions.create(**body)
    [ref] = Engine(srv.model, srv.tok, max_batch=1, max_len=MAX_LEN).generate(
        [encode_prompt(msgs, srv.tok)], SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2))
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == ref.text and len(content) == len(ref.logprobs) == 8

    def spelled(tid: int, lp: float) -> tuple[str, list[int], float]:
        text, raw = srv.spell(tid)
        return text, list(raw), pytest.approx(lp, abs=TOL)

    for got, want in zip(content, ref.logprobs, strict=True):
        assert (got.token, got.bytes, got.logprob) == spelled(want.token, want.logprob)
        assert [(t.token, t.bytes, t.logprob) for t in got.top_logprobs] == [spelled(i, lp) for i, lp in want.top]
        assert got.logprob == pytest.approx(got.top_logprobs[0].logprob, abs=TOL)  # greedy: the most likely
    streamed = [e for chunk in srv.client.chat.completions.create(stream=True, **body) for c in chunk.choices
                if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.bytes, e.logprob) for e in streamed] == [(e.token, e.bytes, e.logprob) for e in content]
    plain = srv.client.chat.completions.create(**{**body, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == ref.text


def test_token_spelling_of_partial_characters(srv):
    """A token that holds part of a UTF-8 character is spelled `bytes:\\xNN` with its real bytes."""
    tok = srv.tok
    [tid] = [i for i in range(tok.vocab_size) if tok.id_to_token(i) == "Ã"]  # byte 0xc3, as byte-level BPE writes it
    assert srv.spell(tid) == ("bytes:\\xc3", b"\xc3")
    ids = tok.encode("é")
    assert b"".join(srv.spell(t)[1] for t in ids) == "é".encode()


# ---- the real lm-evaluation-harness against the real server (optional: -m lmeval) ----------------------------------
ROWS = [{"question": f"What is {a} plus {b}?", "options": [str(a + b), str(a * b + 1), "seven"], "answer": i % 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (9, 3), (4, 4), (8, 5)])]
TASK = """\
task: nanoseek_served_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""


LMEVAL_SETUPS = {  # lm-eval's model_args beyond base_url, model and tokenizer (the checkpoint folder)
    "token-ids": "add_bos_token=True",  # its ids start with bos, as the server's scoring of text does
    "text": "add_bos_token=True,tokenized_requests=False",  # the text starts with bos: the server adds none
    "text-ids-without-bos": "tokenized_requests=False",  # lm-eval counts no bos; the server adds it, unechoed
}


@pytest.mark.lmeval
@pytest.mark.parametrize("setup", LMEVAL_SETUPS)
def test_lm_eval_local_completions_matches_nanoseek_eval(srv, tmp_path, monkeypatch, setup):
    """lm-eval 0.4.13's `local-completions` against the server (echo + logprobs + max_tokens 1), with the
    checkpoint folder as its Hugging Face tokenizer, requests sent as token ids or as text, gets the accuracy
    `nanoseek eval` gets locally on the same rows, and every option's log-likelihood within 1e-4."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (make test-lmeval installs it)")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    from lm_eval.tasks import TaskManager

    import nanoseek
    from nanoseek.eval.harness import EvalConfig, LocalBackend, evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nanoseek.save(srv.model, tmp_path / "ckpt")
    srv.tok.save(tmp_path / "ckpt" / "tokenizer.json")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASK.format(data=data))
    args = (f"base_url=http://127.0.0.1:{srv.port}/v1/completions,model={MODEL},tokenizer_backend=huggingface,"
            f"tokenizer={tmp_path / 'ckpt'},max_length={MAX_LEN},{LMEVAL_SETUPS[setup]}")
    res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["nanoseek_served_mc"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    local = LocalBackend(srv.model, srv.tok, max_len=MAX_LEN)
    ours = evaluate(local, EvalConfig(tasks=(f"mc={data}",), fewshot=0))["tasks"]["mc"]
    got = res["results"]["nanoseek_served_mc"]
    assert (got["acc,none"], got["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    for s in res["samples"]["nanoseek_served_mc"]:
        pairs = [(f"Question: {s['doc']['question']}\nAnswer:", " " + o) for o in s["doc"]["options"]]
        want = [r.logprob for r in local.loglikelihood(pairs)]
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(want, abs=TOL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
