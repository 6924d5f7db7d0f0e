"""The inference engine: a KV cache with slots, chunked prefill, batched decode, sampling and MTP drafting.

    engine = Engine(model, tokenizer, max_batch=8)
    [req] = engine.generate([prompt_ids], SamplingParams(max_new_tokens=64))
    req.output_ids, req.text

Requests are admitted into free cache slots between steps (continuous batching): each `step()` runs one prefill
chunk for the requests still reading their prompt and one decode forward for all the others. With
`speculative=True` the first MTP module drafts one token per greedy request and the decode forward verifies it
(input [t, draft]): when the model's own choice equals the draft, two tokens come out of one forward.

Log-probabilities (`SamplingParams.logprobs` for the generated tokens, `prompt_logprobs` for the prompt's, read
during prefill; `max_new_tokens=0` with prompt_logprobs scores a prompt without generating) are those of the raw
model distribution, log_softmax of the logits before temperature, top-k and top-p, as vLLM reports by default.
`SamplingParams.routed_experts` records the experts each MoE layer ran every token through (`Request.routing()`),
which RL replays in its training forward (nanoseek.rl.grpo, rollout routing replay).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import Transformer
from ..model.moe import routing_hooks
from .cache import CacheBatch, KVCache
from .sampling import (  # noqa: F401 (sample_token, TokenLogprob: re-exported)
    Detokenizer,
    TokenLogprob,
    draw_uniform,
    sample_token,
    sample_tokens,
    token_logprobs,
)

log = logging.getLogger("nanoseek.engine")
MIN_TEMPERATURE = 1e-5  # below this (but above 0) logits / T overflows or is greedy in all but name
SEED_RANGE = (-(2**63), 2**63)  # a seed is a signed 64-bit integer, as in OpenAI's API
LOGPROB_ROWS = 256  # prompt log-probs: positions per log_softmax over the vocabulary (bounds the memory)


def int64_seed(seed: int) -> int:
    """`seed` wrapped into a signed 64-bit integer (two's complement: torch seeds a generator with x and with
    x - 2**64 alike, and any seed already in range is unchanged)."""
    return (seed + 2**63) % 2**64 - 2**63


@dataclass
class SamplingParams:
    """Decoding settings of one request. temperature 0 = greedy, else at least MIN_TEMPERATURE; top_k/top_p
    None = off; seed a signed 64-bit integer (None: a random one).

    logprobs: record every generated token's log-probability (`Request.logprobs`) with this many most likely
    alternatives (0: none); prompt_logprobs: the same for the prompt's tokens (`Request.prompt_logprobs`). Both are
    of the raw model distribution (before temperature / top-k / top-p); None = off. max_new_tokens 0 (only with
    prompt_logprobs) scores the prompt and generates nothing."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings (need the engine's tokenizer); the text is cut before them
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    routed_experts: bool = False  # record the experts every MoE layer ran each prompt / output token through

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or (self.max_new_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(f"max_new_tokens must be >= 1 (or 0 with prompt_logprobs: score the prompt only), got "
                             f"{self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if (v := getattr(self, name)) is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 (the number of alternatives per token) or None, got {v}")
        t = self.temperature
        if not (math.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be a signed 64-bit integer (-2**63 <= seed < 2**63), got {self.seed}")


@dataclass(eq=False)
class Request:
    """One generation. `output_ids` grows as the engine steps; `on_update(req)` is called (from the engine's
    thread) after every step that changed it. finish_reason: 'stop', 'length', 'cancelled' or 'error' (this
    request's own sampling, detokenising or admission raised; the others in the batch go on).

    With params.logprobs, `logprobs` holds one entry per generated token: those of output_ids, then the stop token
    that ended it, if one did (its log-probability is reported, its text is not). With params.prompt_logprobs,
    `prompt_logprobs` holds one per prompt token once the prompt is read (None for the first: nothing precedes
    it)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[[Request], None] | None = None
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text: str | None = None  # the stop string that ended it, if any
    text: str = ""  # decoded output (with a tokenizer), cut before a stop string
    created: float = field(default_factory=time.time)
    first_token_time: float | None = None
    drafted: int = 0
    accepted: int = 0
    cancelled: bool = False  # set from any thread; the engine frees the slot at its next step
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    routed_experts: list[torch.Tensor] = field(default_factory=list)  # params.routed_experts: see routing()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def routing(self) -> torch.Tensor:
        """With params.routed_experts: the experts [n, n_moe_layers, K] (int16) each main-model MoE layer routed the
        tokens the model read to, in position order: the prompt, then every output token but the last (which is
        sampled, never read). Rollout routing replay runs the trainer's forward with these."""
        if not self.params.routed_experts:
            raise ValueError("routing needs SamplingParams(routed_experts=True)")
        return torch.cat(self.routed_experts) if self.routed_experts else torch.zeros(0, 0, 0, dtype=torch.int16)

    def stable_text(self, holdback: Sequence[str] = ()) -> str:
        """The part of `text` that can be streamed now: without an incomplete UTF-8 tail and, while running,
        without a suffix that could still grow into a stop string."""
        t = self.text
        if self.finished:
            return t
        t = t.rstrip("\ufffd")
        k = stop_holdback(t, holdback)
        return t[: len(t) - k] if k else t


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of one of `stops` (what streaming must
    hold back). Looks only at the last `max(len(stop)) - 1` characters, and in them only where a stop's first
    character occurs: the work does not grow with the text."""
    longest = max((len(s) for s in stops), default=0)
    if longest < 2 or not text:
        return 0
    tail = text[-(longest - 1):]
    best = 0
    for s in stops:
        j = tail.find(s[0], max(len(tail) - len(s) + 1, 0)) if s else -1  # the longest candidate suffix first
        while j != -1 and len(tail) - j > best:
            if s.startswith(tail[j:]):
                best = len(tail) - j
                break
            j = tail.find(s[0], j + 1)
    return best


@dataclass
class _Slot:
    req: Request
    tokens: list[int]  # prompt + output; tokens[length] is the next input once the prompt is read
    length: int = 0  # positions written in the main cache
    mtp_length: int = 0  # positions written in the MTP module's cache
    pending_h: list[torch.Tensor] = field(default_factory=list)  # main hidden at positions [mtp_length, length)
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.req.prompt_ids)


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    decode_forwards: int = 0
    generated_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (not computed)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """The bound method over a copy of its code object: dynamo keeps compiled graphs per code object, so a copy
    starts an empty cache of its own (no other engine's graphs, none from before `model_changed`)."""
    f = method.__func__  # type: ignore[attr-defined]
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)  # type: ignore[attr-defined]


def _scalars_captured(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a torch.compile'd step) called with dynamo capturing `.item()` as graph integers, which a trace (the
    first call, or a recompilation) reads: a decode step's MoE indexes each token's experts' weights in place
    (moe.unrolled_experts) instead of breaking the graph there. Set per call, not for the whole process."""
    cfg = torch._dynamo.config

    def call(*args: Any) -> Any:
        old = cfg.capture_scalar_outputs
        cfg.capture_scalar_outputs = True
        try:
            return fn(*args)
        finally:
            cfg.capture_scalar_outputs = old

    return call


class Engine:
    """Continuous-batching generator over a model with a preallocated KV cache (see module docstring).

    cache: 'latent' (absorbed MLA, 576 values/token/layer at V3) or 'naive' (per-head K/V).
    Not thread-safe except `submit` and `Request.cancelled`: one thread calls `step`."""

    def __init__(
        self, model: Transformer, tokenizer: object | None = None, max_batch: int = 8, max_len: int | None = None,
        cache: str = "latent", prefill_chunk: int = 512, speculative: bool = False, compile: bool = False,
        prefix_cache: bool = False,
    ) -> None:
        if cache not in ("latent", "naive"):
            raise ValueError(f"cache must be 'latent' or 'naive', got {cache!r}")
        cfg = model.config
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs MTP weights (num_nextn_predict_layers >= 1)")
        self.model = model.eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or 4096, cfg.max_position_embeddings)  # default: 4096-token context
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        n_cache_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.cache = KVCache(cfg, max_batch, self.max_len, cache == "latent", n_cache_layers, self.dtype, self.device)
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else cfg.eos_token_id
        self.eos_ids: set[int] = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        self.slots: list[_Slot | None] = [None] * max_batch
        # prefix caching: a new request starts from the longest prefix of its prompt whose keys a slot holds (an
        # active one's tokens so far, or what a finished request left in a free one), reused in place or copied
        self.prefix_cache = prefix_cache
        self._resident: list[list[int]] = [[] for _ in range(max_batch)]  # a free slot's tokens with valid keys
        # ... and the experts they were routed to (Request.routed_experts chunks; None where not recorded), which a
        # request recording its routing copies with the keys
        self._resident_routing: list[list[torch.Tensor] | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.stats = EngineStats()
        self.compile = compile
        self.model_changed()

    def model_changed(self) -> None:
        """Compile the decode step anew at its next call (compile=True): call it after changing the model's modules
        (swapping one, adding hooks, installing an EPLB plan). Weights changed in place need no call.

        compile: plain decode steps run a torch.compile'd forward of fixed shape (all max_batch slots, one token,
        attention over the whole cache), gpt-fast style; the first steps pay the compilation (with the final norm and
        the head inside the graph; cpp_wrapper drops the Python launcher on the CPU). The compiled step does not
        check the model's modules at each call (dynamo's ~1,300 guards on them cost 0.5-1 ms a step, half of
        `tiny`'s), hence this method; each engine compiles its own copy of the step (its own cache of graphs)."""
        self._compiled = self._compiled_draft = None
        if not self.compile:
            return
        opts: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.device.type == "cpu":
            opts["cpp_wrapper"] = True
        self._compiled = _scalars_captured(torch.compile(_own_code(self._static_decode), dynamic=False, options=opts))
        # speculative: the verify step ([t, draft]: 2 tokens) is a second static shape of the same function; the
        # MTP draft over the last 1-2 positions its own graph
        if self.speculative:
            self._compiled_draft = _scalars_captured(
                torch.compile(_own_code(self._static_draft), dynamic=False, options=opts))

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request (thread-safe). Raises ValueError if the prompt cannot fit the context."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.max_len or (len(prompt) == self.max_len and params.max_new_tokens > 0):
            raise ValueError(f"prompt has {len(prompt)} tokens; the context holds {self.max_len}")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        req = Request(prompt, params, on_update, id=next(self._ids))
        with self._lock:
            self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Request]:
        """Run prompts to completion, batched (at most max_batch at a time)."""
        reqs = [self.submit(p, params) for p in prompts]
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def generate_groups(self, prompts: Sequence[Sequence[int]], k: int, params: SamplingParams,
                        seed: int | None = None, first: int = 0) -> list[list[Request]]:
        """k samples of every prompt, all batched together (e.g. GRPO groups, rejection sampling); sample j of
        prompt i is seeded `seed * 1_000_003 + (first + i) * k + j` (reproducible; `first`: the index of prompts[0]
        in a larger set shared out between processes), or left unseeded when seed is None. With prefix caching
        each prompt is read once: the other k - 1 samples start from the first one's keys (and recorded routing)."""
        def seeded(i: int, j: int) -> SamplingParams:
            return dataclasses.replace(params, seed=None if seed is None else
                                       int64_seed(seed * 1_000_003 + (first + i) * k + j))

        if not self.prefix_cache or k == 1:
            reqs = [[self.submit(p, seeded(i, j)) for j in range(k)] for i, p in enumerate(prompts)]
        else:  # one prefill per group: the first sample reads the prompt, the others then start from its keys
            firsts = [self.submit(p, seeded(i, 0)) for i, p in enumerate(prompts)]

            def read(r: Request) -> bool:
                s = next((s for s in self.slots if s is not None and s.req is r), None)
                return r.finished or (s is not None and not s.prefilling)

            while not all(read(r) for r in firsts):
                self.step()
            reqs = [[r, *(self.submit(p, seeded(i, j)) for j in range(1, k))]
                    for i, (p, r) in enumerate(zip(prompts, firsts, strict=True))]
        while not all(r.finished for row in reqs for r in row):
            self.step()
        return reqs

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Generate one prompt, yielding token ids as they are accepted (stop tokens excluded)."""
        req = self.submit(prompt, params)
        sent = 0
        while not req.finished:
            self.step()
            yield from req.output_ids[sent:]
            sent = len(req.output_ids)
        yield from req.output_ids[sent:]

    @torch.inference_mode()
    def score(self, tokens: Sequence[int], chunk: int = 1) -> torch.Tensor:
        """Logits [len(tokens), V] (fp32) for every position, computed through the cache `chunk` tokens per
        forward (chunk=1: token-by-token decode). Uses a free slot and releases it; no sampling."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            raise RuntimeError("no free slot")
        if not 0 < len(tokens) <= self.max_len:
            raise ValueError(f"need 1..{self.max_len} tokens, got {len(tokens)}")
        i = free[0]
        self.slots[i] = slot = _Slot(Request(list(tokens), SamplingParams()), list(tokens))
        try:
            out = []
            for a in range(0, len(tokens), chunk):
                piece = list(tokens[a : a + chunk])
                out.append(self._logits(self._main([i], [piece])[0, : len(piece)]))
                slot.length += len(piece)
            return torch.cat(out)
        finally:
            self.slots[i] = None
            self._resident[i] = []

    # ---- one scheduling step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, run one prefill chunk for those reading their prompt, one decode forward for
        the rest, and notify every request that changed."""
        self._admit()
        changed: set[int] = set()
        for i, s in enumerate(self.slots):
            if s is not None and s.req.cancelled:
                s.req.finish_reason = "cancelled"
                changed.add(i)
        self._release(changed)
        changed.clear()
        active = [i for i, s in enumerate(self.slots) if s is not None]
        pre = [i for i in active if self.slots[i].prefilling]  # type: ignore[union-attr]
        dec = [i for i in active if i not in pre]
        if pre:
            self._prefill(pre)
            changed.update(i for i in pre if not self.slots[i].prefilling)  # type: ignore[union-attr]
        if dec:
            self._decode(dec)
            changed.update(dec)
        self._release(changed)

    def abort_all(self, reason: str = "cancelled") -> list[Request]:
        """End every waiting and running request with `reason` (e.g. after a failed step); returns them.
        Callers notify the requests themselves."""
        with self._lock:
            reqs = list(self.waiting)
            self.waiting.clear()
        reqs += [s.req for s in self.slots if s is not None]
        self.slots = [None] * self.max_batch
        self.forget_prefixes()
        for r in reqs:
            r.finish_reason = r.finish_reason or reason
        return reqs

    def _admit(self) -> None:
        with self._lock:
            dropped = [r for r in self.waiting if r.cancelled]
            for req in dropped:
                self.waiting.remove(req)
                req.finish_reason = "cancelled"
            for i in range(self.max_batch):
                while self.slots[i] is None and self.waiting:
                    req = self.waiting.popleft()
                    try:
                        slot = self._new_slot(req)
                        self.slots[self._place(slot, i)] = slot
                    except Exception:  # e.g. a seed torch refuses: this request fails, the others are admitted
                        log.exception("request %d could not be admitted", req.id)
                        req.finish_reason = "error"
                        dropped.append(req)
        for req in dropped:  # outside the lock: a callback may submit
            self._notify(req)

    def _new_slot(self, req: Request) -> _Slot:
        g = torch.Generator(device="cpu")
        g.manual_seed(req.params.seed if req.params.seed is not None else int(torch.randint(2**62, ())))
        detok = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        return _Slot(req, list(req.prompt_ids), generator=g, detok=detok)

    def _place(self, s: _Slot, free: int) -> int:
        """The slot for `s`: `free`, or with prefix caching one already holding the longest prefix of its prompt;
        s then starts after that prefix, keeping at least the prompt's last token to read. The prefix is copied
        when an active slot holds it, or a free slot that holds more than it (kept for later requests: the copy
        goes to the free slot holding the least); else that free slot is reused in place. A request recording its
        routing starts only from a holder that recorded it too, and takes the holder's experts for the prefix
        with its keys (they are one computation: the routing is what the request would have recorded reading the
        prefix itself). Not for requests that need every prompt position computed (prompt log-probs) nor with
        speculative decoding (the MTP module's cache would need its own prefix)."""
        p = s.req.params
        if not self.prefix_cache or self.speculative or p.prompt_logprobs is not None:
            return free
        prompt = s.req.prompt_ids
        best, best_n = free, 0
        for j in range(self.max_batch):
            held, routing = self._held(j)
            if p.routed_experts and routing is None:  # the prefix's routing is unknown: read it
                continue
            other = self.slots[j]
            n = 0
            for a, b in zip(prompt[: len(prompt) - 1], held, strict=False):  # (its last token is read anyway)
                if a != b:
                    break
                n += 1
            if n > best_n or (n == best_n and n and other is None and self.slots[best] is not None):
                best, best_n = j, n
        if best_n == 0:
            return free
        if self.slots[best] is None and len(self._resident[best]) > best_n:  # a free slot holding more: keep it
            others = [j for j, o in enumerate(self.slots) if o is None and j != best]
            if others:  # (and write into the free slot holding the least)
                free = min(others, key=lambda j: len(self._resident[j]))
            else:
                free = best
        if p.routed_experts and (chunks := self._held(best)[1]):  # (none: the model has no MoE layer)
            s.req.routed_experts.append(torch.cat(chunks)[:best_n].clone())
        if best != free:  # copy the prefix's keys into the slot the request gets
            for bufs in self.cache.buffers:
                for t in bufs:
                    t[free, :best_n] = t[best, :best_n]
            best = free
        s.length = best_n
        self.stats.prefix_hit_tokens += best_n
        return best

    def _held(self, j: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """The tokens whose keys slot j holds (a running request's so far, or what a finished one left in a free
        slot) and the experts they were routed to (Request.routed_experts chunks; None: not recorded)."""
        s = self.slots[j]
        return (self._resident[j], self._resident_routing[j]) if s is None else self._held_by(s)

    @staticmethod
    def _held_by(s: _Slot) -> tuple[list[int], list[torch.Tensor] | None]:
        """`_held` of an occupied slot: its first `length` tokens (their routing covers exactly those)."""
        return s.tokens[: s.length], (s.req.routed_experts if s.req.params.routed_experts else None)

    def forget_prefixes(self) -> None:
        """Drop what free slots hold for prefix caching: call when the model's weights change (their keys and
        routing were computed with the old ones), e.g. between RL steps."""
        self._resident = [[] for _ in range(self.max_batch)]
        self._resident_routing = [None] * self.max_batch

    def _release(self, changed: set[int]) -> None:
        for i in sorted(changed):
            s = self.slots[i]
            if s is None:
                continue
            if s.req.finished:
                self.slots[i] = None
                self._resident[i], self._resident_routing[i] = self._held_by(s)
            self._notify(s.req)

    def _notify(self, req: Request) -> None:
        if req.on_update is None:
            return
        try:
            req.on_update(req)
        except Exception:  # the listener's bug: drop its request, not the batch
            log.exception("the update callback of request %d raised; cancelling it", req.id)
            req.cancelled = True

    def _fail(self, s: _Slot, what: str) -> None:
        """End one request with finish_reason 'error' (its slot is released with the step's changes)."""
        log.exception("request %d failed while %s; the other requests go on", s.req.id, what)
        s.req.finish_reason = "error"

    # ---- forwards: everything goes through model(ids, positions, cache), model.logits, model.mtp_forward ----
    def _batch(self, slots: list[int], starts: list[int], lengths: list[int]) -> CacheBatch:
        S = max(lengths)
        pos = [[*range(st, st + n), *[self.max_len] * (S - n)]  # padding -> scratch position
               for st, n in zip(starts, lengths, strict=True)]
        return self.cache.batch(slots, torch.tensor(pos, device=self.device),
                                max(st + n for st, n in zip(starts, lengths, strict=True)))

    def _token_ids(self, inputs: list[list[int]]) -> torch.Tensor:
        """Right-padded token ids [b, max len]."""
        S = max(len(t) for t in inputs)
        return torch.tensor([[*t, *[0] * (S - len(t))] for t in inputs], device=self.device)

    def _main(self, slots: list[int], inputs: list[list[int]]) -> torch.Tensor:
        """Run the main model on new tokens per slot (positions from each slot's length); returns the hidden
        states before the final norm [b, S, H] (padding rows hold garbage)."""
        batch = self._batch(slots, [self.slots[i].length for i in slots], [len(t) for t in inputs])  # type: ignore[union-attr]
        return self.model(self._token_ids(inputs), batch.positions, batch, return_logits=False).hidden

    def _static_decode(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every slot (ids/pos [max_batch, 1]; idle slots write to the scratch position): hidden
        states and logits."""
        batch = self.cache.batch(list(range(self.max_batch)), pos, self.max_len + 1)
        h = self.model(ids, pos, batch, return_logits=False).hidden
        return h, self._logits(h)

    def _decode_forward(self, rows: list[int], inputs: list[list[int]], eager: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [b, S, H] and logits [b, S, V] of a decode step (S = 1, or 2 with a draft); `eager`: not
        the compiled forward (routing is being recorded)."""
        S = max(len(t) for t in inputs)
        if self._compiled is None or S > 2 or eager:
            h = self._main(rows, inputs)
            return h, self._logits(h[:, :S])
        # built as Python lists, one tensor each (per-row tensor writes cost more than the compiled step at tiny)
        ids_l = [[0] * S for _ in range(self.max_batch)]
        pos_l = [[self.max_len] * S for _ in range(self.max_batch)]  # padding -> scratch position
        for r, t in zip(rows, inputs, strict=True):
            start = self.slots[r].length  # type: ignore[union-attr]
            ids_l[r][: len(t)] = t
            pos_l[r][: len(t)] = range(start, start + len(t))
        ids, pos = torch.tensor(ids_l, device=self.device), torch.tensor(pos_l, device=self.device)
        h, logits = self._compiled(ids, pos)
        if len(rows) == self.max_batch and rows == list(range(self.max_batch)):
            return h, logits
        return h[rows], logits[rows]

    def _mtp_draft(self, h_prev: torch.Tensor, ids: torch.Tensor, batch: CacheBatch,
                   last: torch.Tensor) -> torch.Tensor:
        """MTP module 1 over [b, S] positions; fp32 logits [b, V] at each row's position `last`."""
        h, _ = self.model.mtp_forward(1, h_prev, ids, batch.positions, batch)
        hl = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1])).squeeze(1)
        return self.model.logits(hl, k=1).float()

    def _static_draft(self, h_prev: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                      last: torch.Tensor) -> torch.Tensor:
        """The draft over all max_batch slots (padding at the scratch position): a fixed shape for compile."""
        return self._mtp_draft(h_prev, ids, self.cache.batch(list(range(self.max_batch)), pos, self.max_len + 1),
                               last)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h).float()

    @contextmanager
    def _routing(self, slots: list[_Slot]) -> Iterator[Callable[[int, int], torch.Tensor] | None]:
        """Around one main-model forward over `slots`' rows: when a request asked for its routing
        (params.routed_experts), yields `take(r, n)`, the experts [n, n_moe_layers, K] that row r's first n tokens
        were routed to (read after the forward); else None."""
        gates = self.model.moe_gates()[: self.cfg.n_moe_layers]
        if not gates or not any(s.req.params.routed_experts for s in slots):
            yield None
            return
        with routing_hooks(gates, record=True) as logs:

            got: list[torch.Tensor] = []

            def take(r: int, n: int) -> torch.Tensor:
                if not got:  # [b, S, layers, K], one host transfer per forward
                    got.append(torch.stack([log[0] for log in logs], dim=1).view(len(slots), -1, len(logs),
                                                                                 logs[0][0].shape[-1])
                               .to(torch.int16).cpu())
                return got[0][r, :n].clone()

            yield take

    def _prefill(self, rows: list[int]) -> None:
        slots: list[_Slot] = [self.slots[i] for i in rows]  # type: ignore[misc]
        inputs = [s.tokens[s.length : min(s.length + self.prefill_chunk, len(s.req.prompt_ids))] for s in slots]
        with self._routing(slots) as take:
            h = self._main(rows, inputs)
        self.stats.prefill_tokens += sum(len(t) for t in inputs)
        done = []
        for r, (s, t) in enumerate(zip(slots, inputs, strict=True)):
            if take is not None and s.req.params.routed_experts:
                s.req.routed_experts.append(take(r, len(t)))
            if s.req.params.prompt_logprobs is not None:
                self._prompt_logprobs(s, h[r, : len(t)])
            s.length += len(t)
            if self.speculative:
                s.pending_h.append(h[r, : len(t)])
            if not s.prefilling:
                done.append(r)
        for r in done:
            if slots[r].req.params.max_new_tokens == 0:  # scored: nothing to generate
                slots[r].req.finish_reason = "length"
        done = [r for r in done if not slots[r].req.finished]
        if done:
            last = torch.stack([h[r, len(inputs[r]) - 1] for r in done])
            finished = [slots[r] for r in done]
            logits = self._logits(last)
            ys = self._sample(finished, logits)
            for s, y, lp in zip(finished, ys, self._token_logprobs(finished, logits, ys), strict=True):
                if y is not None:  # None: its sampling raised and it failed
                    self._accept(s, [y], [lp])

    def _prompt_logprobs(self, s: _Slot, h: torch.Tensor) -> None:
        """Record the prompt log-probs of one prefill chunk: h [n, H] holds the hidden states of positions
        s.length .. s.length + n - 1, and position p gives the log-prob of prompt token p + 1."""
        req, start = s.req, s.length
        if start == 0:
            req.prompt_logprobs = [None]
        n = min(len(h), len(req.prompt_ids) - 1 - start)  # the last prompt position predicts a generated token
        top = req.params.prompt_logprobs or 0
        for a in range(0, n, LOGPROB_ROWS):
            b = min(a + LOGPROB_ROWS, n)
            targets = req.prompt_ids[start + a + 1 : start + b + 1]
            req.prompt_logprobs += token_logprobs(self._logits(h[a:b]), targets, [top] * len(targets))

    def _token_logprobs(self, slots: list[_Slot], logits: torch.Tensor, tokens: Sequence[int | None]
                        ) -> list[TokenLogprob | None]:
        """The log-probs of the chosen tokens (None where the row failed) for the requests that asked for them
        (None for the others); logits [b, V]."""
        out: list[TokenLogprob | None] = [None] * len(slots)
        rows = [r for r, (s, t) in enumerate(zip(slots, tokens, strict=True))
                if t is not None and s.req.params.logprobs is not None]
        if rows:
            got = token_logprobs(logits[rows], [tokens[r] for r in rows],  # type: ignore[misc]
                                 [slots[r].req.params.logprobs for r in rows])  # type: ignore[misc]
            for r, lp in zip(rows, got, strict=True):
                out[r] = lp
        return out

    def _decode(self, rows: list[int]) -> None:
        slots: list[_Slot] = [self.slots[i] for i in rows]  # type: ignore[misc]
        drafts = self._draft(rows) if self.speculative else [None] * len(rows)
        inputs = [[s.tokens[s.length]] + ([d] if d is not None else []) for s, d in zip(slots, drafts, strict=True)]
        with self._routing(slots) as take:
            h, logits = self._decode_forward(rows, inputs, eager=take is not None)
        self.stats.decode_forwards += 1
        first = self._sample(slots, logits[:, 0])
        first_lp = self._token_logprobs(slots, logits[:, 0], first)
        # drafts go to greedy rows only, so the token after an accepted draft is the argmax at its position
        second = logits[:, 1].argmax(-1).tolist() if logits.shape[1] > 1 else [None] * len(rows)
        hit = [f is not None and d is not None and f == d for f, d in zip(first, drafts, strict=True)]
        second_lp = self._token_logprobs(slots, logits[:, -1], [y if ok else None
                                                                for y, ok in zip(second, hit, strict=True)])
        for r, (s, d) in enumerate(zip(slots, drafts, strict=True)):
            if first[r] is None:  # its sampling raised and it failed
                continue
            new: list[int] = [first[r]]  # type: ignore[list-item]
            lps = [first_lp[r]]
            n_in = 1
            if d is not None:
                s.req.drafted += 1
                self.stats.drafted += 1
                if hit[r]:  # the draft is what the model would have produced: its logits give one more
                    s.req.accepted += 1
                    self.stats.accepted += 1
                    new.append(second[r])
                    lps.append(second_lp[r])
                    n_in = 2
            s.length += n_in
            if take is not None and s.req.params.routed_experts:
                s.req.routed_experts.append(take(r, n_in))
            if self.speculative:
                s.pending_h.append(h[r, :n_in])
            self._accept(s, new, lps)

    def _draft(self, rows: list[int]) -> list[int | None]:
        """MTP module 1 catches up on the positions the main model has written (input at position j: the main
        hidden h_j and the token t_{j+1}) and drafts t_{length+1} for greedy rows that have room."""
        slots: list[_Slot] = [self.slots[i] for i in rows]  # type: ignore[misc]
        hs = [torch.cat(s.pending_h) for s in slots]
        nxt = [s.tokens[s.mtp_length + 1 : s.length + 1] for s in slots]
        lengths = [len(t) for t in nxt]
        if self._compiled_draft is not None and max(lengths) <= 2:  # steady state: 1-2 new positions per row
            S = max(lengths)
            h_prev = torch.zeros(self.max_batch, S, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            ids = torch.zeros(self.max_batch, S, dtype=torch.long)
            pos = torch.full((self.max_batch, S), self.max_len, dtype=torch.long)
            last = torch.zeros(self.max_batch, dtype=torch.long)
            for r, s, hh, t in zip(rows, slots, hs, nxt, strict=True):
                h_prev[r, : len(hh)] = hh
                ids[r, : len(t)] = torch.tensor(t)
                pos[r, : len(t)] = torch.arange(s.mtp_length, s.mtp_length + len(t))
                last[r] = len(t) - 1
            logits = self._compiled_draft(h_prev, ids.to(self.device), pos.to(self.device), last.to(self.device))
            logits = logits[rows]
        else:
            batch = self._batch(rows, [s.mtp_length for s in slots], lengths)
            h_prev = torch.zeros(len(rows), max(lengths), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            for r, hh in enumerate(hs):
                h_prev[r, : len(hh)] = hh
            last = torch.tensor([n - 1 for n in lengths], device=self.device)
            logits = self._mtp_draft(h_prev, self._token_ids(nxt), batch, last)
        out: list[int | None] = []
        for s, y in zip(slots, logits.argmax(-1).tolist(), strict=True):
            s.mtp_length = s.length
            s.pending_h = []
            greedy = s.req.params.temperature <= 0
            room = s.length + 2 <= self.max_len and len(s.req.output_ids) + 1 < s.req.params.max_new_tokens
            out.append(y if greedy and room else None)
        return out

    # ---- sampling and stopping ------------------------------------------------------------------
    def _sample(self, slots: list[_Slot], logits: torch.Tensor) -> list[int | None]:
        """One token per slot from logits [b, V], sampled together on the device; one host transfer. If that
        raises, the rows are sampled again one at a time with the same uniform draws: a row that raises alone
        fails its request (None), and the others get the token they would have got anyway."""
        ps = [s.req.params for s in slots]
        temps, ks, tops = [p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps]
        u: list[float] = []
        failed: set[int] = set()
        for r, s in enumerate(slots):
            try:
                u.append(draw_uniform(temps[r], s.generator))
            except Exception:
                self._fail(s, "sampling")
                failed.add(r)
                u.append(0.0)
        if not failed:
            try:
                return sample_tokens(logits, temps, ks, tops, uniforms=u).tolist()
            except Exception:
                log.exception("sampling a batch of %d raised; sampling its rows one at a time", len(slots))
        out: list[int | None] = []
        for r, s in enumerate(slots):
            try:
                y = None if r in failed else int(sample_tokens(logits[r : r + 1], temps[r : r + 1], ks[r : r + 1],
                                                               tops[r : r + 1], uniforms=u[r : r + 1])[0])
            except Exception:
                self._fail(s, "sampling")
                y = None
            out.append(y)
        return out

    def _accept(self, s: _Slot, new: list[int], lps: Sequence[TokenLogprob | None] = ()) -> None:
        """`_extend` the request; if that raises (its detokenising, say), only this request fails."""
        try:
            self._extend(s, new, lps)
        except Exception:
            self._fail(s, "detokenising")

    def _extend(self, s: _Slot, new: list[int], lps: Sequence[TokenLogprob | None] = ()) -> None:
        """Append sampled tokens up to a stop token / the limits (and their log-probs `lps`, where recorded, the
        stop token's included); update the text; finish_reason is set last, so a reader that sees the request
        finished also sees its final text."""
        req, p = s.req, s.req.params
        if req.first_token_time is None:
            req.first_token_time = time.time()
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        reason = None
        for k, t in enumerate(new):
            if k < len(lps) and (lp := lps[k]) is not None:
                req.logprobs.append(lp)
            if t in stops:
                reason = "stop"
                break
            req.output_ids.append(t)
            s.tokens.append(t)
            self.stats.generated_tokens += 1
            if len(req.output_ids) >= p.max_new_tokens or len(s.tokens) >= self.max_len:
                reason = "length"
                break
        if s.detok is not None:
            seen = len(req.text)
            s.detok.update(req.output_ids)
            text = s.detok.finish(req.output_ids) if reason is not None else s.detok.text
            # a stop string can only newly appear in the new characters (plus the overlap of its own length)
            hits = [(at, stop) for stop in p.stop if stop and (at := text.find(stop, max(0, seen - len(stop)))) >= 0]
            if hits:
                at, req.stop_text = min(hits)
                text, reason = text[:at], "stop"
            req.text = text
        if reason is not None:
            req.finish_reason = reason
