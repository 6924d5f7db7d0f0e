"""Supervised fine-tuning data: chat JSONL -> packed token shards plus a loss mask (assistant tokens only).

Input: JSONL files, one example per line: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
(extra fields, e.g. provenance, are ignored). Tool use: assistant messages with OpenAI `tool_calls`, `tool` messages,
and the example's `tools` (OpenAI function definitions, shown in its system prompt) as `nanoseek serve` renders
them; the calls are trained on, the tool outputs are context. Each example is rendered with the DeepSeek-V3 chat
template (reasoning `<think>` sections kept: they are what R1-style SFT teaches) and the examples are concatenated, like
pre-training documents. The mask marks the assistant content and the end-of-sentence token closing each assistant
turn; everything else (system and user text, template markers) is context only.

Output directory (read by `Trainer`): train.bin / train_mask.bin, val.bin / val_mask.bin, tokenizer.json,
data.json. Held-out examples are chosen by a hash of the example, so the split does not depend on file order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..data import Tokenizer, iter_jsonl
from ..data.shards import write_shard
from ..infer.chat import encode_chat
from ..io.atomic import atomic_write_text

# SFT recipe: short warm-up, then cosine to 10% over the whole run; no batch ramp; MTP lambda and router-bias
# updates as in pre-training but without their late-phase switches
SFT_DEFAULTS = dict(lr=3e-4, warmup_frac=0.03, constant_until=0.03, cosine_until=1.0, tail_until=1.0,
                    batch_ramp_frac=0.0, mtp_lambda_switch=1.0, bias_freeze_frac=1.0, steps=200, batch_size=8,
                    micro_batch_size=8, seq_len=256, eval_every=25, ckpt_every=50)


class SFTDataError(ValueError):
    pass


def read_chat_jsonl(path: str | Path) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    """The (`messages`, `tools`) of every line; SFTDataError naming file and line for bad JSON or a bad message
    list."""
    out = []
    try:
        for n, row in iter_jsonl(path):
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not any(
                    isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
                raise SFTDataError(f"{path}:{n}: needs a 'messages' list with at least one assistant turn")
            out.append((msgs, row.get("tools")))
    except SFTDataError:
        raise
    except ValueError as e:  # a line that is not JSON
        raise SFTDataError(str(e)) from None
    return out


def _heldout(messages: list[dict[str, Any]], frac: float, seed: int) -> bool:
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False) + f"#{seed}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < frac


def prepare_sft(paths: list[str | Path], tokenizer: Tokenizer, out_dir: str | Path, heldout_frac: float = 0.05,
                seed: int = 0) -> dict[str, Any]:
    """Encode, split, and write the SFT shards; returns the data.json contents."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split: dict[str, tuple[list[list[int]], list[list[int]]]] = {"train": ([], []), "val": ([], [])}
    for p in paths:
        for i, (msgs, tools) in enumerate(read_chat_jsonl(p)):
            try:
                ids, mask = encode_chat(msgs, tokenizer, add_generation_prompt=False, keep_think=True,
                                        return_mask=True, tools=tools)
            except ValueError as e:
                raise SFTDataError(f"{p}: example {i + 1}: {e}") from None
            part = "val" if _heldout(msgs, heldout_frac, seed) else "train"
            split[part][0].append(ids)
            split[part][1].append(mask)
    if not split["train"][0]:
        raise SFTDataError(f"no training examples in {', '.join(map(str, paths))}")
    if not split["val"][0]:  # tiny sets: hold out the last training example rather than nothing
        for k in (0, 1):
            split["val"][k].append(split["train"][k].pop())
    tok_path = out / "tokenizer.json"
    tokenizer.save(tok_path)
    for part, (ids, masks) in split.items():
        write_shard(out / f"{part}.bin", ids, tokenizer.hash, tokenizer.vocab_size)
        write_shard(out / f"{part}_mask.bin", masks, tokenizer.hash, tokenizer.vocab_size)
    info = {
        "kind": "sft", "sources": [str(p) for p in paths], "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size, "heldout_frac": heldout_frac, "seed": seed,
        "examples": {k: len(v[0]) for k, v in split.items()},
        "tokens": {k: sum(map(len, v[0])) for k, v in split.items()},
        "trained_tokens": {k: sum(map(sum, v[1])) for k, v in split.items()},
    }
    atomic_write_text(out / "data.json", json.dumps(info, indent=1))
    return info
