"""lm-evaluation-harness model class: `nanoseek lm-eval run --model nanoseek --model_args pretrained=CKPT --tasks T`.

lm-eval 0.4.x finds models only in its own registry, and its command line imports no outside module, so
`nanoseek lm-eval run ...` (or `python -m nanoseek.eval.lmeval run ...`) is lm-eval's own command line with this class
registered first; from Python, `lm_eval.simple_evaluate(model="nanoseek", ...)` works once this module is imported.
The three request types run on the code `nanoseek eval` uses: `loglikelihood` / `loglikelihood_rolling` on
nanoseek.eval.loglik (batched forwards), `generate_until` on the engine (continuous batching, latent KV cache).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval's own models first: it imports them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..infer.engine import SamplingParams
from .harness import LocalBackend


@register_model("nanoseek")
class NanoseekLM(LM):
    """model_args: pretrained (checkpoint directory or training output), tokenizer (default: the checkpoint's),
    max_length (context; default the engine's), max_gen_toks (256), batch_size (sequences decoded together)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, batch_size: int | str | None = 16,
                 **_: Any) -> None:
        super().__init__()
        import torch

        import nanoseek
        from nanoseek.io.paths import load_tokenizer, resolve_checkpoint

        ckpt = resolve_checkpoint(pretrained)
        tok = load_tokenizer(ckpt, tokenizer)
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's command line asks for cuda by default; like its hf model, fall back
        model = nanoseek.load(ckpt, dtype=torch.float32, device=device)
        batch = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" and the like: the default
        self.backend = LocalBackend(model, tok, max_batch=batch, max_len=int(max_length) if max_length else None,
                                    name=str(ckpt))
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        res = self.backend.loglikelihood([tuple(r.args[:2]) for r in requests])
        return [(r.logprob, r.is_greedy) for r in res]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [self.backend.rolling(r.args[0])[0] for r in requests]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests that share their generation settings run as one batch; greedy unless do_sample."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            kw = dict(r.args[1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample")) and float(kw.get("temperature", 1.0)) > 0
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)),
                   float(kw.get("temperature", 1.0)) if sample else 0.0,
                   float(kw["top_p"]) if sample and kw.get("top_p") is not None else None)
            groups[key].append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature, top_p), idx in groups.items():
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=until)
            texts = self.backend.generate([requests[i].args[0] for i in idx], 1, params, seed=0)
            for i, (text,) in zip(idx, texts, strict=True):
                out[i] = text
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the nanoseek model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
