"""SFT: chat JSONL -> masked shards -> the trainer learns the assistant turns only; `nanoseek sft` end to end."""

import json

import pytest
import torch
from conftest import tiny_config

import nanoseek
from nanoseek.cli import main
from nanoseek.data import TokenShard, stdlib_sources, train_tokenizer
from nanoseek.data.loader import PackedBatches
from nanoseek.infer.chat import encode_chat
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.train.sft import SFTDataError, prepare_sft


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(errors="ignore") for p in stdlib_sources()[:40]]
    return train_tokenizer(texts, vocab_size=320, show_progress=False)


def _examples(n: int) -> list[dict]:
    """Questions 'add A and B' with answers written as a tiny teacher program would: '<think>A+B</think>C'."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 5, (2,), generator=g).tolist()
        rows.append({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"add {a} and {b}"},
            {"role": "assistant", "content": f"<think>{a}+{b}</think>{a + b}"},
        ], "source": "teacher"})
    return rows


def test_mask_covers_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "question one"},
            {"role": "assistant", "content": "<think>r</think>answer one"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "answer two"}]
    ids, mask = encode_chat(msgs, tok, add_generation_prompt=False, keep_think=True, return_mask=True)
    assert ids == encode_chat(msgs, tok, add_generation_prompt=False, keep_think=True)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    eos = tok.decode([tok.eos_id])
    assert tok.decode(trained) == f"<think>r</think>answer one{eos}answer two{eos}"
    context = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    bos, user, asst = (tok.decode([tok.special_ids[k]]) for k in ("bos", "user", "assistant"))
    assert context == f"{bos}sys{user}question one{asst}{user}q2{asst}"


def test_prepared_batches_ignore_everything_but_assistant_tokens(tok, tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in _examples(30)))
    info = prepare_sft([tmp_path / "d.jsonl"], tok, tmp_path / "data", heldout_frac=0.2)
    assert info["examples"]["train"] + info["examples"]["val"] == 30 and info["examples"]["val"] > 0
    shard = TokenShard.open(tmp_path / "data" / "train.bin", tok.hash)
    mask = TokenShard.open(tmp_path / "data" / "train_mask.bin", tok.hash)
    x, y = PackedBatches(shard, 4, 32, loss_mask=mask).next_batch()
    plain_x, plain_y = PackedBatches(shard, 4, 32).next_batch()
    assert torch.equal(x, plain_x)
    kept = y != -100
    assert torch.equal(y[kept], plain_y[kept]) and 0 < kept.sum() < kept.numel()
    text = tok.decode(y[kept].tolist())
    assert "add" not in text and "You add numbers" not in text  # no prompt text is a target


def test_bad_sft_data_names_file_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_examples(1)[0]) + "\n{not json\n")
    with pytest.raises(SFTDataError, match="bad.jsonl:2: not JSON"):
        prepare_sft([bad], tok, tmp_path / "out")
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SFTDataError, match="bad.jsonl:1: needs a 'messages' list with at least one assistant"):
        prepare_sft([bad], tok, tmp_path / "out")
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"},
                                            {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(SFTDataError, match="example 1"):
        prepare_sft([bad], tok, tmp_path / "out")


def test_sft_cli_learns_the_answers_and_resumes(tok, tmp_path, capsys):
    torch.manual_seed(0)
    model = nanoseek.load(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.02))
    init = tmp_path / "init"
    nanoseek.save(model, init)
    tok.save(init / "tokenizer.json")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in _examples(200)))
    out = tmp_path / "sft"
    args = ["sft", "--init", str(init), "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
            "--set", "seq_len=64", "--set", "lr=3e-3", "--set", "eval_every=20", "--set", "ckpt_every=20"]
    assert main([*args, "--steps", "20"]) == 0
    assert main([*args, "--steps", "150", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "assistant tokens" in text and "resumed from" in text and "done: 150/150" in text
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["heldout_loss"] for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 151))
    assert evals[-1] < 0.6 * evals[0]
    # the fine-tuned checkpoint answers in the taught format (greedy), served by the inference engine
    tuned = nanoseek.load(out / "checkpoints" / "step_00000150")
    prompt = encode_chat([{"role": "system", "content": "You add numbers."},
                          {"role": "user", "content": "add 2 and 1"}], tok)
    req = Engine(tuned, tok, max_len=64).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert req.text.startswith("<think>") and "</think>" in req.text and req.finish_reason == "stop"
