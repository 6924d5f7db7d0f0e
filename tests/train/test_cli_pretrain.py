"""`nanoseek pretrain` and `nanoseek speedrun` end to end at a toy size."""

import json

from nanoseek.cli import main

SMALL = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "seq_len=32", "--set", "batch_size=2",
         "--set", "micro_batch_size=2", "--set", "eval_batches=1"]


def test_pretrain_cli_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--steps", "3", "--max-chars", "200000",
                 *SMALL]) == 0
    assert "done: 3/3 steps" in capsys.readouterr().out
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["steps"] == 3 and resolved["model"]["hidden_size"] == 64
    # a longer run resumes from step 3 with the same data directory
    assert main(["pretrain", "--preset", "tiny", "--data", str(out / "data"), "--out", str(out), "--resume",
                 "--steps", "5", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "done: 5/5 steps" in text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    # the checkpoint carries its tokenizer, so the training output can be used directly for generation
    assert (out / "checkpoints" / "step_00000005" / "tokenizer.json").is_file()
    assert main(["generate", str(out), "def main(", "--max-tokens", "5", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "prompt +" in captured.err and "generated tokens" in captured.err


def test_speedrun_writes_report(tmp_path):
    out = tmp_path / "sr"
    assert main(["speedrun", "--out", str(out), "--steps", "3", "--max-chars", "300000", "--no-post-train",
                 *SMALL]) == 0
    report = (out / "report.md").read_text()
    for needle in ("held-out loss", "FIM exact match", "pretrain/loss.png", "pretrain/expert_load.png",
                   "Sample completions"):
        assert needle in report
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000
    assert (out / "pretrain" / "expert_load.png").stat().st_size > 1000
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 3 and s["heldout_loss"] > 0


def test_pretrain_fp8_flag_is_the_v3_recipe(tmp_path, capsys):
    data = None
    for extra, moments in (([], True), (["--set", "bf16_moments=false"], False)):
        out = tmp_path / f"fp8_{moments}"
        args = ["pretrain", "--preset", "tiny", "--out", str(out), "--steps", "1", "--fp8", *SMALL, *extra]
        args += ["--data", str(data)] if data else ["--max-chars", "200000"]
        assert main(args) == 0
        data = data or out / "data"
        train = json.loads((out / "config.json").read_text())["train"]
        assert train["fp8"] is True and train["bf16_moments"] is moments
    assert "done: 1/1 steps" in capsys.readouterr().out
