"""Run under torchrun by tests/parallel: `dist_worker.py SCENARIO OUT [ARGS...]`; rank 0 writes OUT (JSON).

step MESH...      one forward/backward of a small MoE model per mesh vs the same model in this process: loss and
                  every gradient; EP traffic vs the routing it came from (node-limited routing)
grpo MESH[+MESH...] TOKENIZER RUN   per MESH, a few GRPO steps (MTP distillation on) with the policy parallelized
                  (rollouts on each rank's copy), in RUN/MESH; its trained weights in RUN/MESH/final.safetensors
pipeline SCHED... each pipeline schedule against one process (loss, gradients, expert loads)
hang              rank 1 stops answering (the others must give up within the timeout)
redundant MESH[+MESH...] [DATA RUN TRAIN_MESH...]   per MESH, one step with redundant experts (planned from the
                  step's skewed loads) vs the same model in this process: loss, every gradient, each rank's expert rows
                  per layer without and with the plan, the replica weight bytes; then the Trainer (4 steps) on a skewed
                  router under each TRAIN_MESH (run RUN/<i>)
train MESH DATA RUN STEPS [MAX]   the Trainer (API) on DATA for STEPS steps (stopping after MAX), resuming RUN if
                  it has a checkpoint; then the logits of the trained model on fixed tokens
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from nanoseek.io import build
from nanoseek.model import ModelConfig, preset
from nanoseek.parallel import (
    ParallelConfig,
    clip_grad_norm,
    expert_traffic,
    init_distributed,
    materialize,
    parallelize,
)
from nanoseek.train import TrainConfig, Trainer


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                n_group=4, topk_group=2, max_position_embeddings=512, initializer_range=0.1,
                num_nextn_predict_layers=1, rope_scaling=None)
    base.update(kw)
    return ModelConfig(**base)


def train_configs(steps: int, **changes) -> tuple[ModelConfig, TrainConfig]:
    """The model and recipe of the distributed training tests (tests/parallel/test_parallel.py uses the same);
    `changes`: fields of either."""
    mk = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    tk = dict(steps=steps, batch_size=4, micro_batch_size=1, seq_len=32, eval_every=5, eval_batches=2, ckpt_every=3,
              keep_last=5, warmup_frac=0.2, batch_ramp_frac=0.0, bias_update_speed=0.01)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in changes.items():
        (mk if k in model_fields else tk)[k] = v
    return preset("tiny", **mk), TrainConfig(**tk)


def scenario_step(out: Path, meshes: list[str]) -> None:
    results = {}
    for spec in meshes:
        mesh, _, flag = spec.partition("|")  # "|nolimit": every group may be chosen (no node limit)
        pc = ParallelConfig.parse(mesh)
        ctx = init_distributed(pc)
        if flag == "meta":
            results[spec] = meta_init_check(ctx)
            continue
        topk_group = 4 if flag == "nolimit" else 2
        cfg = model_config(topk_group=topk_group)
        torch.manual_seed(0)
        B, S = 8, 16
        x = torch.randint(0, cfg.vocab_size, (B, S + 1))
        ref = build(cfg, torch.float32, "cpu").train()
        ref_out = ref(x[:, :-1], labels=x[:, 1:])
        ref_out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
        model = build(cfg, torch.float32, "cpu").train()
        model.load_state_dict(ref.state_dict())
        parallelize(model, ctx)
        routes = []
        for gate in model.moe_gates():  # the routing of each forward (not of activation-checkpoint recomputation)
            gate.register_forward_hook(
                lambda m, i, o, seen=routes: seen.append(o[1].detach())
                if torch._C._current_graph_task_id() == -1 else None)
        W, r = ctx.world_size, ctx.rank
        xs = x[r * B // W:(r + 1) * B // W]
        o = model(xs[:, :-1], labels=xs[:, 1:])
        o.loss.backward()
        traffic = expert_traffic(model)
        loss = ctx.all_reduce(o.loss.detach().clone()) / W
        norm = clip_grad_norm(model, 1e9, ctx)
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
        grads = {}
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
            g = q.grad.full_tensor()
            grads[name] = ((g - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item()
        res = {"loss": loss.item(), "ref_loss": ref_out.loss.item(), "grad_rel": grads, "norm": norm,
               "ref_norm": ref_norm}
        if traffic is not None:
            # the formula, from the routing alone: every slot whose expert lives on another node crosses nodes once
            # each way, as a row of H fp32 values
            el = cfg.n_routed_experts // pc.ep
            node_of = torch.arange(pc.ep) * ctx.ep_nodes // pc.ep
            mine = node_of[ctx.ep_rank]
            cross = sum(int((node_of[idx // el] != mine).sum()) for idx in routes)
            nodes_per_token = max(int(torch.stack([(node_of[idx // el] == n).any(-1)
                                                   for n in range(ctx.ep_nodes)]).sum(0).max()) for idx in routes)
            row = cfg.hidden_size * 4
            t = traffic.to_dict()
            checks = torch.tensor([t["cross_node_bytes"], 2 * cross * row, t["max_nodes_per_token"], nodes_per_token],
                                  dtype=torch.float64)
            gathered = ctx.all_gather(checks[None])  # [W, 4]
            res["traffic"] = {"measured_cross_node_bytes": gathered[:, 0].tolist(),
                              "formula_cross_node_bytes": gathered[:, 1].tolist(),
                              "max_nodes_measured": int(gathered[:, 2].max()),
                              "max_nodes_from_routing": int(gathered[:, 3].max()), "nodes": ctx.ep_nodes,
                              "topk_group": topk_group, "rows": t["rows"]}
        results[spec] = res
    if ctx.is_main:
        out.write_text(json.dumps(results))


def meta_init_check(ctx) -> dict:
    """Build on meta, parallelize, materialise: each rank allocates and initialises its shards only."""
    cfg = model_config()
    model = build(cfg, torch.float32, "meta")
    parallelize(model, ctx)
    materialize(model, ctx.device, seed=0)
    dup, stds = [], {}
    for name, p in model.named_parameters():
        full = p.full_tensor()
        if full.dim() >= 2 and "norm" not in name:
            half = full.shape[0] // 2
            dup.append(bool(torch.equal(full[:half], full[half:2 * half])))
            stds[name] = full.std().item()
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    out = model(x[:, :-1], labels=x[:, 1:])
    out.loss.backward()
    return {"duplicated_halves": any(dup), "stds": stds, "init_std": cfg.initializer_range,
            "main_loss": out.main_loss.item(), "local_numel": sum(p.to_local().numel() for p in model.parameters()),
            "numel": sum(p.numel() for p in model.parameters())}


def scenario_train(out: Path, spec: str, data: str, run: str, steps: int, max_steps: int | None) -> None:
    ctx = init_distributed(ParallelConfig.parse(spec))
    m, t = train_configs(steps)
    run_dir = Path(run)
    resume = (run_dir / "checkpoints").is_dir()
    tr = Trainer(m, t, Path(data), run_dir, resume=resume, progress=False, parallel=ctx)
    start = tr.step
    tr.run(max_steps=max_steps)
    torch.manual_seed(123)
    x = torch.randint(0, m.vocab_size, (2, 16))
    tr.model.eval()
    with torch.no_grad():
        logits = tr.model(x).logits
    if ctx.is_main:
        out.write_text(json.dumps({"start": start, "step": tr.step, "logits": logits.tolist(), "tokens": x.tolist()}))


def skew_router(model: torch.nn.Module, experts: int = 2, bias: float = 0.5) -> None:
    """Every router prefers the first `experts` experts (all on ep rank 0): a skewed expert load."""
    with torch.no_grad():
        for gate in model.moe_gates():
            gate.e_score_correction_bias[:experts] += bias


def scenario_redundant(out: Path, specs: list[str], data: str | None = None, run: str | None = None,
                       train_meshes: tuple[str, ...] = ()) -> None:
    results = {spec: redundant_step(spec) for spec in specs}
    if int(os.environ["RANK"]) == 0:
        out.write_text(json.dumps(results))
    for i, mesh in enumerate(train_meshes):
        ctx = init_distributed(ParallelConfig.parse(mesh))
        m, t = redundant_train_configs()
        tr = Trainer(m, t, Path(data), Path(run) / str(i), progress=False, parallel=ctx)  # type: ignore[arg-type]
        skew_router(tr.model)
        tr.run()


def redundant_step(spec: str) -> dict:
    from nanoseek.parallel.redundant import expert_replicas

    pc = ParallelConfig.parse(spec)
    ctx = init_distributed(pc)
    cfg = model_config()
    torch.manual_seed(0)
    B, S = 8, 16
    x = torch.randint(0, cfg.vocab_size, (B, S + 1))
    ref = build(cfg, torch.float32, "cpu").train()
    skew_router(ref)
    ref_out = ref(x[:, :-1], labels=x[:, 1:])
    ref_out.loss.backward()
    model = build(cfg, torch.float32, "cpu").train()
    model.load_state_dict(ref.state_dict())
    parallelize(model, ctx)
    replicas = expert_replicas(model)
    W, r = ctx.world_size, ctx.rank
    xs = x[r * B // W:(r + 1) * B // W]
    dispatches = [b.mlp.dispatch for b in [*model.model.layers, *model.mtp] if hasattr(b.mlp, "dispatch")]
    with torch.no_grad():  # without a plan: every expert once, on its owner
        load = model(xs[:, :-1], labels=xs[:, 1:]).expert_load
    before = [d.take().expert_rows for d in dispatches]  # this rank's expert rows per MoE layer
    replicas.observe(ctx.all_gather(load.transpose(0, 1).contiguous()).transpose(0, 1))  # plans at once
    o = model(xs[:, :-1], labels=xs[:, 1:])
    o.loss.backward()
    taken = [d.take() for d in dispatches]
    after, sent = [t.expert_rows for t in taken], sum(t.replica_bytes for t in taken)
    loss = ctx.all_reduce(o.loss.detach().clone()) / W
    grads = {}
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        g = q.grad.full_tensor()
        grads[name] = ((g - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item()
    # the formula: every slot of another ep rank that holds one of this rank's experts receives its weights
    plan, local = replicas.plan, cfg.n_routed_experts // pc.ep
    slots = plan.phy2log.view(plan.phy2log.shape[0], pc.ep, -1)
    mine = slots // local == ctx.ep_rank
    mine[:, ctx.ep_rank] = False
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    gathered = ctx.all_gather(torch.tensor([before + after + [sent, int(mine.sum()) * expert_bytes]],
                                           dtype=torch.float64))
    n = len(dispatches)
    return {"loss": loss.item(), "ref_loss": ref_out.loss.item(), "grad_rel": grads,
            "rows_before": gathered[:, :n].tolist(), "rows_after": gathered[:, n:2 * n].tolist(),
            "replica_bytes": gathered[:, 2 * n].tolist(), "formula_bytes": gathered[:, 2 * n + 1].tolist(),
            "logcnt": plan.logcnt.tolist(), "phy2log": plan.phy2log.tolist()}


def redundant_train_configs() -> tuple[ModelConfig, TrainConfig]:
    """The training runs of the redundant-experts test: 4 steps, one evaluation and one checkpoint, at the end."""
    return train_configs(4, eval_every=4, ckpt_every=4)


def has_e(prompt: str, completion: str, **_) -> float:
    """A reward a random model earns sometimes (tests/rl/test_grpo.py's)."""
    return float("e" in completion)


def grpo_setup(tokenizer_path: str):
    """The GRPO test's tokenizer, model and config (tests/parallel/test_parallel.py builds the same)."""
    from nanoseek.data import Tokenizer
    from nanoseek.rl.config import GRPOConfig

    tok = Tokenizer.load(tokenizer_path)
    torch.manual_seed(0)
    model = build(model_config(vocab_size=tok.vocab_size, initializer_range=0.05, rope_scaling=None),
                  torch.float32, "cpu")
    cfg = GRPOConfig(task="arithmetic", task_knobs={"digits": 1}, steps=3, questions_per_step=4, group_size=4,
                     max_new_tokens=8, eval_n=6, eval_every=3, ckpt_every=2, lr=1e-5, mu=2, micro_batch=3, beta=0.01,
                     temperature=1.0, mtp_lambda=0.5)
    return tok, model, cfg


def scenario_grpo(out: Path, specs: list[str], tokenizer_path: str, run: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from nanoseek.rl.grpo import GRPOTrainer

    results = {}
    for spec in specs:
        ctx = init_distributed(ParallelConfig.parse(spec))
        tok, model, cfg = grpo_setup(tokenizer_path)
        tr = GRPOTrainer(model, tok, cfg, Path(run) / spec, progress=False, reward_fn=has_e, parallel=ctx)
        before = {k: v.clone() for k, v in tr.rollout_model.state_dict().items()}
        tr.run()
        trained = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True))
        rollout = tr.rollout_model.state_dict()
        results[spec] = {"rollout_equals_policy": all(torch.equal(rollout[k], v) for k, v in trained.items()),
                         "rollout_moved": any(not torch.equal(before[k], rollout[k]) for k in before)}
        if ctx.is_main:
            save_file({k: v.contiguous() for k, v in trained.items()}, Path(run) / spec / "final.safetensors")
    if ctx.is_main:
        out.write_text(json.dumps(results))


def scenario_pipeline(out: Path, schedules: list[str]) -> None:
    """Each schedule at pp = world size, 4 micro-batches, against the whole batch in one process: the loss, every
    gradient of this rank's stages and the expert loads its MoE layers saw."""
    import torch.distributed as dist

    from nanoseek.parallel.pipeline import build_pipeline, stage_parameters, sync_tied_embedding

    ctx = init_distributed(ParallelConfig(dp=int(os.environ["WORLD_SIZE"])))
    group = dist.group.WORLD
    results = {}
    for schedule in schedules:
        cfg = model_config(num_hidden_layers=2 * ctx.world_size, num_nextn_predict_layers=1)  # DualPipeV: 2 stages/rank
        torch.manual_seed(0)
        B, S, m = 8, 16, max(4, 2 * ctx.world_size)  # DualPipeV: at least as many micro-batches as stages
        x = torch.randint(0, cfg.vocab_size, (B, S + 1))
        ref = build(cfg, torch.float32, "cpu").train()
        ref_out = ref(x[:, :-1], labels=x[:, 1:], mtp_loss_weight=0.3)
        ref_out.loss.backward()
        model = build(cfg, torch.float32, "cpu").train()
        model.load_state_dict(ref.state_dict())
        sched, modules = build_pipeline(model, group, schedule, m, mtp_loss_weight=0.3)
        first, last = any(mo.first for mo in modules), any(mo.last for mo in modules)
        losses: list[torch.Tensor] = []
        if first and last:
            sched.step(x[:, :-1], target=x[:, 1:], losses=losses)
        elif first:
            sched.step(x[:, :-1])
        elif last:
            sched.step(target=x[:, 1:], losses=losses)
        else:
            sched.step()
        sync_tied_embedding(model, modules, group, schedule)
        names = {id(p): n for n, p in model.named_parameters()}
        ref_grads = dict(ref.named_parameters())
        worst, worst_name = 0.0, ""
        for p in stage_parameters(modules):
            n = names[id(p)]
            g, r = p.grad, ref_grads[n].grad
            e = ((g - r).norm() / r.norm().clamp_min(1e-30)).item() if g is not None else float("inf")
            if e > worst:
                worst, worst_name = e, n
        # every layer's expert loads over the micro-batches == the whole batch's
        moe_layers = [i for i in range(cfg.num_hidden_layers) if i >= cfg.first_k_dense_replace]
        taken = [mo.take(m) for mo in modules]
        load_diff = 0.0
        for mo, (loads, _) in zip(modules, taken, strict=True):
            layers = [i for i in range(mo.start, mo.stop) if i in moe_layers]
            for i, got in zip(layers, loads, strict=True):  # same sequences, same order: the same counts
                load_diff = max(load_diff, (got - ref_out.expert_load[moe_layers.index(i)]).abs().max().item())
        # the whole loss: the last stage's (main + MTP + the MTP layers' balance) + every stage's balance loss
        balance = ctx.all_reduce(torch.tensor([sum(b for _, b in taken)], dtype=torch.float64)).item()
        loss = torch.stack(losses).sum().item() + balance if losses else None
        res = torch.tensor([worst, load_diff,
                            abs(loss - ref_out.loss.item()) / ref_out.loss.item() if loss is not None else 0.0,
                            1.0 if loss is not None else 0.0, float(len(stage_parameters(modules)))])
        gathered = ctx.all_gather(res[None])
        results[schedule] = {"worst_grad_rel": gathered[:, 0].max().item(), "load_diff": gathered[:, 1].max().item(),
                             "loss_rel": gathered[:, 2].max().item(), "ranks_with_loss": int(gathered[:, 3].sum()),
                             "params_per_rank": gathered[:, 4].tolist(), "worst_name": worst_name}
    if ctx.is_main:
        out.write_text(json.dumps(results))


def scenario_hang() -> int:
    """Rank 1 stops answering; rank 0's next collective must end within the timeout, with one line."""
    import argparse
    import time

    from nanoseek.cli import _parallel

    def body(ctx) -> int:
        if ctx.rank == 1:
            time.sleep(30)
            return 0
        ctx.agree(True)
        return 0

    return _parallel(argparse.Namespace(parallel="dp=2,timeout=3"), body)


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, out = sys.argv[1], Path(sys.argv[2])
    if kind == "step":
        scenario_step(out, sys.argv[3:])
    elif kind == "train":
        a = sys.argv[3:]
        scenario_train(out, a[0], a[1], a[2], int(a[3]), int(a[4]) if len(a) > 4 else None)
    elif kind == "grpo":
        scenario_grpo(out, sys.argv[3].split("+"), *sys.argv[4:6])
    elif kind == "pipeline":
        scenario_pipeline(out, sys.argv[3:])
    elif kind == "hang":
        sys.exit(scenario_hang())
    elif kind == "redundant":
        a = sys.argv[3:]
        scenario_redundant(out, a[0].split("+"), *a[1:3], tuple(a[3:]))
    else:
        raise SystemExit(f"unknown scenario {kind}")
