"""EPLB on real load: serve held-out prompts with a trained checkpoint (the speedrun's, by default) through the
engine, count the tokens each router sends to each expert (the server's /metrics hooks), and plan redundant experts
for a few deployments: the busiest GPU's load over the mean, without replicas and with the plan -- on the load it was
planned from and on a second, unseen half of the prompts (what a periodic re-plan would have bought).

    .venv/bin/python benchmarks/eplb_served_load.py [--ckpt runs/speedrun/pretrain] [--prompts 64] [--split halves]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import nanoseek
from nanoseek.data import Tokenizer
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.metrics import ExpertLoad
from nanoseek.parallel.eplb import rebalance, unbalanced_gpu_load


def served_load(engine: Engine, load: ExpertLoad, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    before = load.snapshot()
    engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    return (load.snapshot() - before).double()


def imbalance(gpu_load: torch.Tensor) -> float:
    """max / mean GPU load, worst layer."""
    return float((gpu_load.max(dim=1).values / gpu_load.mean(dim=1)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/speedrun/pretrain")
    ap.add_argument("--data", default="runs/speedrun/data", help="folder with tokenizer.json and val_docs.jsonl")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--split", choices=["interleaved", "halves"], default="interleaved",
                    help="unseen prompts: every other document (the same mix), or the second half of the documents "
                         "(other source files: a shift in what is served)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nanoseek.load(args.ckpt).eval()
    tok = Tokenizer.load(Path(args.data) / "tokenizer.json")
    docs = [json.loads(line)["text"] for line in (Path(args.data) / "val_docs.jsonl").read_text().splitlines()]
    ids = [tok.encode(d)[: args.prompt_tokens] for d in docs if len(d) > 200][: 2 * args.prompts]
    engine = Engine(model, tok, max_batch=16, max_len=args.prompt_tokens + args.new_tokens + 8)
    load = ExpertLoad(model, engine.max_len)
    first, second = (ids[0::2], ids[1::2]) if args.split == "interleaved" else (ids[: len(ids) // 2],
                                                                                   ids[len(ids) // 2:])
    seen = served_load(engine, load, first, args.new_tokens)
    unseen = served_load(engine, load, second, args.new_tokens)
    c = model.config
    E = c.n_routed_experts
    print(f"{args.ckpt}: {c.n_moe_layers} MoE layers x {E} experts, top-{c.num_experts_per_tok}, {c.n_group} groups; "
          f"{len(first)} + {len(second)} prompts ({args.split}) of <= {args.prompt_tokens} tokens, "
          f"{args.new_tokens} generated each; {int(seen[0].sum())} + {int(unseen[0].sum())} (token, expert) pairs "
          f"per layer")
    share = seen / seen.sum(dim=1, keepdim=True)
    print(f"hottest expert's share of a layer's pairs: {float(share.max()):.3f} (uniform {1 / E:.3f})")
    print("| GPUs | nodes | slots | max/mean, no replicas (planned on / unseen) | with the plan (same) |")
    print("|---|---|---|---|---|")
    for gpus, nodes, redundant in ((4, 1, 4), (4, 2, 4), (8, 1, 8), (8, 2, 16), (16, 1, 16)):
        plan = rebalance(seen, E + redundant, c.n_group, nodes, gpus)
        row = [imbalance(unbalanced_gpu_load(seen, gpus)), imbalance(unbalanced_gpu_load(unseen, gpus)),
               imbalance(plan.gpu_load(seen, gpus)), imbalance(plan.gpu_load(unseen, gpus))]
        print(f"| {gpus} | {nodes} | {E}+{redundant} | {row[0]:.3f} / {row[1]:.3f} | {row[2]:.3f} / {row[3]:.3f} |")


if __name__ == "__main__":
    main()
