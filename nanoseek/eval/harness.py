"""`nanoseek eval`: score a checkpoint (or an OpenAI-compatible endpoint) on tasks, the way DeepSeek's tables do.

    backend = LocalBackend(model, tok)                        # or EndpointBackend(url, model_name)
    results = evaluate(backend, EvalConfig(tasks=("mmlu_stem=data/mmlu.jsonl", "arithmetic")), out="eval/")

Per kind (see nanoseek.eval.tasks): choice -> acc and acc_norm (log-likelihood of each option, raw and per byte);
math / problems -> greedy pass@1 and, with n_samples > 1, pass@1 and pass@n from n samples at the R1 protocol's
temperature 0.6 / top-p 0.95 (unbiased estimator); code -> the same on HumanEval-style problems run in the
sandbox; text -> bits per byte. `out` gets results.json, results.md and samples/TASK.jsonl (prompt, output,
extracted answer, verdict per sample). A fixed seed gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import NON_NEGATIVE, POSITIVE, Range, check_fields, param
from ..infer.chat import encode_prompt
from ..infer.engine import Engine, SamplingParams
from ..model import Transformer
from .loglik import LogLik, bits_per_byte, loglikelihood, loglikelihood_rolling
from .tasks import CODE_STOP, MATH_STOP, Task, TaskError, choice_prompt, extract_math_answer, load_task, math_prompt

Prompt = str | list[dict[str, str]]  # raw text (a completion) or chat messages


@dataclass
class EvalConfig:
    """What to evaluate and how; R1's sampling protocol (temperature 0.6, top-p 0.95) for pass@k."""

    tasks: tuple[str, ...] = ("arithmetic",)  # NAME or NAME=PATH (nanoseek.eval.tasks)
    limit: int | None = param(None, POSITIVE)  # scored rows per task (after the few-shot rows)
    fewshot: int | None = param(None, NON_NEGATIVE)  # None: each task's default
    n_samples: int = param(1, POSITIVE)  # > 1: also sample n per problem for pass@1 / pass@n
    temperature: float = param(0.6, POSITIVE)
    top_p: float = param(0.95, Range(0, 1, lo_open=True))
    max_new_tokens: int = param(256, POSITIVE)
    seed: int = 0
    data_dir: str | None = None  # where built-in tasks' files are looked up
    task_knobs: dict[str, Any] = param(default_factory=dict)  # arithmetic / countdown difficulty, e.g. digits=1
    passkey_lengths: tuple[int, ...] = (256, 512, 1024)  # prompt lengths in tokens
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle position in the filler
    passkey_trials: int = param(4, POSITIVE)  # keys per (length, depth) cell

    def __post_init__(self) -> None:
        check_fields(self)
        from ..rl.tasks import check_knobs

        for t in self.tasks:
            if t in ("arithmetic", "countdown"):
                self.task_knobs = check_knobs(t, self.task_knobs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# ---- backends: where log-likelihoods and generations come from ---------------------------------------------------
def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: trailing spaces of the context belong to the continuation."""
    n = len(context) - len(context.rstrip(" "))
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


class LocalBackend:
    """A loaded model: log-likelihoods by batched forwards (nanoseek.eval.loglik), generation through the engine
    (continuous batching, latent KV cache). A prompt longer than the context loses its oldest tokens."""

    def __init__(self, model: Transformer, tokenizer: Any, max_batch: int = 16, max_len: int | None = None,
                 name: str = "local") -> None:
        self.model, self.tok, self.name = model, tokenizer, name
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_len)
        self.max_len = self.engine.max_len

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split (`split_pair`), and the continuation's ids are those of the whole text after the
        context's (so BPE merges across the boundary count once)."""
        context, continuation = split_pair(context, continuation)
        ctx = self.tok.encode(context, allow_special=False)
        whole = self.tok.encode(context + continuation, allow_special=False)
        if whole[: len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
            return [self.tok.bos_id, *ctx], self.tok.encode(continuation, allow_special=False)
        return [self.tok.bos_id, *ctx], whole[len(ctx):]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        return loglikelihood(self.model, [self.encode_pair(c, x) for c, x in pairs], self.max_len)

    def rolling(self, text: str) -> tuple[float, int]:
        """(sum of log p over the text's tokens, number of tokens)."""
        ids = self.tok.encode(text, allow_special=False)
        return loglikelihood_rolling(self.model, ids, self.tok.bos_id, self.max_len), len(ids)

    def _ids(self, prompt: Prompt, max_new: int) -> list[int]:
        ids = ([self.tok.bos_id, *self.tok.encode(prompt, allow_special=False)] if isinstance(prompt, str)
               else encode_prompt(prompt, self.tok))
        return ids[-(self.max_len - max_new):]

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams, seed: int | None = None,
                 desc: str = "") -> list[list[str]]:
        """n completions per prompt (sample j of prompt i seeded from seed, i, j: reproducible), batched."""
        ids = [self._ids(p, params.max_new_tokens) for p in prompts]
        out: list[list[str]] = []
        chunk = max(1, 4 * self.engine.max_batch // n)
        with tqdm(total=len(ids) * n, desc=desc, leave=False, disable=None) as bar:
            for a in range(0, len(ids), chunk):
                groups = self.engine.generate_groups(ids[a : a + chunk], n, params, seed=seed, first=a)
                out += [[r.text for r in g] for g in groups]
                bar.update(len(groups) * n)
        return out


class EndpointBackend:
    """An OpenAI-compatible server (nanoseek serve, vLLM, SGLang, ...): generation through /v1/completions (raw
    prompts) and /v1/chat/completions (chat prompts), log-likelihoods from echoed prompt log-probs; 8 requests in
    flight."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600,
                 concurrency: int = 8) -> None:
        self.url, self.name, self.timeout, self.concurrency = url.rstrip("/"), model, timeout, concurrency
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not self.url.endswith("/v1"):
            self.url += "/v1"

    def _scored(self, prompt: str, start: int, end: int) -> LogLik:
        """Log-probs of the prompt tokens that start in prompt[start:end], from an echo request (as lm-eval's
        local-completions asks: echo, logprobs 1, max_tokens 1, the generated token ignored)."""
        body = {"model": self.name, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                "temperature": 0.0}
        lp = self._post("/completions", body)["choices"][0].get("logprobs")
        if not lp or not lp.get("text_offset"):
            raise TaskError(f"{self.url}: no echo log-probs in the answer (the server needs echo + logprobs)")
        idx = [i for i, off in enumerate(lp["text_offset"]) if start <= off < end]
        if not idx or any(lp["token_logprobs"][i] is None for i in idx):
            raise TaskError(f"{self.url}: the echoed tokens do not cover the scored text {prompt[start:end]!r}")
        vals = [lp["token_logprobs"][i] for i in idx]
        greedy = all(v >= max(lp["top_logprobs"][i].values()) for v, i in zip(vals, idx, strict=True))
        return LogLik(sum(vals), greedy, len(idx))

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """log p(continuation | context) from the server's echoed prompt log-probs (text in, so any server's own
        tokenizer applies; trailing spaces of the context move to the continuation, as LocalBackend does)."""
        def one(pair: tuple[str, str]) -> LogLik:
            ctx, cont = split_pair(*pair)
            return self._scored(ctx + cont, len(ctx), len(ctx) + len(cont))

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, pairs))

    def rolling(self, text: str) -> tuple[float, int]:
        """Every token of `text` scored after the bos the server puts first (one request: the text must fit)."""
        r = self._scored(text, 0, len(text))
        return r.logprob, r.n_tokens

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise TaskError(f"{self.url}{path}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise TaskError(f"{self.url}{path}: {e}") from None

    def _one(self, prompt: Prompt, params: SamplingParams, seed: int | None) -> str:
        body: dict[str, Any] = {"model": self.name, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "stop": list(params.stop)[:4] or None}
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if seed is not None:
            body["seed"] = seed
        if isinstance(prompt, str):
            return self._post("/completions", {**body, "prompt": prompt})["choices"][0]["text"]
        return self._post("/chat/completions", {**body, "messages": prompt})["choices"][0]["message"]["content"]

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams, seed: int | None = None,
                 desc: str = "") -> list[list[str]]:
        jobs = [(p, None if seed is None else seed * 1_000_003 + i * n + j)
                for i, p in enumerate(prompts) for j in range(n)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(tqdm(pool.map(lambda job: self._one(job[0], params, job[1]), jobs), total=len(jobs),
                              desc=desc, leave=False, disable=None))
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


Backend = LocalBackend | EndpointBackend


# ---- one function per task kind ---------------------------------------------------------------------------------
def _choice(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    pairs = [(choice_prompt(r, task.shots), " " + o) for r in task.rows for o in r["options"]]
    lls = iter(backend.loglikelihood(pairs))
    hits = hits_norm = chance = 0.0
    samples = []
    for r in task.rows:
        lp = [next(lls).logprob for _ in r["options"]]
        norm = [x / len((" " + o).encode()) for x, o in zip(lp, r["options"], strict=True)]
        pred, pred_norm = max(range(len(lp)), key=lp.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        hits += pred == r["answer"]
        hits_norm += pred_norm == r["answer"]
        chance += 1 / len(lp)
        samples.append({"question": r["question"], "options": r["options"], "answer": r["answer"], "logprobs": lp,
                        "pred": pred, "pred_norm": pred_norm, "correct": pred == r["answer"],
                        "correct_norm": pred_norm == r["answer"]})
    n = len(task.rows)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "chance": chance / n, "n": n}, samples


def _generated(backend: Backend, task: Task, cfg: EvalConfig, prompts: list[Prompt], check, stop: Sequence[str],
               extra: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy pass@1 and (n_samples > 1) sampled pass@1 / pass@n; `check(i, text) -> (answer, verdict)`."""
    samples: list[dict[str, Any]] = []

    def judged(i: int, text: str, sample: str | int) -> bool:
        ans, ok = check(i, text)
        samples.append({"prompt": prompts[i], "output": text, "extracted": ans, "correct": ok, "sample": sample,
                        **extra[i]})
        return ok

    greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=tuple(stop))
    outs = backend.generate(prompts, 1, greedy, desc=f"{task.name} greedy")
    n = len(prompts)
    metrics: dict[str, float] = {"pass@1_greedy": sum(judged(i, text, "greedy") for i, (text,) in enumerate(outs)) / n,
                                 "n": n}
    if cfg.n_samples > 1:
        k = cfg.n_samples
        params = dataclasses.replace(greedy, temperature=cfg.temperature, top_p=cfg.top_p)
        outs = backend.generate(prompts, k, params, seed=cfg.seed, desc=f"{task.name} x{k}")
        c_per = [sum(judged(i, text, j) for j, text in enumerate(texts)) for i, texts in enumerate(outs)]
        metrics["pass@1"] = sum(pass_at_k(k, c, 1) for c in c_per) / n
        metrics[f"pass@{k}"] = sum(pass_at_k(k, c, k) for c in c_per) / n
    return metrics, samples


def _math(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from ..rl.rewards import is_equivalent

    def check(i: int, text: str) -> tuple[str | None, bool]:
        ans = extract_math_answer(text)
        return ans, ans is not None and is_equivalent(ans, task.rows[i]["answer"])

    prompts: list[Prompt] = [math_prompt(r, task.shots) for r in task.rows]
    return _generated(backend, task, cfg, prompts, check, MATH_STOP, [{"answer": r["answer"]} for r in task.rows])


def _problems(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """arithmetic / countdown: the GRPO held-out set, asked as a chat turn, scored by the GRPO task's rule."""
    from ..rl.grpo import score
    from ..rl.rewards import extract_answer
    from ..rl.tasks import heldout_set

    problems = heldout_set(task.name, cfg.limit or 200, **cfg.task_knobs)
    prompts: list[Prompt] = [[{"role": "user", "content": p.question}] for p in problems]

    def check(i: int, text: str) -> tuple[str | None, bool]:
        return extract_answer(text), bool(score(problems[i], text, 0.0)[1])

    metrics, samples = _generated(backend, task, cfg, prompts, check, (),
                                  [{"id": p.id, "answer": p.answer or p.target} for p in problems])
    metrics["chance"] = 0.0
    return metrics, samples


def check_code(row: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
    """HumanEval's verdict for prompt + completion: its `check(entry_point)` raises nothing, run in the sandbox."""
    from ..rl.sandbox import run_code

    res = run_code(row["prompt"] + completion, [f"{row['test']}\ncheck({row['entry_point']})"], timeout=timeout)
    return res.ran and res.total == 1 and res.passed == 1


def _code(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    def check(i: int, text: str) -> tuple[str | None, bool]:
        return None, check_code(task.rows[i], text)

    prompts: list[Prompt] = [r["prompt"] for r in task.rows]
    return _generated(backend, task, cfg, prompts, check, CODE_STOP, [{"task_id": r["task_id"]} for r in task.rows])


def _text(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    total = n_bytes = n_tok = 0
    samples = []
    for r in tqdm(task.rows, desc=f"{task.name} bpb", leave=False, disable=None):
        lp, nt = backend.rolling(r["text"])
        nb = len(r["text"].encode())
        total, n_bytes, n_tok = total + lp, n_bytes + nb, n_tok + nt
        samples.append({"bytes": nb, "tokens": nt, "logprob": lp, "bpb": bits_per_byte(lp, nb) if nb else None})
    return {"bpb": bits_per_byte(total, n_bytes), "token_perplexity": math.exp(-total / max(n_tok, 1)),
            "bytes": n_bytes, "tokens": n_tok, "n": len(task.rows)}, samples


def _passkey(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from .passkey import make_cases, summarize

    if not isinstance(backend, LocalBackend):
        raise TaskError("passkey counts prompt tokens with the model's tokenizer: it needs a local checkpoint")
    longest = max(cfg.passkey_lengths)
    if longest + 8 > backend.max_len:
        raise TaskError(f"passkey length {longest} + 8 new tokens exceeds the context ({backend.max_len}): "
                        f"raise --max-len (the model allows {backend.model.config.max_position_embeddings})")
    tok = backend.tok
    cases = make_cases(lambda s: 1 + len(tok.encode(s, allow_special=False)), cfg.passkey_lengths,
                       cfg.passkey_depths, cfg.passkey_trials, cfg.seed)
    greedy = [g[0] for g in backend.generate([c.prompt for c in cases], 1, SamplingParams(max_new_tokens=8),
                                             desc="passkey")]
    lls = backend.loglikelihood([(c.prompt, " " + k) for c in cases for k in (c.key, *c.distractors)])
    choice_ok = [lls[5 * i].logprob > max(r.logprob for r in lls[5 * i + 1 : 5 * i + 5]) for i in range(len(cases))]
    correct = [g.strip().startswith(c.key) for c, g in zip(cases, greedy, strict=True)]
    samples = [{"length": c.length, "depth": c.depth, "tokens": c.n_tokens, "key": c.key, "output": g,
                "correct": ok, "choice_correct": chosen}
               for c, g, ok, chosen in zip(cases, greedy, correct, choice_ok, strict=True)]
    return summarize(cases, correct, choice_ok), samples


def _fim(backend: Backend, task: Task, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from .fim import fim_exact_match

    if not isinstance(backend, LocalBackend):
        raise TaskError("fim builds prompts from the model's FIM tokens: it needs a local checkpoint")
    try:
        res = fim_exact_match(backend.model, backend.tok, [r["text"] for r in task.rows], n=len(task.rows),
                              seed=cfg.seed)
    except ValueError as e:
        raise TaskError(f"task {task.name}: {e}") from None
    return {"exact_match": res.exact_match, "n": res.n}, res.examples


KINDS = {"choice": _choice, "math": _math, "problems": _problems, "code": _code, "text": _text, "passkey": _passkey,
         "fim": _fim}
HEADLINE = {"choice": "acc", "math": "pass@1_greedy", "problems": "pass@1_greedy", "code": "pass@1_greedy",
            "text": "bpb", "passkey": "accuracy", "fim": "exact_match"}


def evaluate(backend: Backend, cfg: EvalConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run every task of `cfg`; write results.json / results.md / samples/*.jsonl under `out` when given."""
    tasks = [load_task(t, cfg.data_dir, cfg.fewshot, cfg.limit) for t in cfg.tasks]  # all errors before any work
    results: dict[str, Any] = {"model": backend.name, "config": dataclasses.asdict(cfg), "tasks": {}}
    all_samples = {}
    for task in tasks:
        t0 = time.time()
        metrics, samples = KINDS[task.kind](backend, task, cfg)
        metrics = {**metrics, "kind": task.kind, "fewshot": len(task.shots), "seconds": round(time.time() - t0, 2),
                   "file": task.path}
        results["tasks"][task.name] = metrics
        all_samples[task.name] = samples
    if out is not None:
        write_results(results, all_samples, Path(out))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    rows = ["| task | kind | n | metric | score | chance | seconds |", "|---|---|---|---|---|---|---|"]
    for name, m in results["tasks"].items():
        key = HEADLINE[m["kind"]]
        extra = [k for k in m if k.startswith("pass@") and k != key] + [k for k in ("acc_norm", "choice") if k in m]
        for metric in [key, *extra]:
            chance = m.get("chance")
            rows.append(f"| {name} | {m['kind']} | {m['n']} | {metric} | {m[metric]:.4f} | "
                        f"{'' if chance is None else f'{chance:.4f}'} | {m['seconds']:.1f} |")
    return "\n".join(rows) + "\n"


def write_results(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(f"# Evaluation of {results['model']}\n\n" + markdown_table(results))
    for name, rows in samples.items():
        with open(out / "samples" / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
    for name, m in results["tasks"].items():
        if "grid" in m:  # passkey: the heat-maps
            from .passkey import heatmap

            for key in ("accuracy", "choice"):
                heatmap(m["grid"], out / f"{name}_{key}.png", key, f"{results['model']}: passkey {key}")
