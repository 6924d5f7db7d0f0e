"""The lm-evaluation-harness adapter, driven by the real lm-eval on local task definitions (no hub download):
its numbers equal `nanoseek eval`'s on the same rows. Optional suite: `make test-lmeval` installs lm-eval."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nanoseek
from nanoseek.eval.harness import EvalConfig, LocalBackend, evaluate
from nanoseek.infer.engine import SamplingParams

pytestmark = pytest.mark.lmeval
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (make test-lmeval installs it)")

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from infer_helpers import tiny_model_and_tokenizer  # noqa: E402

ROWS = [{"question": f"What is {a} plus {b}?", "options": [str(a + b), str(a * b + 1), "seven"], "answer": i % 3,
         "text": f"{a} plus {b} makes {a + b}, and {a} times {b} makes {a * b}.\n" * 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (9, 3)])]

TASKS = """\
task: nanoseek_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    model, tok = tiny_model_and_tokenizer()
    nanoseek.save(model, tmp / "ckpt")
    tok.save(tmp / "ckpt" / "tokenizer.json")
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASKS.format(name="mc", data=data) + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{options}}"
        doc_to_target: answer
        metric_list: [{metric: acc}, {metric: acc_norm}]
        """))
    (tasks / "ppl.yaml").write_text(TASKS.format(name="ppl", data=data) + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
        """))
    (tasks / "gen.yaml").write_text(TASKS.format(name="gen", data=data) + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{options[answer]}}"
        generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}
        metric_list: [{metric: exact_match}]
        """))
    return tmp, model, tok


def test_simple_evaluate_matches_nanoseek_eval(setup):
    from lm_eval.tasks import TaskManager

    import nanoseek.eval.lmeval  # noqa: F401 (registers "nanoseek")

    tmp, model, tok = setup
    res = lm_eval.simple_evaluate(
        model="nanoseek", model_args=f"pretrained={tmp / 'ckpt'},max_length=256",
        tasks=["nanoseek_mc", "nanoseek_ppl", "nanoseek_gen"], log_samples=True,
        task_manager=TaskManager(include_path=str(tmp / "tasks")))
    ours = evaluate(LocalBackend(model, tok, max_len=256), EvalConfig(tasks=(f"mc={tmp / 'rows.jsonl'}",), fewshot=0))
    mc = res["results"]["nanoseek_mc"]
    assert mc["acc,none"] == ours["tasks"]["mc"]["acc"] and mc["acc_norm,none"] == ours["tasks"]["mc"]["acc_norm"]

    backend = LocalBackend(model, tok, max_len=256)  # rolling log-likelihood: lm-eval's bits per byte from ours
    lp = sum(backend.rolling(r["text"])[0] for r in ROWS)
    n_bytes = sum(len(r["text"].encode()) for r in ROWS)
    assert res["results"]["nanoseek_ppl"]["bits_per_byte,none"] == pytest.approx(-lp / n_bytes / 0.6931471805599453,
                                                                                   rel=1e-5)
    greedy = backend.generate([f"Question: {r['question']}\nAnswer:" for r in ROWS], 1,
                              SamplingParams(max_new_tokens=8, stop=("\n",)))
    got = {s["doc"]["question"]: s["resps"][0][0] for s in res["samples"]["nanoseek_gen"]}
    assert [got[r["question"]] for r in ROWS] == [g[0] for g in greedy]


def test_command_line(setup):
    tmp, _, _ = setup
    proc = subprocess.run(
        [sys.executable, "-m", "nanoseek", "lm-eval", "run", "--model", "nanoseek", "--model_args",
         f"pretrained={tmp / 'ckpt'},max_length=256", "--tasks", "nanoseek_mc", "--include_path", str(tmp / "tasks")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nanoseek_mc" in proc.stdout and "acc" in proc.stdout


def test_lm_eval_hf_model_reads_a_nanoseek_checkpoint(setup):
    """lm-eval's own `hf` model (transformers' DeepseekV3 + AutoTokenizer) on a nanoseek checkpoint: it loads (the
    checkpoint carries tokenizer_config.json with bos / eos) and scores as nanoseek does."""
    from lm_eval.tasks import TaskManager

    tmp, model, tok = setup
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp / 'ckpt'},dtype=float32,add_bos_token=True,device=cpu",
        tasks=["nanoseek_mc"], task_manager=TaskManager(include_path=str(tmp / "tasks")), log_samples=True)
    ours = LocalBackend(model, tok, max_len=256)
    for s in res["samples"]["nanoseek_mc"]:
        doc = s["doc"]
        ctx = f"Question: {doc['question']}\nAnswer:"
        mine = [r.logprob for r in ours.loglikelihood([(ctx, " " + o) for o in doc["options"]])]
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(mine, abs=1e-4)
