"""Passkey retrieval before and after YaRN context extension (V3 §4.3, scaled down), written to docs/long_context.md.

    .venv/bin/python benchmarks/long_context_study.py --pretrained runs/speedrun/pretrain --data runs/speedrun/data

Four models on the same passkey grid (lengths x depths, `trials` keys per cell): the pre-trained checkpoint as it is
(its RoPE as trained; inputs beyond its max_position_embeddings allowed, so those positions are extrapolated),
the same weights with YaRN set for the final length at inference only, and the checkpoints after each extension
stage (`nanoseek extend`). Also their held-out bits per byte on the pre-training text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanoseek.eval.harness import EvalConfig, LocalBackend, evaluate
from nanoseek.io import load_checkpoint
from nanoseek.io.paths import load_tokenizer, resolve_checkpoint
from nanoseek.recipes.extend import extend, with_config, yarn_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/long_context")
    ap.add_argument("--stages", default="1024,4096")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lengths", default="256,1024,2048,4000")  # + 8 generated tokens within the 4096 context
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--docs", default="docs/long_context.md")
    args = ap.parse_args()
    out = Path(args.out)
    stages = [int(x) for x in args.stages.split(",")]
    lengths = tuple(int(x) for x in args.lengths.split(","))
    src = resolve_checkpoint(args.pretrained)
    tok = load_tokenizer(src, None)
    t0 = time.time()
    done = out / "extend" / "extend.json"
    if done.exists():  # an earlier run of this study: evaluate its extension again
        ext, extend_s = json.loads(done.read_text()), float("nan")
    else:
        ext = extend(src, args.data, out / "extend", stages, args.steps)
        extend_s = time.time() - t0
    base = load_checkpoint(src)
    as_trained = base if base.config.max_position_embeddings >= max(lengths) + 8 else with_config(
        base, base.config.replace(max_position_embeddings=max(lengths) + 8))  # the same RoPE, longer inputs allowed
    models = {
        "pre-trained": as_trained,
        "YaRN at inference only": with_config(base, yarn_for(base.config, max(stages))),
        **{f"after stage {i + 1} ({st['length']})": load_checkpoint(st["checkpoint"])
           for i, st in enumerate(ext["stages"])},
    }
    cfg = EvalConfig(tasks=("passkey", f"heldout={Path(args.data) / 'val_docs.jsonl'}"), limit=40,
                     passkey_lengths=lengths, passkey_depths=tuple(float(x) for x in args.depths.split(",")),
                     passkey_trials=args.trials)
    rows = {}
    for i, (name, model) in enumerate(models.items()):
        backend = LocalBackend(model.eval(), tok, max_batch=8, max_len=max(lengths) + 8, name=name)
        rows[name] = evaluate(backend, cfg, out / f"eval_{i}")["tasks"]
        print(name, json.dumps({k: rows[name]["passkey"][k] for k in ("accuracy", "choice")}),
              f"bpb {rows[name]['heldout']['bpb']:.3f}", flush=True)
    docs = Path(args.docs)
    figs = docs.parent / "long_context"
    figs.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Long context: YaRN extension and passkey retrieval", "",
        f"Reproduce: `.venv/bin/python benchmarks/long_context_study.py --pretrained {args.pretrained} --data "
        f"{args.data}` (extension {extend_s / 60:.1f} min on this machine; measured when the stages ran).", "",
        f"Source: `{src}`; YaRN for {max(stages)} tokens: `{json.dumps(ext['rope_scaling'])}`; stages "
        + ", ".join(f"{st['length']} tokens x {st['steps']} steps (batch {st['batch_size']}, lr {st['lr']:.2g})"
                    for st in ext["stages"]) + ".", "",
        "Passkey: a 5-digit key hidden at a depth of filler text, asked for at the end; `accuracy` = the greedy "
        "continuation starts with the key, `choice` = the key is more likely than each of four random keys "
        "(chance 20%).", "",
        "| model | passkey accuracy | passkey choice | " + " | ".join(f"choice @{L}" for L in lengths)
        + " | held-out BPB |", "|---|---|---|" + "---|" * len(lengths) + "---|",
    ]
    for i, (name, r) in enumerate(rows.items()):
        pk = r["passkey"]
        by_len = {L: [g["choice"] for g in pk["grid"] if g["length"] == L] for L in lengths}
        lines.append(f"| {name} | {pk['accuracy']:.2f} | {pk['choice']:.2f} | "
                     + " | ".join(f"{sum(v) / len(v):.2f}" for v in by_len.values())
                     + f" | {r['heldout']['bpb']:.3f} |")
        for key in ("accuracy", "choice"):
            png = out / f"eval_{i}" / f"passkey_{key}.png"
            (figs / f"{i}_{key}.png").write_bytes(png.read_bytes())
    lines += ["", "Heat-maps (choice; x: context length, y: needle depth):", ""]
    lines += [f"![{name}](long_context/{i}_choice.png)" for i, name in enumerate(rows)]
    docs.write_text("\n".join(lines) + "\n")
    print(f"wrote {docs}")


if __name__ == "__main__":
    main()
