"""Weight-only int8 inference (nanoseek.fp8.int8): per-row int8 codes read by nanoseek's integer GEMV (and torch's
int8 GEMV where it cannot be built), against the closed form of each kernel's error and the dequantised fp32
reference; the engine, GGUF loading and the command line on top."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, train_periodic
from torch import nn

import nanoseek
from nanoseek.cli import main
from nanoseek.data import stdlib_sources, train_tokenizer
from nanoseek.fp8 import int8
from nanoseek.fp8.int8 import (
    GEMV_ROWS,
    Int8Experts,
    Int8Linear,
    dequantize_rows,
    gemv_kernel,
    int8_matmul,
    int8_weight_bytes,
    quantize_int8,
    quantize_rows,
)
from nanoseek.fp8.weights import quantize_model_weights
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.io.gguf import read_gguf, write_gguf
from nanoseek.model import Experts, Transformer
from nanoseek.model.moe import MLP, dispatch_combine, unrolled_experts

BF16_U = 2.0**-8  # unit roundoff of bf16 (8 significant bits): rounding moves a value by at most this fraction


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _dequantised_reference(model: Transformer) -> Transformer:
    """The high-precision model whose matrices are the int8 model's q * s (an independent path: nn.Linear and the
    grouped-GEMM Experts on the rounded weights)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(dequantize_rows(*quantize_rows(m.weight)))
            elif isinstance(m, Experts):
                for w in (m.gate_up_proj, m.down_proj):
                    w.copy_(dequantize_rows(*quantize_rows(w)))
    return ref


@pytest.fixture(params=["gemv", "int8pack"])
def kernel(request, monkeypatch):
    """gemv: nanoseek's kernel (int8_gemv.cpp); int8pack: torch's _weight_int8pack_mm, the fallback."""
    if request.param == "gemv" and not gemv_kernel():
        pytest.skip("nanoseek's int8 GEMV kernel could not be built here (see the warning)")
    monkeypatch.setattr(int8, "_GEMV", request.param == "gemv")
    return request.param


@pytest.fixture(scope="module")
def periodic():
    model, cycle = train_periodic()  # peaked: greedy is decided by margins far above bf16 rounding
    return model, _dequantised_reference(model), quantize_int8(copy.deepcopy(model)), cycle


# ---------------------------------------------------------------------------------- (1) the format and the kernel
def test_quantize_rows_closed_form():
    torch.manual_seed(0)
    w = torch.randn(6, 48) * torch.tensor([1.0, 1e-3, 50.0, 1.0, 1.0, 0.0])[:, None]
    w[3, 7] = 40.0  # an outlier sets its row's step
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (6,)
    want = (w.abs().amax(1) / 127).to(torch.bfloat16)
    assert torch.equal(s[:5], want[:5]) and s[5] == 1 and not q[5].any()  # an all-zero row: scale 1, codes 0
    assert torch.equal(q, torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8))
    assert q.abs().amax(1)[:5].ge(126).all()  # every row uses the whole range
    # the reference weight is q * s: within half a step, plus the clamp where bf16 rounded the step down
    err = (dequantize_rows(q, s) - w).abs()
    assert (err <= s.float()[:, None] * (0.5 + 127 * BF16_U)).all()


@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS])
@pytest.mark.parametrize("out_f, in_f, bias", [(7, 16, False), (100, 64, True), (33, 48, False)])
def test_int8_linear_decode_rows_are_the_int8pack_kernel(rows, out_f, in_f, bias, monkeypatch):
    """The fallback, up to GEMV_ROWS rows: y = bf16(bf16(x) (q s)^T) (fp32 accumulation), within bf16 rounding of
    the fp32 dequantised reference."""
    monkeypatch.setattr(int8, "_GEMV", False)
    torch.manual_seed(rows)
    lin = nn.Linear(in_f, out_f, bias=bias)
    q8 = Int8Linear.from_linear(lin)
    w = q8.dequantize()
    x = torch.randn(1, rows, in_f) if rows > 1 else torch.randn(in_f)
    with torch.no_grad():
        y = q8(x)
        b = lin.bias if bias else 0
    assert y.shape == (*x.shape[:-1], out_f) and y.dtype == torch.float32
    xb = x.to(torch.bfloat16).double()
    exact = xb @ w.double().T  # what the kernel computes before rounding its output to bf16
    size = xb.abs() @ w.double().abs().T
    assert ((y - b).double() - exact).abs().le(BF16_U * exact.abs() + 1e-6 * size).all()
    # against the fp32 reference x (q s)^T + b: x's and y's rounding to bf16, 2^-8 each
    ref = F.linear(x, w, lin.bias).double()
    assert (y.double() - ref).abs().le(BF16_U * (x.abs().double() @ w.double().abs().T + exact.abs()) + 1e-5).all()
    assert not torch.equal(y, ref.float())  # the GEMV ran (the fp32 path would be exact)


def _split_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The integer GEMV's error bound against x w^T: each activation off by at most m / 254, m = amax|x_row| / 127
    (the two 8-bit parts), plus fp32 rounding of the scaled int32 sums (far below bf16's 2^-9 of each value)."""
    x, w = x.double(), w.double()
    return x.abs().amax(-1, keepdim=True) / (127 * 254) * w.abs().sum(-1) + 1e-6 * (x.abs() @ w.abs().T)


@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS])
@pytest.mark.parametrize("out_f, in_f", [(7, 16), (100, 64), (33, 48), (1030, 80), (4096, 512)])
def test_int8_gemv_is_within_the_split_of_the_activations(rows, out_f, in_f):
    """nanoseek's kernel: row counts, in_features that are not a multiple of its 32-byte loads (48, 80), out_features
    that are not a multiple of its four rows (7, 33, 1030), matrices split over threads (1030x80, 4096x512); an
    outlier channel and a row a thousand times smaller: the error stays within the split's bound, which is far
    tighter than the fallback's bf16 rounding (a kernel rounding to bf16 would fail it)."""
    if not gemv_kernel():
        pytest.skip("nanoseek's int8 GEMV kernel could not be built here (see the warning)")
    torch.manual_seed(out_f + rows)
    q, s = quantize_rows(torch.randn(out_f, in_f))
    x = torch.randn(rows, in_f)
    x[:, 3] *= 40.0  # an outlier channel
    x[-1] *= 1e-3
    w = dequantize_rows(q, s)
    ref = x.double() @ w.double().T
    y = torch.ops.nanoseek.int8_gemv(x, q, s)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= _split_bound(x, w)).all()
    assert not torch.equal(y, (x @ w.T))  # it ran (and is not the fp32 GEMM)
    # bf16 activations in, bf16 out: the same integer sums, rounded once
    yb = torch.ops.nanoseek.int8_gemv(x.bfloat16(), q, s)
    xb = x.bfloat16().double()
    assert yb.dtype == torch.bfloat16
    assert ((yb.double() - xb @ w.double().T).abs() <= _split_bound(xb, w) + BF16_U * ref.abs()).all()
    # a view into a stack of matrices (an expert's codes): its own rows, not the stack's first
    stack_q, stack_s = torch.stack((q.flip(0), q)), torch.stack((s.flip(0), s))
    assert torch.equal(int8_matmul(x, stack_q[1], stack_s[1]), y)


def test_int8_gemv_zero_rows_and_bad_inputs():
    if not gemv_kernel():
        pytest.skip("nanoseek's int8 GEMV kernel could not be built here (see the warning)")
    q, s = quantize_rows(torch.randn(8, 32))
    assert torch.equal(torch.ops.nanoseek.int8_gemv(torch.zeros(2, 32), q, s), torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.nanoseek.int8_gemv(torch.zeros(2, 16), q, s)
    with pytest.raises(RuntimeError, match="q must be int8"):
        torch.ops.nanoseek.int8_gemv(torch.zeros(2, 32), q.float(), s)


def test_without_the_kernel_a_warning_and_the_fallback(monkeypatch):
    """A build that fails (no compiler, say) warns once, naming the cause, and int8 still works (torch's kernel)."""
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'nanoseek_int8_gemv'\ng++: not found")

    monkeypatch.setattr(int8, "_GEMV", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(int8.platform, "machine", lambda: "x86_64")
    q, s = quantize_rows(torch.randn(8, 32))
    x = torch.randn(1, 32)
    with pytest.warns(UserWarning, match=r"not available \(RuntimeError: g\+\+: not found\).*_weight_int8pack_mm"):
        y = int8_matmul(x, q, s)
    assert int8._GEMV is False
    want = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s).float()
    assert torch.equal(y, want)
    monkeypatch.setattr(int8, "_GEMV", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.warns(UserWarning, match="lacks AVX2"):
        assert not gemv_kernel()
    monkeypatch.setattr(int8, "_GEMV", None)
    monkeypatch.setenv("NANOSEEK_INT8_KERNEL", "0")
    assert not gemv_kernel()


def test_int8_linear_prefill_rows_are_the_fp32_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=True)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(GEMV_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(q8(x), F.linear(x, q8.dequantize(), lin.bias))


def test_int8_experts_equal_experts_on_the_dequantised_weights(kernel):
    """The routed experts through the dispatch the MoE runs: some experts without tokens, one with more than
    GEMV_ROWS rows (the reference path), the rest on the GEMV."""
    torch.manual_seed(0)
    cfg = tiny_config()
    experts = Experts(cfg)
    nn.init.normal_(experts.gate_up_proj, 0, 0.1)
    nn.init.normal_(experts.down_proj, 0, 0.1)
    q8 = Int8Experts.from_experts(experts)
    ref = copy.deepcopy(experts)
    with torch.no_grad():
        gate_up, down = q8.expert_weights()
        ref.gate_up_proj.copy_(gate_up)
        ref.down_proj.copy_(down)
    T, K = GEMV_ROWS + 6, 3
    t = torch.arange(T)
    # expert 0: every token (more than GEMV_ROWS rows); 1..3: about 2T/3 rows each; 4..7: none
    idx = torch.stack((torch.zeros_like(t), 1 + t % 3, 1 + (t + 1) % 3), dim=1)
    x, weights = torch.randn(T, cfg.hidden_size), torch.rand(T, K)
    with torch.no_grad():
        y, y_ref = dispatch_combine(x, idx, weights, 8, q8), dispatch_combine(x, idx, weights, 8, ref)
        only0 = torch.zeros(T, K)
        only0[:, 0] = weights[:, 0]  # expert 0 alone takes the fp32 path: the reference up to summation order
        assert (dispatch_combine(x, idx, only0, 8, q8) - dispatch_combine(x, idx, only0, 8, ref)).abs().max() < 1e-5
    rel = (y - y_ref).norm() / y_ref.norm()
    # experts 1..3 ran the GEMV: the split of the activations (gemv) or bf16 rounding (int8pack), no more
    assert (1e-7 < rel < 1e-3) if kernel == "gemv" else (1e-4 < rel < 1e-2)
    # a decode step's form (one GEMV pair per (token, expert) on views of the codes), eager and compiled in one
    # graph (the expert index a graph integer): the same numbers as the dispatch
    args = (x[:5], idx[:5], weights[:5], q8)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        want = dispatch_combine(x[:5], idx[:5], weights[:5], 8, q8)
        assert (unrolled_experts(*args) - want).abs().max() < 1e-6
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(unrolled_experts, fullgraph=True, dynamic=False)
            assert (compiled(*args) - want).abs().max() < 1e-6
            torch.compile(unrolled_experts, fullgraph=True, backend=capture)(*args)

    # the graph selects each expert's codes by an integer (views): no indexing by a tensor (a gather)
    def tensor_indexed(n: torch.fx.Node) -> bool:
        index = n.args[1] if len(n.args) > 1 else None
        return isinstance(index, torch.fx.Node) and isinstance(index.meta.get("example_value"), torch.Tensor)

    getitems = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is operator.getitem]
    assert getitems and not any(map(tensor_indexed, getitems))

    # what MoE runs at decode: Int8Experts.decode -- with nanoseek's kernel all pairs in one int8_moe call (eager and
    # as a graph node), the same numbers as a GEMV pair per (token, expert) up to the order of the sums
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = q8.decode(*args[:3])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("nanoseek::int8_moe", 0) == (kernel == "gemv")
    with torch.no_grad():
        assert (torch.compile(q8.decode, fullgraph=True)(*args[:3]) - got).abs().max() <= 1e-6 * got.abs().max()
        y_ref5 = dispatch_combine(x[:5], idx[:5], weights[:5], 8, ref)
    assert (got - y_ref5).norm() / y_ref5.norm() < (1e-3 if kernel == "gemv" else 1e-2)
    # with the MoE's shared expert: inside the same call when it is int8 (else added after), the same sum
    mlp = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            nn.init.normal_(lin.weight, 0, 0.1)
        shared8 = copy.deepcopy(mlp)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(shared8, name, Int8Linear.from_linear(getattr(mlp, name)))
        for shared in (shared8, mlp):
            both = q8.decode(*args[:3], shared)
            assert (both - (got + shared(x[:5]))).abs().max() <= 1e-5 * both.abs().max()
    if kernel == "gemv":
        with pytest.raises(RuntimeError, match=r"expert index 8 not in \[0, 8\)"):
            q8.decode(x[:1], torch.full((1, K), 8), weights[:1])


# ---------------------------------------------------------------------------------- (2) the model swap
def test_quantize_int8_swaps_every_matrix_and_keeps_the_rest():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    before = {k: t.clone() for k, t in _tensors(model).items()}
    q8 = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, (nn.Linear, Experts)) for m in q8.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q8.modules()) == n_linear
    assert sum(isinstance(m, Int8Experts) for m in q8.modules()) == model.config.n_moe_layers + 1  # + MTP's MoE
    after = _tensors(q8)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert torch.equal(after[k], before[k]) and after[k].dtype == torch.float32
    head = q8.lm_head
    assert torch.equal(head.weight, quantize_rows(before["lm_head.weight"])[0])
    held, dense = int8_weight_bytes(q8)
    n_rows = sum(m.weight_scale.numel() for m in q8.modules() if isinstance(m, Int8Linear)) + sum(
        m.gate_up_proj_scale.numel() + m.down_proj_scale.numel() for m in q8.modules() if isinstance(m, Int8Experts))
    assert held == dense // 4 + 2 * n_rows  # one byte per weight and a bf16 scale per row
    assert quantize_int8(q8) is q8 and _tensors(q8).keys() == after.keys()  # idempotent


def test_dtype_casts_leave_codes_and_scales_alone():
    torch.manual_seed(0)
    q8 = quantize_int8(Transformer(tiny_config()).eval())
    ref = {k: t.clone() for k, t in _tensors(q8).items()}
    for k, t in _tensors(q8.to(torch.float64)).items():
        if ref[k].dtype in (torch.int8, torch.bfloat16):
            assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k
        else:
            assert t.dtype == torch.float64, k


def test_decode_step_reads_every_matrix_as_int8(periodic, kernel):
    """One decode step of the engine runs the int8 GEMV once per Linear (but kv_b_proj, which the absorbed
    attention dequantises) and, for the routed experts a token chose, one int8_moe call per MoE layer (nanoseek's
    kernel) or a GEMV pair per (token, expert) (the fallback): no matrix is read in fp32."""
    _, _, q8, cycle = periodic
    cfg = q8.config
    eng = Engine(q8, max_batch=1, max_len=64)
    req = eng.submit(cycle[:5].tolist(), SamplingParams(max_new_tokens=4, ignore_eos=True))
    eng.step()  # prefill
    with torch.profiler.profile() as prof:
        eng.step()  # one decode step, one token
    assert not req.finished
    calls = {e.key: e.count for e in prof.key_averages()}
    linears = sum(isinstance(m, Int8Linear) for m in q8.model.modules())  # without MTP (not run)
    dense = linears + 1 - cfg.num_hidden_layers  # + lm_head - kv_b_proj
    if kernel == "gemv":  # the shared experts' three matrices run inside int8_moe
        shared = 3 * cfg.n_moe_layers * (cfg.n_shared_experts > 0)
        assert calls.get("nanoseek::int8_gemv") == dense - shared
        assert calls.get("nanoseek::int8_moe") == cfg.n_moe_layers
    else:
        assert calls.get("aten::_weight_int8pack_mm") == dense + 2 * cfg.num_experts_per_tok * cfg.n_moe_layers


# ---------------------------------------------------------------------------------- (3) decoding
@pytest.mark.parametrize("cache", ["latent", "naive"])
def test_greedy_equals_dequantised_reference(periodic, cache, kernel):
    _, ref, q8, cycle = periodic
    prompts = [cycle[:5].tolist(), cycle[3:10].tolist(), cycle[7:9].tolist()]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    want = [r.output_ids for r in Engine(ref, max_batch=2, max_len=64, cache=cache).generate(prompts, params)]
    got = [r.output_ids for r in Engine(q8, max_batch=2, max_len=64, cache=cache).generate(prompts, params)]
    assert got == want and all(len(g) == 40 for g in got)


def test_speculative_decoding_with_an_int8_mtp_module(periodic):
    _, ref, q8, cycle = periodic
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    plain = Engine(ref, max_batch=1, max_len=64).generate([cycle[:4].tolist()], params)[0]
    eng = Engine(q8, max_batch=1, max_len=64, speculative=True)
    spec = eng.generate([cycle[:4].tolist()], params)[0]
    assert spec.output_ids == plain.output_ids and eng.stats.acceptance_rate > 0.8


def test_logits_close_to_the_reference_on_a_random_model():
    """Teacher-forced over random tokens with the routing replayed from the reference (routing is discontinuous:
    a near-tie between two experts may flip under any rounding): only bf16 rounding remains."""
    from nanoseek.model.moe import routing_hooks

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    ref, q8 = _dequantised_reference(model), quantize_int8(copy.deepcopy(model))
    x = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad(), routing_hooks(ref.moe_gates(), record=True) as logs:
        want = ref(x).logits[0]
    with torch.no_grad(), routing_hooks(q8.moe_gates(), replay=[log[0] if log else None for log in logs]):
        got = q8(x).logits[0]
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    margin = want.topk(2, -1).values.diff(dim=-1).abs().squeeze(-1)
    sure = margin > 2 * (got - want).abs().max()
    assert sure.float().mean() > 0.5 and torch.equal(got.argmax(-1)[sure], want.argmax(-1)[sure])


@pytest.mark.slow
def test_compiled_decode_equals_eager(periodic, kernel):
    """Each kernel in the compiled step (nanoseek's: its operator a node of the graph)."""
    _, _, q8, cycle = periodic
    prompts = [cycle[:5].tolist(), cycle[2:4].tolist()]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = Engine(q8, max_batch=2, max_len=48).generate(prompts, params)
    compiled = Engine(q8, max_batch=2, max_len=48, compile=True).generate(prompts, params)
    assert [r.output_ids for r in compiled] == [r.output_ids for r in eager]


# ---------------------------------------------------------------------------------- (4) loading and the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint and its Q8_0 GGUF with a tokenizer (the CLI compares against the engine on the same int8 model:
    random weights will do)."""
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:20]]
    tok = train_tokenizer(texts, vocab_size=320, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size)).eval()
    d = tmp_path_factory.mktemp("int8")
    nanoseek.save(model, d / "ckpt")
    tok.save(d / "ckpt" / "tokenizer.json")
    return d / "ckpt", write_gguf(model, d / "model-q8_0.gguf", tok, "q8_0"), tok


def test_gguf_q8_0_loads_straight_into_int8(saved):
    """Tensor by tensor into the int8 modules: the same codes and scales as quantising the dequantised model."""
    _, gguf, _ = saved
    direct, later = nanoseek.load(gguf, int8=True), quantize_int8(read_gguf(gguf))
    a, b = _tensors(direct), _tensors(later)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(direct.lm_head, Int8Linear) and isinstance(direct.model.layers[1].mlp.experts, Int8Experts)


def test_generate_with_int8_weights(saved, capsys):
    ckpt, gguf, tok = saved
    ids = [tok.bos_id] + tok.encode("import os", allow_special=False)
    want = Engine(nanoseek.load(ckpt, int8=True), tok).generate([ids], SamplingParams(max_new_tokens=10))[0].text
    assert main(["generate", str(ckpt), "import os", "--max-tokens", "10", "--int8-weights"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # a GGUF file with its embedded tokenizer
    want = Engine(nanoseek.load(gguf, int8=True), tok).generate([ids], SamplingParams(max_new_tokens=10))[0].text
    assert main(["generate", str(gguf), "import os", "--max-tokens", "10", "--int8-weights"]) == 0
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit, match="two weight formats"):
        main(["generate", str(ckpt), "x", "--int8-weights", "--fp8-weights"])


# ---------------------------------------------------------------------------------- (5) errors
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.o_proj: in_features = 20 is not a "):
        quantize_int8(Transformer(tiny_config(v_head_dim=5)))  # o_proj: 4 heads x 5 values in
    with pytest.raises(ValueError, match="in_features = 20 is not a multiple of 16"):
        Int8Linear(20, 8)
    with pytest.raises(ValueError, match="moe_intermediate_size = 40"):
        Int8Experts(4, 64, 40)
    with pytest.raises(ValueError, match="floating-point weight, got torch.int32"):
        quantize_rows(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="FP8 weights"):
        quantize_int8(quantize_model_weights(Transformer(tiny_config())))
    with pytest.raises(ValueError, match="choose one"):
        nanoseek.load(tiny_config(), keep_fp8=True, int8=True)
