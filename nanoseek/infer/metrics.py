"""The server's metrics in the Prometheus text format (version 0.0.4), as `GET /metrics` serves them.

    metrics = ServerMetrics(engine)                    # build_app makes one: app.state.metrics
    on_update = metrics.track(on_update)               # per engine request: tokens, time to first token, finish
    metrics.count_prompt(len(prompt_ids))              # once per HTTP request (its n choices share the prompt)
    text = metrics.render(runner)                      # the exposition text

What is there (modelled on vLLM's `vllm:` metrics):
  nanoseek_requests_total{endpoint,status}           HTTP requests to the generation routes, by HTTP status
  nanoseek_request_finished_total{finish_reason}     engine requests (one per choice) ended: stop, length,
                                                     cancelled (client gone or stopped), error
  nanoseek_requests_running / _waiting               engine requests holding a cache slot / queued for one
  nanoseek_prompt_tokens_total, _generation_tokens_total   as the responses' `usage` counts them
  nanoseek_generation_tokens_per_second              tokens generated in the last THROUGHPUT_WINDOW_S, per second
  nanoseek_time_to_first_token_seconds               histogram, from the engine's admission queue to token 1
  nanoseek_time_per_output_token_seconds             histogram, between later tokens (one sample per token)
  nanoseek_e2e_request_latency_seconds               histogram, queue to finish
  nanoseek_kv_cache_usage_ratio                      cache slots in use / slots (the cache is preallocated per
                                                     slot, so this is what admission waits on)
  nanoseek_kv_cache_tokens_usage_ratio               positions written / (slots * context length)
  nanoseek_spec_decode_{draft,accepted}_tokens_total MTP drafts and accepted ones (V3 §2.2; §5.4.3: 85-90%)
  nanoseek_expert_load_total{layer,expert}           tokens routed to each routed expert of each MoE layer

The expert load is what the auxiliary-loss-free balancing watches (V3 §2.1.2: the bias b_i of an overloaded
expert goes down): `ExpertLoad` counts each token's top-K choice from forward hooks on the main model's routers,
leaving the model's computation as it is, and skips the padding rows of the engine's batches (positions at the
engine's scratch position), so a layer's loads sum to top_K * the tokens the model read. The MTP module's router
is not counted (its forwards only draft).

Written by hand rather than with prometheus_client: a dozen metrics and one text format do not need a dependency.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..model.moe import MoE
from .engine import Engine, Request
from .runner import EngineRunner

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THROUGHPUT_WINDOW_S = 10.0
# latency buckets (seconds): vLLM's for time to first token, fine below 100 ms for tokens per step
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")  # what nanoseek_requests_total counts


# ---- the text format ------------------------------------------------------------------------------------------
def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_label_value(str(v))}"' for n, v in zip(names, values, strict=True)) + "}"


def _family(name: str, kind: str, help: str, samples: list[str]) -> str:
    help = help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help}\n# TYPE {name} {kind}\n" + "".join(s + "\n" for s in samples)


class Counter:
    """A counter per label values (thread-safe through the owner's lock)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> str:
        return _family(self.name, "counter", self.help, [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
                                                         for k, v in self.values.items()])


class Histogram:
    """Cumulative buckets (`le`), `_sum` and `_count`, as Prometheus histograms are exposed."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` (e.g. every token of a step that produced several)."""
        i = next(i for i, b in enumerate(self.bounds) if value <= b)
        self.counts[i] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> str:
        samples, total = [], 0
        for b, c in zip(self.bounds, self.counts, strict=True):
            total += c
            le = "+Inf" if math.isinf(b) else repr(float(b))  # as prometheus_client writes bounds: 1.0, not 1
            samples.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        samples += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {total}"]
        return _family(self.name, "histogram", self.help, samples)


def gauge(name: str, help: str, value: float) -> str:
    return _family(name, "gauge", help, [f"{name} {_num(value)}"])


# ---- expert load ----------------------------------------------------------------------------------------------
class ExpertLoad:
    """Tokens routed to each routed expert of the main model's MoE layers, counted on the model's device by
    forward hooks (a pre-hook on the model notes which rows are real tokens, one on every router counts their
    top-K choices). `padding_position`: the position the engine gives padding rows (`Engine.max_len`, its scratch
    position); None counts every row."""

    def __init__(self, model: torch.nn.Module, padding_position: int | None = None, attach: bool = True) -> None:
        blocks = list(model.model.layers)  # type: ignore[union-attr]
        self.layers = [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoE)]
        n_experts = model.config.n_routed_experts  # type: ignore[union-attr]
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(self.layers), n_experts, dtype=torch.long, device=device)
        self.padding_position = padding_position
        self._real: torch.Tensor | None = None  # [B*S] 1 for a real token, 0 for padding, of the running forward
        self._model, self._gates = model, [blocks[i].mlp.gate for i in self.layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if attach:
            self.attach()

    def attach(self) -> None:
        """Start counting (again, after `remove`)."""
        if not self._handles:
            self._handles = [self._model.register_forward_pre_hook(self._note_rows, with_kwargs=True),
                             self._model.register_forward_hook(self._forget_rows)]
            self._handles += [g.register_forward_hook(self._counter(row)) for row, g in enumerate(self._gates)]

    def _note_rows(self, _: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        pos = args[1] if len(args) > 1 else kwargs.get("positions")
        if self.padding_position is None or pos is None:
            self._real = None
        else:
            self._real = (pos < self.padding_position).expand(ids.shape).reshape(-1).long()

    def _forget_rows(self, *_: Any) -> None:
        self._real = None

    def _counter(self, row: int) -> Callable[..., None]:
        def count(_: torch.nn.Module, __: tuple, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
            idx = out[1]  # [tokens, K] the chosen experts (Gate.forward: weights, indices, scores)
            real = self._real
            if real is None or real.numel() != idx.shape[0]:  # called outside the model's forward: count all
                weight = torch.ones_like(idx)
            else:
                weight = real[:, None].expand_as(idx)
            self.counts[row].scatter_add_(0, idx.reshape(-1), weight.reshape(-1))
        return count

    def snapshot(self) -> torch.Tensor:
        """A copy of the counts so far [MoE layers, experts] on the CPU (row r is main layer `layers[r]`)."""
        return self.counts.to("cpu", copy=True)

    def remove(self) -> None:
        """Stop counting: the model runs without the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---- the server's metrics -------------------------------------------------------------------------------------
class ServerMetrics:
    """Everything `GET /metrics` shows. Updated from the engine thread (`track`'s callback) and the event loop
    (`count_prompt`, `count_http`); `render` reads the engine's load at scrape time."""

    def __init__(self, engine: Engine, expert_load: bool = True) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self.http = Counter("nanoseek_requests_total", "HTTP requests to the generation routes, by HTTP status.",
                            ("endpoint", "status"))
        self.finished = Counter("nanoseek_request_finished_total",
                                "Engine requests (one per choice) that ended, by finish reason.", ("finish_reason",))
        self.prompt_tokens = Counter("nanoseek_prompt_tokens_total", "Prompt tokens of the requests received.")
        self.generation_tokens = Counter("nanoseek_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "Time from the engine's queue to a request's first token.", TTFT_BUCKETS)
        self.tpot = Histogram("nanoseek_time_per_output_token_seconds",
                              "Time per generated token after the first (one observation per token).", TPOT_BUCKETS)
        self.e2e = Histogram("nanoseek_e2e_request_latency_seconds",
                             "Time from the engine's queue to a request's end.", E2E_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last THROUGHPUT_WINDOW_S
        # attached while the server runs (build_app's lifespan)
        self.expert_load = ExpertLoad(engine.model, engine.max_len, attach=False) if expert_load else None

    # ---- updates ------------------------------------------------------------------------------
    def count_http(self, path: str, status: int) -> None:
        if path in ENDPOINTS:
            with self._lock:
                self.http.inc(1, path, str(status))

    def count_prompt(self, n_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens.inc(n_tokens)

    def track(self, on_update: Callable[[Request], None] | None = None) -> Callable[[Request], None]:
        """An engine callback (engine thread) that records the request's progress, then calls `on_update`."""
        seen = 0  # output tokens counted
        last = 0.0  # when the last of them came
        first_seen = False

        def update(req: Request) -> None:
            nonlocal seen, last, first_seen
            now = time.time()
            n = len(req.output_ids)
            with self._lock:
                if not first_seen and req.first_token_time is not None:  # a stop token first counts too
                    first_seen = True
                    self.ttft.observe(max(req.first_token_time - req.created, 0.0))
                if n > seen:
                    # the tokens after the first; those of one step (an accepted MTP draft) share its time
                    later, since = (n - 1, req.first_token_time or now) if seen == 0 else (n - seen, last)
                    if later:
                        self.tpot.observe(max(now - since, 0.0) / later, later)
                    self.generation_tokens.inc(n - seen)
                    self._recent.append((now, n - seen))
                    seen, last = n, now
                if req.finish_reason is not None:
                    self.finished.inc(1, req.finish_reason)
                    self.e2e.observe(max(now - req.created, 0.0))
            if on_update is not None:
                on_update(req)

        return update

    # ---- the exposition -----------------------------------------------------------------------
    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def render(self, runner: EngineRunner) -> str:
        """The Prometheus text of every metric (reads the expert counts from the device: call off the event
        loop)."""
        eng = self.engine
        running, waiting = runner.load()
        slots = [s for s in list(getattr(eng, "slots", [])) if s is not None]
        positions = sum(s.length for s in slots)
        rate = self.tokens_per_second()
        with self._lock:
            parts = [c.render() for c in (self.http, self.finished, self.prompt_tokens, self.generation_tokens)]
            parts += [h.render() for h in (self.ttft, self.tpot, self.e2e)]
        parts += [
            gauge("nanoseek_requests_running", "Engine requests holding a cache slot.", running),
            gauge("nanoseek_requests_waiting", "Engine requests queued for a cache slot.", waiting),
            gauge("nanoseek_generation_tokens_per_second",
                  f"Tokens generated in the last {THROUGHPUT_WINDOW_S:g} s, per second.", rate),
            gauge("nanoseek_kv_cache_usage_ratio", "KV cache slots in use / slots.", running / eng.max_batch),
            gauge("nanoseek_kv_cache_tokens_usage_ratio", "KV cache positions written / (slots * context length).",
                  positions / (eng.max_batch * eng.max_len)),
        ]
        spec = Counter("nanoseek_spec_decode_draft_tokens_total", "Tokens drafted by the MTP module.")
        spec.inc(eng.stats.drafted)
        acc = Counter("nanoseek_spec_decode_accepted_tokens_total", "Drafted tokens the model accepted.")
        acc.inc(eng.stats.accepted)
        parts += [spec.render(), acc.render()]
        if self.expert_load is not None:
            load = Counter("nanoseek_expert_load_total", "Tokens routed to each routed expert of each MoE layer.",
                           ("layer", "expert"))
            for layer, row in zip(self.expert_load.layers, self.expert_load.snapshot().tolist(), strict=True):
                for e, n in enumerate(row):
                    load.values[(str(layer), str(e))] = n
            parts.append(load.render())
        return "".join(parts)


class CountRequests:
    """ASGI middleware: counts the HTTP status of every request to the generation routes (`count_http`); added
    outermost, so refusals (401, 413) count too."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in ENDPOINTS:
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_http(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)
