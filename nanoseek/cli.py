"""The `nanoseek` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# `--fp8`: DeepSeek-V3's FP8 recipe: FP8 GEMMs with fine-grained scales and BF16 AdamW moments (fp32 master weights)
FP8_RECIPE = ("fp8=true", "bf16_moments=true")
FP8_HELP = ("DeepSeek-V3's FP8 recipe: FP8 GEMMs with 1x128 / 128x128 scales (emulated on the CPU) and BF16 AdamW "
            "moments; --set bf16_moments=false keeps fp32 moments")


def _resolve_config(spec: str):
    from .io import read_config
    from .model import PRESETS, ConfigError, preset

    p = Path(spec)
    if p.exists():
        return read_config(p)
    if spec in PRESETS:
        return preset(spec)
    raise ConfigError(f"{spec}: not a config.json, a checkpoint directory, or a preset ({', '.join(PRESETS)})")


def cmd_info(args: argparse.Namespace) -> int:
    from .model.stats import format_stats, model_stats

    results = {}
    for spec in args.configs:
        cfg = _resolve_config(spec)
        st = model_stats(cfg, seq_len=args.seq_len, bytes_per_elem=args.cache_bytes)
        results[spec] = st.to_dict()
        if not args.json:
            print(format_stats(spec, cfg, st))
    if args.json:
        print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import override, parse_assignments
    from .parallel.plan import ClusterConfig, format_plan, plan

    cfg = _resolve_config(args.preset)
    sets = parse_assignments(args.set, "--set")
    for name in ("gpus", "pp", "ep", "schedule", "mfu"):
        if getattr(args, name) is not None:
            sets[name] = str(getattr(args, name))
    cluster = override(ClusterConfig(), sets, "cluster setting")
    p = plan(cfg, cluster)
    print(json.dumps({"cluster": cluster.__dict__, "plan": p.to_dict()}, indent=2) if args.json
          else format_plan(args.preset, cfg, cluster, p))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a preset, take a few training steps on random tokens, save, reload and check the logits."""
    import nanoseek

    from .model.stats import format_stats, model_stats

    torch.manual_seed(args.seed)
    cfg = nanoseek.preset(args.preset)
    print(format_stats(args.preset, cfg, model_stats(cfg)))
    model = nanoseek.load(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    # a learnable toy stream: a fixed random sequence repeated, so the loss visibly drops
    period = torch.randint(0, cfg.vocab_size, (args.seq_len // 4,))
    data = period.repeat(args.batch * 5)[: args.batch * (args.seq_len + 1)].view(args.batch, args.seq_len + 1)
    x, y = data[:, :-1], data[:, 1:]
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = model(x, labels=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mtp = ", ".join(f"{v.item():.3f}" for v in out.mtp_losses)
        print(f"step {step:3d}  loss {out.loss.item():.4f}  main {out.main_loss.item():.4f}  mtp [{mtp}]  "
              f"balance {out.balance_loss.item():.2e}")
    dt = time.perf_counter() - t0
    print(f"{args.steps} steps, {args.steps * x.numel() / dt:.0f} tokens/s")
    model.eval()
    out_dir = Path(args.out)
    nanoseek.save(model, out_dir)
    again = nanoseek.load(out_dir)
    with torch.no_grad():
        diff = (model(x).logits - again(x).logits).abs().max().item()
    print(f"saved {out_dir} (Hugging Face DeepSeek-V3 layout); reloaded logits max |diff| = {diff:.2e}")
    return 0 if diff == 0 else 1


COMM_ERROR_WORDS = ("gloo", "Connection closed", "Connection reset", "Timed out", "NCCL", "c10d")


def _parallel(args: argparse.Namespace, body):  # type: ignore[no-untyped-def]
    """Run body(ctx) inside the process group of `--parallel` (ctx None without it). A rank that loses the others
    (one died, or hangs past the timeout) ends with one line instead of a traceback per rank."""
    if not getattr(args, "parallel", None):
        return body(None)
    import torch.distributed as dist

    from .parallel import ParallelConfig, init_distributed, shutdown

    ctx = init_distributed(ParallelConfig.parse(args.parallel))
    try:
        return body(ctx)
    except (dist.DistError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        # gloo reports a dead or hung peer as a plain RuntimeError from its transport
        if not isinstance(e, dist.DistError) and not any(w in str(e) for w in COMM_ERROR_WORDS):
            raise
        raise SystemExit(f"nanoseek: rank {ctx.rank}: lost contact with the other ranks "
                         f"({lines[0][-200:] if lines else type(e).__name__})") from None
    finally:
        shutdown()


def _prepare_once(ctx, prepare) -> None:  # type: ignore[no-untyped-def]
    """Data preparation on rank 0 only; the other ranks wait for it."""
    if ctx is None or ctx.is_main:
        prepare()
    if ctx is not None:
        ctx.barrier()


def cmd_pretrain(args: argparse.Namespace) -> int:
    return _parallel(args, lambda ctx: _pretrain(args, ctx))


def _pretrain(args: argparse.Namespace, ctx) -> int:  # type: ignore[no-untyped-def]
    from .data import prepare_corpus
    from .train import TrainConfig, Trainer, apply_overrides

    model_cfg = _resolve_config(args.preset)
    train_cfg = TrainConfig(seed=args.seed)
    sets = (list(FP8_RECIPE) if args.fp8 else []) + list(args.set or [])  # --set wins over the recipe
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, sets)
    out = Path(args.out)
    if not args.resume:  # refuse a used --out before its data folder is rewritten
        _check_fresh(out)
    data = [Path(d) for d in args.data] if args.data else []
    if len(data) == 1 and (data[0] / "data.json").is_file():
        data_dir = data[0]
    else:
        data_dir = out / "data"
        _prepare_once(ctx, lambda: prepare_corpus([str(d) for d in data] or None, data_dir,
                                                  vocab_size=model_cfg.vocab_size, seed=args.seed,
                                                  max_chars=args.max_chars))
    info = json.loads((data_dir / "data.json").read_text())
    if info.get("vocab_size") and info["vocab_size"] != model_cfg.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=info["vocab_size"])
    try:
        trainer = Trainer(model_cfg, train_cfg, data_dir, out, resume=args.resume, parallel=ctx)
    except ValueError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    return _train_and_report(trainer, out, "held-out loss")


def _check_fresh(out: Path) -> None:
    from .train.checkpoint import check_fresh_out_dir

    try:
        check_fresh_out_dir(out / "checkpoints")
    except ValueError as e:
        raise SystemExit(f"nanoseek: {e}") from None


def _train_and_report(trainer, out: Path, loss_name: str) -> int:
    result = trainer.run()
    if not getattr(trainer, "is_main", True):
        return 0
    state = "interrupted" if result.interrupted else "done"
    held = f"{result.final_heldout_loss:.4f}" if result.final_heldout_loss is not None else "n/a"
    budget = getattr(trainer, "budget", None)
    done = (f"{result.steps_done} steps ({budget.seconds:.0f} s budget)" if budget is not None
            else f"{result.steps_done}/{trainer.cfg.steps} steps")
    print(f"{state}: {done}, {result.tokens:,} tokens in "
          f"{result.seconds:.0f} s, {loss_name} {held}; metrics {out / 'metrics.jsonl'}, plots {out / 'loss.png'}, "
          f"checkpoints {out / 'checkpoints'}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    return _parallel(args, lambda ctx: _sft(args, ctx))


def _sft(args: argparse.Namespace, ctx) -> int:  # type: ignore[no-untyped-def]
    from .io import read_config
    from .io.paths import load_tokenizer, resolve_checkpoint
    from .train import TrainConfig, Trainer, apply_overrides
    from .train.sft import SFT_DEFAULTS, SFTDataError, prepare_sft

    init = resolve_checkpoint(args.init)
    out = Path(args.out)
    model_cfg = read_config(init)
    train_cfg = TrainConfig(**{**SFT_DEFAULTS, "seed": args.seed, "init_from": str(init)})
    sets = list(args.set or []) + ([f"steps={args.steps}"] if args.steps is not None else [])
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, sets)
    tok = load_tokenizer(init, args.tokenizer)
    if not args.resume:  # refuse a used --out before its data folder is rewritten
        _check_fresh(out)
    data_dir = out / "data"

    def prepare() -> None:
        try:
            info = prepare_sft(args.data, tok, data_dir, heldout_frac=args.heldout_frac, seed=args.seed)
        except (SFTDataError, OSError) as e:
            raise SystemExit(f"nanoseek: {e}") from None
        print(f"SFT data: {info['examples']['train']} train / {info['examples']['val']} held-out examples, "
              f"{info['trained_tokens']['train']:,} of {info['tokens']['train']:,} training tokens are assistant "
              f"tokens")

    if not (args.resume and (data_dir / "data.json").is_file()):
        _prepare_once(ctx, prepare)
    try:
        trainer = Trainer(model_cfg, train_cfg, data_dir, out, resume=args.resume, parallel=ctx)
    except ValueError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    return _train_and_report(trainer, out, "held-out loss on assistant tokens")


def cmd_grpo(args: argparse.Namespace) -> int:
    return _parallel(args, lambda ctx: _grpo(args, ctx))


def _grpo(args: argparse.Namespace, ctx) -> int:  # type: ignore[no-untyped-def]
    from .config import override, parse_assignments
    from .io.paths import load_tokenizer, resolve_checkpoint
    from .rl.grpo import GRPOConfig, GRPOTrainer
    from .train.checkpoint import load_model

    # the configuration first: a bad --task / --knob / --set fails before any checkpoint is read
    steps = {} if args.steps is None else {"steps": args.steps}
    cfg = GRPOConfig(task=args.task, task_knobs=parse_assignments(args.knob, "--knob"), seed=args.seed, **steps)
    cfg = override(cfg, parse_assignments(args.set, "--set"), "GRPO setting")
    init = resolve_checkpoint(args.init)
    tok = load_tokenizer(init, args.tokenizer)
    trainer = GRPOTrainer(load_model(init), tok, cfg, args.out, resume=args.resume, parallel=ctx)
    records = trainer.run()
    evals = [r for r in records if r["kind"] == "eval"]
    if evals and trainer.is_main:
        print(f"held-out accuracy {evals[0]['heldout_accuracy']:.1%} (step {evals[0]['step']}) -> "
              f"{evals[-1]['heldout_accuracy']:.1%} (step {evals[-1]['step']}) on {evals[-1]['heldout_n']} problems; "
              f"metrics {Path(args.out) / 'metrics.jsonl'}, plot {Path(args.out) / 'grpo.png'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import itertools

    from .config import parse_assignments
    from .io import load_checkpoint, read_config
    from .io.paths import load_tokenizer, resolve_checkpoint
    from .rl.distill import EndpointTeacher, EngineTeacher, distill
    from .rl.tasks import check_knobs, generate, load_jsonl
    from .train import TrainConfig, apply_overrides
    from .train.sft import SFT_DEFAULTS

    out = Path(args.out)
    if args.problems:
        problems = load_jsonl(args.problems, limit=args.n)
    else:
        knobs = check_knobs(args.task, parse_assignments(args.knob, "--knob"))
        problems = list(itertools.islice(generate(args.task, seed=args.seed, **knobs), args.n))
    if args.student and args.set:  # the student's SFT overrides, checked before the teacher runs
        apply_overrides(read_config(resolve_checkpoint(args.student)), TrainConfig(**SFT_DEFAULTS), args.set)
    if args.teacher.startswith(("http://", "https://")):
        if not args.teacher_model:
            raise SystemExit("nanoseek: an endpoint teacher needs --teacher-model")
        teacher = EndpointTeacher(args.teacher, args.teacher_model, args.api_key)
    else:
        ckpt = resolve_checkpoint(args.teacher)
        teacher = EngineTeacher(load_checkpoint(ckpt), load_tokenizer(ckpt, args.tokenizer), name=str(ckpt))
    traces = out / "traces.jsonl"
    st = distill(problems, teacher, traces, k=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                 seed=args.seed)
    print(f"teacher {teacher.name}: {st.kept} of {st.samples} answers kept ({st.acceptance:.1%}), "
          f"{st.solved}/{st.problems} problems solved -> {traces}")
    if args.student:
        if not st.kept:
            raise SystemExit("nanoseek: the teacher produced no verified answer; nothing to fine-tune on")
        sft_args = ["sft", "--init", args.student, "--data", str(traces), "--out", str(out / "sft"),
                    "--steps", str(args.sft_steps), *sum((["--set", s] for s in args.set or []), [])]
        if args.tokenizer:
            sft_args += ["--tokenizer", args.tokenizer]
        return main(sft_args)
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from .recipes.speedrun import speedrun

    sets = (list(FP8_RECIPE) if args.fp8 else []) + list(args.set or [])
    # --sft-steps / --grpo-minutes unset: the recipe's defaults (nanoseek.recipes.posttrain)
    post = {k: v for k, v in {"sft_steps": args.sft_steps, "grpo_minutes": args.grpo_minutes,
                              "teacher_slip": args.teacher_slip}.items() if v is not None}
    s = speedrun(Path(args.out), args.preset, args.minutes, args.data or None, args.max_chars, args.steps,
                 sets, args.seed, post_train=not args.no_post_train, overwrite=args.overwrite, **post)
    print(json.dumps(s, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .io import CheckpointError
    from .train.checkpoint import export_sharded

    if (args.out is None) == (args.gguf is None):
        raise SystemExit("nanoseek: export needs one of --out DIR (Hugging Face layout) or --gguf FILE (llama.cpp)")
    if args.gguf is not None:
        from . import load
        from .io.gguf import write_gguf
        from .io.paths import load_tokenizer, resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint)
        tok = load_tokenizer(ckpt, args.tokenizer)
        try:
            dest = write_gguf(load(ckpt, verify=False), args.gguf, tok, args.type, name=ckpt.name)
        except CheckpointError as e:
            raise SystemExit(f"nanoseek: {e}") from None
        print(f"wrote {dest} (llama.cpp deepseek2 GGUF, {args.type})")
        return 0
    try:
        dest = export_sharded(args.checkpoint, args.out)
    except CheckpointError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    print(f"wrote {dest} (Hugging Face DeepSeek-V3 layout)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import override, parse_assignments
    from .eval.harness import EndpointBackend, EvalConfig, LocalBackend, evaluate, markdown_table
    from .eval.tasks import TaskError

    if not args.endpoint and not args.checkpoint:
        raise SystemExit("nanoseek: eval needs a checkpoint, or --endpoint URL --model NAME")
    cfg = EvalConfig(tasks=tuple(t for t in args.tasks.split(",") if t), limit=args.limit, fewshot=args.fewshot,
                     n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                     data_dir=args.data_dir, task_knobs=parse_assignments(args.knob, "--knob"))
    cfg = override(cfg, args.set or [], "eval setting")  # e.g. passkey_lengths=256,1024 temperature=0.7
    try:
        if args.endpoint:
            backend = EndpointBackend(args.endpoint, args.model or "nanoseek")
        else:
            from .infer.commands import load_for_inference

            args.device = "cpu" if args.device is None else args.device
            model, tok, ckpt = load_for_inference(args)
            backend = LocalBackend(model, tok, max_batch=args.max_batch, max_len=args.max_len, name=str(ckpt))
        results = evaluate(backend, cfg, args.out)
    except TaskError as e:
        raise SystemExit(f"nanoseek: {e}") from None
    print(markdown_table(results), end="")
    if args.out:
        print(f"wrote {Path(args.out) / 'results.json'}, results.md and samples/")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .recipes.extend import extend

    stages = [int(x) for x in args.stages.split(",") if x]
    try:
        s = extend(args.checkpoint, args.data, args.out, stages, args.steps, seed=args.seed, sets=args.set or [])
    except ConfigError:  # main prints it (exit 2)
        raise
    except ValueError as e:  # e.g. a length not beyond the original context
        raise SystemExit(f"nanoseek: {e}") from None
    print(json.dumps(s, indent=2))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from .eval.lmeval import main as lm_eval_main
    except ImportError as e:
        raise SystemExit(f"nanoseek: lm-eval is not installed ({e}); pip install 'lm-eval>=0.4,<0.5'") from None
    return lm_eval_main(args.args)


PARALLEL_HELP = ("a mesh under torchrun, e.g. dp=2,ep=2 (data-parallel FSDP2 x expert-parallel ranks; omitted "
                 "dimensions are 1), plus nodes=, meta_init=, activation_checkpoint=, reshard_after_forward=, "
                 "fp8_dispatch=, timeout= (nanoseek.parallel.ParallelConfig)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in plain PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="parameters, KV-cache bytes and FLOPs of a config, checkpoint or preset")
    p.add_argument("configs", nargs="+", metavar="CONFIG_OR_CHECKPOINT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    p.add_argument("--cache-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="a model on a cluster: memory per GPU, FLOPs and EP bytes per token, pipeline "
                       "bubbles, GPU-hours (DeepSeek-V3's run by default, beside its reported figures)")
    p.add_argument("--preset", default="v3", help="a preset, config.json or checkpoint")
    p.add_argument("--gpus", type=int)
    p.add_argument("--pp", type=int, help="pipeline ranks")
    p.add_argument("--ep", type=int, help="expert-parallel ranks")
    p.add_argument("--schedule", help="1f1b | zb1p | dualpipe | dualpipev")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation for the GPU-hours")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another ClusterConfig field: seq_len, micro_batch, global_batch, max_nodes, fp8_cache, "
                        "recompute, peak_tflops, gpus_per_node, gpu_memory_gib")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="build a preset, train a few steps, save and reload it")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="pre-train a model (V3 recipe) on a corpus")
    p.add_argument("--preset", default="tiny", help="tiny | small | v2-lite | v3 | path to config.json")
    p.add_argument("--data", nargs="*", help="a prepared data dir (with data.json), or files/folders, 'stdlib' "
                   "for the Python standard library (the default)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--steps", type=int)
    p.add_argument("--max-chars", type=int, default=None, help="cap the corpus size (characters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training or model field")
    p.add_argument("--fp8", action="store_true", help=FP8_HELP)
    p.add_argument("--parallel", metavar="MESH", help=PARALLEL_HELP)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("speedrun", help="tokenizer + corpus + pre-training + report, within a time budget")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--minutes", type=float, default=10.0, help="pre-training budget (post-training comes after)")
    p.add_argument("--out", default="runs/speedrun")
    p.add_argument("--data", nargs="*", help="files/folders, 'stdlib' for the Python standard library (the default)")
    p.add_argument("--max-chars", type=int, default=12_000_000)
    p.add_argument("--steps", type=int, help="fixed number of steps instead of the time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--fp8", action="store_true", help=FP8_HELP)
    p.add_argument("--no-post-train", action="store_true", help="stop after pre-training (no SFT / GRPO)")
    p.add_argument("--sft-steps", type=int, help="SFT steps (default: the recipe's)")
    p.add_argument("--grpo-minutes", type=float, help="GRPO budget, minutes of training steps (default: the recipe's)")
    p.add_argument("--teacher-slip", type=float, help="the teacher's chance of dropping a negative step's minus sign "
                   "(default: the recipe's; 0: a correct teacher)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier speedrun in --out")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens only)")
    p.add_argument("--init", required=True, help="checkpoint to start from (dir or training output)")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files with a 'messages' list per line")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the --init checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--steps", type=int)
    p.add_argument("--heldout-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training field")
    p.add_argument("--parallel", metavar="MESH", help=PARALLEL_HELP)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("export", help="gather a sharded checkpoint of a distributed run into the Hugging Face layout "
                                      "(--out), or write any checkpoint as a llama.cpp GGUF (--gguf)")
    p.add_argument("checkpoint", help="a step_... directory of a run trained with --parallel (--out); for --gguf any "
                                      "checkpoint directory or training output")
    p.add_argument("--out", help="directory for the Hugging Face layout")
    p.add_argument("--gguf", metavar="FILE", help="write a llama.cpp GGUF (architecture deepseek2) here")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF type of the weight matrices (norms and the router stay f32); default f16")
    p.add_argument("--tokenizer", help="tokenizer.json for --gguf (default: the checkpoint's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("grpo", help="GRPO with rule-based rewards on a verifiable task (R1-Zero recipe)")
    p.add_argument("--init", required=True, help="checkpoint to start from (dir or training output)")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="arithmetic", help="arithmetic | countdown (nanoseek.rl.GENERATORS)")
    p.add_argument("--knob", action="append", metavar="KEY=VALUE", help="task difficulty, e.g. digits=1")
    p.add_argument("--tokenizer")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a GRPOConfig field, e.g. group_size=16, beta=0.001, aggregation=dapo, eps_high=0.28")
    p.add_argument("--parallel", metavar="MESH", help=PARALLEL_HELP + "; rollouts run on each rank's whole copy")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("distill", help="rejection-sample a teacher's verified answers, then SFT a student")
    p.add_argument("--teacher", required=True, help="a checkpoint dir, or an OpenAI-compatible base URL (http...)")
    p.add_argument("--teacher-model", help="model name at the endpoint")
    p.add_argument("--api-key", default=None, help="endpoint key (default: $OPENAI_API_KEY)")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="arithmetic", help="a task generator (when no --problems file)")
    p.add_argument("--knob", action="append", metavar="KEY=VALUE")
    p.add_argument("--problems", help="JSONL problems (GSM8K or MATH layout) instead of a generator")
    p.add_argument("--n", type=int, default=200, help="number of problems")
    p.add_argument("--k", type=int, default=4, help="answers per problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", help="checkpoint to fine-tune on the kept traces (omit: only write them)")
    p.add_argument("--tokenizer", help="tokenizer.json for checkpoints without one")
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="SFT training overrides")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="score a checkpoint (or an OpenAI-compatible endpoint) on evaluation tasks")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory or training output (newest checkpoint)")
    p.add_argument("--tasks", default="arithmetic",
                   help="comma-separated NAME or NAME=PATH: mmlu_stem, gsm8k, humaneval, arithmetic, countdown, or "
                        "any JSONL in a layout of nanoseek.eval.tasks (choice / math / code / text)")
    p.add_argument("--limit", type=int, help="scored rows per task")
    p.add_argument("--fewshot", type=int, help="few-shot examples (default: per task)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem for pass@1 / pass@n (T 0.6, p 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="folder holding the built-in tasks' files (e.g. mmlu_stem_test.jsonl)")
    p.add_argument("--knob", action="append", metavar="KEY=VALUE", help="arithmetic / countdown difficulty")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any EvalConfig field, e.g. passkey_lengths=256,1024,4096 passkey_depths=0,0.5,1 top_p=0.9")
    p.add_argument("--out", help="folder for results.json, results.md and samples/*.jsonl")
    p.add_argument("--endpoint", help="an OpenAI-compatible server's URL instead of a checkpoint (generation tasks)")
    p.add_argument("--model", help="the model name to ask the endpoint for")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, help="context length (default: the engine's, at most the model's)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extend", help="long-context extension: YaRN + two short training stages (V3 §4.3)")
    p.add_argument("checkpoint", help="the pre-trained checkpoint (or its run folder)")
    p.add_argument("--data", required=True, help="a prepared data folder (train.bin/val.bin, e.g. runs/speedrun/data)")
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="1024,4096", help="context lengths of the stages (YaRN set for the last)")
    p.add_argument("--steps", type=int, default=100, help="steps per stage (V3: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training fields of the stages")
    p.set_defaults(func=cmd_extend)

    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line with the nanoseek "
                       "model registered: nanoseek lm-eval run --model nanoseek --model_args pretrained=CKPT ...")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)

    from .infer.commands import add_parsers

    add_parsers(sub)

    args = parser.parse_args(argv)
    from .config import ConfigError
    from .parallel import DistributedError

    try:
        return args.func(args)
    except ConfigError as e:  # a bad value or name: one line, and argparse's exit status for usage errors
        parser.exit(2, f"nanoseek: {e}\n")
    except DistributedError as e:  # no rendezvous
        parser.exit(1, f"nanoseek: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
