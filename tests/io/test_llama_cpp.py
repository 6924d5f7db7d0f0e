"""GGUF exports run by llama.cpp itself (llama-cpp-python; `make test-llama` builds it from source and runs these):
next-token logits, greedy continuations, Q8_0 top-1 agreement and tokenisation against nanoseek. The numbers are
printed (`-s`) for BENCHMARKS.md ("GGUF / llama.cpp").

The model is conftest's tiny DeepSeek-V3 with every feature on (YaRN, query compression, group-limited sigmoid routing
with a non-zero balancing bias, a leading dense block, an MTP module), briefly trained so that its next-token
distributions are peaked as a real model's are."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_config

from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.io.gguf import read_gguf, read_gguf_tokenizer, write_gguf
from nanoseek.model import Transformer
from nanoseek.model.moe import update_bias

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-llama builds it)")
pytestmark = pytest.mark.llama

TRICKY = ["hello world", "  leading and trailing   ", "a\n\n\nb\r\n", "12345678 + 9.5", "café naïve Ωmega ½",
          "emoji 🙂🚀 end", "    indented\n        deeper\n", "x  =  1\t# tab", "",
          "<｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜>", "<think>why</think> so", "<｜User｜>hi<｜Assistant｜>",
          "def f(x):\n\treturn x_y + 1", "日本語のテキスト and 漢字", "obj.attr(foo_bar)", "don't stop",
          "self._loop.call_soon(self._read_ready)", "def __init__(self):"]
TRAIN_FILES = {"bisect.py", "heapq.py", "shlex.py", "textwrap.py", "string.py", "random.py", "copy.py"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, f32 path, q8_0 path, held-out token ids)."""
    files = {p.name: p.read_text(encoding="utf-8") for p in stdlib_sources()}
    tok = train_tokenizer([files[n] for n in TRAIN_FILES], vocab_size=2048, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size))
    data = torch.tensor(tok.encode("\n".join(files[n] for n in sorted(TRAIN_FILES))))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs: one thread is fastest, and immune to a busy second core
    for _ in range(80):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s : s + 65] for s in starts])
        out = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        for gate, load in zip(model.moe_gates(), out.expert_load, strict=True):
            update_bias(gate, load, 1e-2)  # auxiliary-loss-free balancing (V3 §2.1.2): a non-zero bias
    torch.set_num_threads(threads)
    model.eval()
    d = tmp_path_factory.mktemp("gguf")
    held_out = torch.tensor(tok.encode(files["fnmatch.py"])[:200])
    return model, tok, write_gguf(model, d / "f32.gguf", tok, "f32"), write_gguf(model, d / "q8.gguf", tok, "q8_0"), \
        held_out


def llama(path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                           yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, verbose=False, **kw)


def llama_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    llm.reset()
    llm.eval(ids.tolist())
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def test_f32_logits_match_nanoseek(setup):
    model, _, f32, _, ids = setup
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    got = llama_logits(llama(f32), ids)
    err = (got - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    print(f"\n[llama.cpp F32] next-token logits over {len(ids)} positions: max |delta| {err:.3g} "
          f"(max |logit| {ref.abs().max():.3g}, relative {rel:.3g}); top-1 agreement "
          f"{(got.argmax(-1) == ref.argmax(-1)).float().mean():.3f}")
    assert rel <= 1e-3


def test_f32_greedy_continuation_matches_nanoseek(setup):
    model, _, f32, _, ids = setup
    prompt = ids[:24].tolist()
    ours = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            ours.append(int(model(torch.tensor([ours])).logits[0, -1].argmax()))
    llm = llama(f32)
    llm.reset()
    llm.eval(prompt)
    theirs = list(prompt)
    for _ in range(32):  # llama.cpp's incremental decode over its KV cache
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    same = sum(a == b for a, b in zip(ours[24:], theirs[24:], strict=True))
    print(f"\n[llama.cpp F32] greedy continuation: {same}/32 tokens equal to nanoseek's")
    assert theirs == ours


def test_q8_0_top1_agreement(setup):
    model, _, _, q8, ids = setup
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    got = llama_logits(llama(q8), ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    err = (got - ref).abs()
    print(f"\n[llama.cpp Q8_0] top-1 agreement with nanoseek F32 over {len(ids)} positions: {agree:.3f}; "
          f"|delta| logits mean {err.mean():.3g}, max {err.max():.3g} (max |logit| {ref.abs().max():.3g})")
    assert agree >= 0.95


def test_q8_0_read_into_int8_agrees_with_llama_cpp(setup):
    """nanoseek reading the Q8_0 file into its int8 modules (nanoseek.fp8.int8: Q8_0's 32-weight blocks re-quantised
    per row, read by the int8 GEMV), token by token through the engine's cache as in decoding, against
    llama.cpp on the same file and against nanoseek's fp32 reading of it (the dequantised reference)."""
    _, _, _, q8, ids = setup
    fp32, int8 = read_gguf(q8), read_gguf(q8, int8=True)
    ref = Engine(fp32, max_batch=1, max_len=256).score(ids.tolist(), chunk=1)
    got = Engine(int8, max_batch=1, max_len=256).score(ids.tolist(), chunk=1)  # one row per forward: the GEMV
    theirs = llama_logits(llama(q8), ids)
    agree_ref = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree_llama = (got.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    prompt = ids[:24].tolist()
    greedy = Engine(int8, max_batch=1, max_len=256).generate([prompt], SamplingParams(max_new_tokens=32,
                                                                                      ignore_eos=True))[0]
    want = Engine(fp32, max_batch=1, max_len=256).generate([prompt], SamplingParams(max_new_tokens=32,
                                                                                    ignore_eos=True))[0]
    llm = llama(q8)
    theirs_greedy = [int(t) for t in itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 32)]
    same_ref = sum(a == b for a, b in zip(greedy.output_ids, want.output_ids, strict=True))
    same_llama = sum(a == b for a, b in zip(greedy.output_ids, theirs_greedy, strict=True))
    print(f"\n[nanoseek int8 from Q8_0] top-1 agreement over {len(ids)} decode positions: {agree_ref:.3f} with "
          f"nanoseek fp32 (Q8_0 dequantised; |delta| logits mean {(got - ref).abs().mean():.3g}, max "
          f"{(got - ref).abs().max():.3g}), {agree_llama:.3f} with llama.cpp Q8_0; greedy 32 tokens: {same_ref}/32 "
          f"equal to nanoseek fp32's, {same_llama}/32 to llama.cpp's")
    assert agree_ref >= 0.97 and agree_llama >= 0.95


def test_tokenisation(setup):
    """llama.cpp's deepseek-v3 pre-tokenizer splits as nanoseek's (both DeepSeek-V3's): the same ids for the tricky
    strings and a whole held-out file, and the same as the tokenizer rebuilt from the GGUF's fields."""
    _, tok, f32, _, _ = setup
    llm = llama(f32, vocab_only=True)
    rebuilt = read_gguf_tokenizer(f32, embedded=False)

    def theirs(s: str) -> list[int]:
        return llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)

    for s in TRICKY:
        assert theirs(s) == tok.encode(s) == rebuilt.encode(s), s
    files = [p for p in stdlib_sources() if p.name not in TRAIN_FILES][:30]
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    ours, other = tok.encode(text), theirs(text)
    print(f"\n[llama.cpp tokens] {len(TRICKY)}/{len(TRICKY)} tricky strings identical; {len(files)} held-out "
          f"standard-library files: {len(ours):,} tokens, identical: {ours == other}")
    assert other == ours
    assert llm.token_bos() == tok.bos_id and llm.token_eos() == tok.eos_id


def test_mtp_layers_load(setup):
    """The MTP module (V3 §2.2) loads as llama.cpp's nextn layer when asked for."""
    model, _, f32, _, _ = setup
    params = llama_cpp.llama_model_default_params()
    params.load_mtp = True
    m = llama_cpp.llama_model_load_from_file(str(f32).encode(), params)
    assert m is not None
    try:
        assert llama_cpp.llama_model_n_layer_nextn(m) == model.config.num_nextn_predict_layers == 1
    finally:
        llama_cpp.llama_model_free(m)
