"""One override parser for every config object (nanoseek.config): typed KEY=VALUE values, one-line errors that
name the field, the value and what is allowed, and the CLI's `nanoseek: <message>` with exit status 2."""

import json
from typing import Literal

import pytest

from nanoseek.cli import main
from nanoseek.config import (
    FRACTION,
    POSITIVE,
    ConfigError,
    Range,
    at_least,
    override,
    parse_assignments,
    parse_value,
)
from nanoseek.model import ModelConfig, preset
from nanoseek.rl.config import GRPOConfig
from nanoseek.train import TrainConfig, apply_overrides
from nanoseek.train.sft import SFT_DEFAULTS


@pytest.mark.parametrize("tp, rng, text, value", [
    (bool, None, "true", True), (bool, None, "False", False), (bool, None, "0", False),
    (int, POSITIVE, "12", 12), (float, None, "1e-3", 1e-3), (float, FRACTION, "1", 1.0),
    (str, None, "cuda:1", "cuda:1"),
    (float | None, POSITIVE, "none", None), (float | None, POSITIVE, "null", None), (float | None, None, "2", 2.0),
    (Literal["grpo", "dapo"], None, "dapo", "dapo"),
    (tuple[float, float], None, "0.9,0.95", (0.9, 0.95)), (tuple[float, float], None, "[0.9, 0.99]", (0.9, 0.99)),
    (tuple[float, float], None, "(0.8,0.9)", (0.8, 0.9)),
    (int | tuple[int, int], None, "2", 2), (int | tuple[int, int], None, "1,3", (1, 3)),
    (dict, None, '{"a": 1}', {"a": 1}),
])
def test_values_coerce_by_annotation(tp, rng, text, value):
    out = parse_value("x", tp, text, rng)
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize("tp, rng, text, message", [
    (bool, None, "maybe", "x must be true or false, got 'maybe'"),
    (int, POSITIVE, "0", "x must be a positive integer, got 0"),
    (int, POSITIVE, "1.5", "x must be a positive integer, got '1.5'"),
    (int, at_least(2), "1", "x must be an integer >= 2, got 1"),
    (float, FRACTION, "-1", r"x must be a number in \[0, 1\], got -1"),
    (float, Range(0, 1, hi_open=True), "1", r"x must be a number in \[0, 1\), got 1"),
    (float, None, "nan", "x must be a number, got nan"),
    (float | None, POSITIVE, "-2", "x must be a positive number or none, got -2"),
    (Literal["grpo", "dapo"], None, "mean", "x must be one of grpo, dapo, got 'mean'"),
    (tuple[float, float], None, "0.9", "x must be 2 comma-separated values, each a number, got '0.9'"),
])
def test_bad_values_are_one_line_errors(tp, rng, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_value("x", tp, text, rng)
    assert "\n" not in str(e.value)


def test_parse_assignments():
    assert parse_assignments(["a=1", " b = x=y", "a=2"]) == {"a": "2", "b": " x=y"}
    assert parse_assignments(None) == {}
    with pytest.raises(ConfigError, match="--knob expects KEY=VALUE, got 'digits'"):
        parse_assignments(["digits"], "--knob")


# ---- TrainConfig (and the SFT defaults that feed it)
@pytest.mark.parametrize("sets, message", [
    (["betas=0.9"], r"betas must be 2 comma-separated values, each a number in \[0, 1\), got '0.9'"),
    (["betas=0.9,1.5"], r"betas must be .* in \[0, 1\), got 0.9,1.5"),
    (["min_lr_ratio=-1"], r"min_lr_ratio must be a number in \[0, 1\], got -1"),
    (["lr=0"], "lr must be a positive number, got 0"),
    (["steps=ten"], "steps must be a positive integer, got 'ten'"),
    (["fp8=maybe"], "fp8 must be true or false, got 'maybe'"),
    (["fp8_backend=fast"], "fp8_backend must be one of auto, emulate, rowwise, blockwise, got 'fast'"),
    (["aux_loss_alpha=-0.1"], "aux_loss_alpha must be a non-negative number, got -0.1"),
    (["init_from=none", "seed=x"], "seed must be an integer, got 'x'"),
    (["warmup_frac=0.9"], "schedule fractions must increase: warmup_frac <= constant_until"),
    (["stesp=3"], "unknown training or model config field 'stesp'; did you mean 'steps'"),
    (["model.stesp=3"], "unknown model config field 'stesp'"),
    (["hidden_size=wide"], "hidden_size must be an integer, got 'wide'"),
])
def test_train_overrides_bad_values(sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        apply_overrides(preset("tiny"), TrainConfig(), sets)
    assert "\n" not in str(e.value)


def test_train_overrides_good_values():
    m, t = apply_overrides(preset("tiny"), TrainConfig(), [
        "betas=0.9,0.99", "init_from=none", "aux_loss_alpha=0", "fp8=true", "fp8_backend=rowwise", "init_from=ckpt",
        "lr=1", "q_lora_rank=0", "model.rope_scaling=null", "eos_token_id=2",
    ])
    assert t.betas == (0.9, 0.99) and t.aux_loss_alpha == 0.0 and t.fp8 and t.fp8_backend == "rowwise"
    assert t.init_from == "ckpt" and t.lr == 1.0 and isinstance(t.lr, float)  # the later init_from wins
    assert apply_overrides(preset("tiny"), t, ["init_from=none"])[1].init_from is None
    assert m.q_lora_rank is None and m.rope_scaling is None and m.eos_token_id == 2
    assert TrainConfig.from_dict(t.to_dict()) == t  # JSON round trip (betas list -> tuple)


def test_train_config_checks_python_values_and_sft_defaults():
    with pytest.raises(ConfigError, match=r"betas must be .*, got 0.9"):
        TrainConfig(betas=0.9)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"min_lr_ratio must be a number in \[0, 1\], got -1"):
        TrainConfig(min_lr_ratio=-1)
    with pytest.raises(ConfigError, match="unknown training field 'lrr'; did you mean 'lr'"):
        TrainConfig.from_dict({"lrr": 1})
    sft = TrainConfig(**SFT_DEFAULTS)
    assert (sft.lr, sft.steps, sft.cosine_until) == (3e-4, 200, 1.0)
    assert override(sft, ["lr=1e-4"]).lr == 1e-4


# ---- GRPOConfig and the task knobs
def test_grpo_config_moved_and_importable_from_grpo():
    from nanoseek.rl.grpo import GRPOConfig as Again

    assert Again is GRPOConfig


@pytest.mark.parametrize("kw, message", [
    (dict(lr=-1), "lr must be a positive number, got -1"),
    (dict(beta="x"), "beta must be a non-negative number, got 'x'"),
    (dict(group_size=1), "group_size must be an integer >= 2, got 1"),
    (dict(aggregation="mean"), "aggregation must be one of grpo, dapo, dr_grpo, got 'mean'"),
    (dict(template="plain"), "template must be one of chat, r1-zero, got 'plain'"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\] or none, got 0.0"),
    (dict(task="foo"), "task must be one of arithmetic, countdown, got 'foo'"),
    (dict(task_knobs={"digit": 1}), "unknown arithmetic knob 'digit'; did you mean 'digits'\\? valid: digits, "
                                    "n_operands, ops"),
    (dict(task_knobs={"digits": 0}), "digits must be an integer >= 1 or a range"),
    (dict(task_knobs={"ops": "^"}), "ops must be a non-empty subset"),
])
def test_grpo_config_bad_values(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        GRPOConfig(**kw)
    assert "\n" not in str(e.value)


def test_grpo_overrides():
    cfg = override(GRPOConfig(task="countdown", task_knobs={"n_numbers": "3", "target_range": "1,50"}),
                   ["eps_high=0.28", "aggregation=dapo", "scale_std=false", "top_p=none", "beta=0.001"])
    assert (cfg.eps_high, cfg.aggregation, cfg.scale_std, cfg.top_p, cfg.beta) == (0.28, "dapo", False, None, 0.001)
    assert cfg.task_knobs == {"n_numbers": 3, "target_range": (1, 50)}
    for sets, message in [(["lr=-1"], "lr must be a positive number, got -1"),
                          (["beta=x"], "beta must be a non-negative number, got 'x'"),
                          (["lrr=1"], "unknown GRPOConfig field 'lrr'; did you mean 'lr'")]:
        with pytest.raises(ConfigError, match=message):
            override(GRPOConfig(), sets)


# ---- the command line: `nanoseek: <message>` on stderr, exit status 2
def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("extra, message", [
    (["--set", "lr=-1"], "nanoseek: lr must be a positive number, got -1"),
    (["--set", "beta=x"], "nanoseek: beta must be a non-negative number, got 'x'"),
    (["--set", "lrr=1"], "nanoseek: unknown GRPO setting 'lrr'; did you mean 'lr'?"),
    (["--set", "lr"], "nanoseek: --set expects KEY=VALUE, got 'lr'"),
    (["--task", "foo"], "nanoseek: task must be one of arithmetic, countdown, got 'foo'"),
    (["--knob", "digit=1"], "nanoseek: unknown arithmetic knob 'digit'; did you mean 'digits'? valid: digits, "
                            "n_operands, ops"),
    (["--knob", "digits=x"], "nanoseek: digits must be an integer or 2 comma-separated values, each an integer, "
                             "got 'x'"),
])
def test_cli_grpo_errors(tmp_path, capsys, extra, message):
    # the configuration is checked before the (here missing) checkpoint is read
    assert _cli_error(capsys, ["grpo", "--init", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *extra]) \
        == message


def test_cli_distill_knob_typo(tmp_path, capsys):
    err = _cli_error(capsys, ["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                              "--task", "countdown", "--knob", "max_numbr=9"])
    assert err == ("nanoseek: unknown countdown knob 'max_numbr'; did you mean 'max_number' or 'n_numbers'? "
                   "valid: max_number, max_tries, n_numbers, ops, target_range")
    err = _cli_error(capsys, ["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                              "--task", "sudoku"])
    assert err == "nanoseek: task must be one of arithmetic, countdown, got 'sudoku'"


def test_cli_pretrain_and_sft_errors(tmp_path, capsys):
    assert _cli_error(capsys, ["pretrain", "--out", str(tmp_path / "p"), "--set", "betas=0.9"]) == \
        "nanoseek: betas must be 2 comma-separated values, each a number in [0, 1), got '0.9'"
    assert _cli_error(capsys, ["pretrain", "--preset", "huge", "--out", str(tmp_path / "p")]).startswith(
        "nanoseek: huge: not a config.json, a checkpoint directory, or a preset (tiny, small")
    ckpt = tmp_path / "ckpt"  # a config.json is all the overrides need; no weights or tokenizer are read first
    ckpt.mkdir()
    preset("tiny").to_json(ckpt / "config.json")
    (ckpt / "model.safetensors").write_bytes(b"")
    err = _cli_error(capsys, ["sft", "--init", str(ckpt), "--data", "x.jsonl", "--out", str(tmp_path / "s"),
                              "--set", "min_lr_ratio=-1"])
    assert err == "nanoseek: min_lr_ratio must be a number in [0, 1], got -1"


def test_cli_info_reads_official_inference_config(tmp_path, capsys):
    official_16b = {  # DeepSeek-V3's inference/configs/config_16B.json
        "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
        "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6,
        "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "mscale": 0.707,
    }
    (tmp_path / "config_16B.json").write_text(json.dumps(official_16b))
    assert main(["info", str(tmp_path / "config_16B.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == pytest.approx(15.71e9, rel=1e-3)
    assert ModelConfig.from_json(tmp_path / "config_16B.json").hidden_size == 2048
