"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn).

    nanoseek serve runs/ckpt [--tokenizer runs/data/tokenizer.json] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "Hi"}])

Routes: GET /health (never needs the key), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream`, SSE chunks ending in `data: [DONE]`). One background thread owns the engine and steps it while any
request is queued or running, so concurrent HTTP requests share decode forwards (continuous batching). Extra
request fields beyond OpenAI's: `top_k`, `ignore_eos`, and `think` on chat (R1: open `<think>` in the prompt and
return the reasoning separately as `reasoning_content`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import THINK_END, encode_chat, split_think
from .engine import Engine, Request, SamplingParams

log = logging.getLogger("nanoseek.server")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there


# ---- the engine thread ----------------------------------------------------------------------------------------
class EngineRunner:
    """Owns the engine: one thread calls `engine.step()` while there is work and sleeps on an Event otherwise.

    `submit` is thread-safe; `stop` cancels what is still queued or running, lets the engine release it and joins
    the thread. If a step raises, every live request is finished with finish_reason 'error' and the engine's slots
    are cleared, so the server keeps serving."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[int, Request] = {}  # submitted, not yet finished (dict ops are atomic under the GIL)
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request (ValueError from the engine for a bad prompt; RuntimeError when not running)."""
        def notify(req: Request) -> None:  # engine thread, possibly under the engine's lock: take no lock here
            if req.finished:
                self._live.pop(req.id, None)
            if on_update is not None:
                on_update(req)

        with self._lock:
            if not self._accepting:
                raise RuntimeError("the server is shutting down")
            req = self.engine.submit(prompt_ids, params, on_update=notify)
            self._live[req.id] = req
        if req.finished:  # it may have finished before it was recorded
            self._live.pop(req.id, None)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step (any thread)."""
        if not req.finished:
            req.cancelled = True
            self._wake.set()

    def live(self) -> list[Request]:
        return list(self._live.copy().values())

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running, let the engine release it, and join the thread."""
        with self._lock:
            self._accepting = False
        for req in self.live():
            req.cancelled = True
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s", timeout)

    def _loop(self) -> None:
        while True:
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception:  # a bug or out-of-memory: fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all()
                continue
            if self._stopping:
                return
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _fail_all(self) -> None:
        self.engine.abort_all("error")
        for req in self.live():
            if req.finish_reason is None:
                req.finish_reason = "error"
            if req.on_update is not None:
                req.on_update(req)
        self._live.clear()


# ---- errors ---------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}",
                        code="invalid_json")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {e.get('msg', 'invalid value')}", param=param, code="invalid_value")


class _Auth:
    """ASGI middleware: every HTTP route except /health needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _ok(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not self._ok(given):
                msg = "missing API key" if not given else "incorrect API key"
                err = APIError(401, f"{msg}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- request bodies -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (strict types: "5" is not a number)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extra (vLLM-style)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    ignore_eos: bool = False  # extra
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(_Body):
    messages: Any = None  # validated by chat.validate_messages for clear messages
    max_completion_tokens: int | None = None
    think: bool = False  # extra: R1-style reasoning (prompt opens <think>, answer split into reasoning_content)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _unsupported(body: _Body) -> None:
    checks = [
        ("n", body.n not in (None, 1), "n must be 1: one choice per request"),
        ("best_of", getattr(body, "best_of", None) not in (None, 1), "best_of is not supported"),
        ("echo", bool(getattr(body, "echo", False)), "echo is not supported"),
        ("suffix", getattr(body, "suffix", None) is not None, "suffix is not supported"),
        ("logprobs", bool(getattr(body, "logprobs", None)), "logprobs are not supported"),
        ("tools", bool(getattr(body, "tools", None)), "tools are not supported"),
        ("presence_penalty", bool(body.presence_penalty), "presence_penalty is not supported"),
        ("frequency_penalty", bool(body.frequency_penalty), "frequency_penalty is not supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
    ]
    fmt = getattr(body, "response_format", None)
    checks.append(("response_format", bool(fmt) and fmt.get("type") != "text", "only response_format text"))
    for param, bad, message in checks:
        if bad:
            raise APIError(400, message, param=param, code="unsupported_parameter")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


# ---- one generation seen from the event loop ------------------------------------------------------------------
@dataclass(frozen=True)
class _Update:
    text: str  # the stable text: never ends inside a possible stop string (the full text once finished)
    n_output: int
    finish_reason: str | None


class _Watch:
    """Engine-thread updates of one request, delivered to an asyncio.Queue on the server's loop (final_only: just
    the last one)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, final_only: bool = False) -> None:
        self.loop = loop
        self.final_only = final_only
        self.queue: asyncio.Queue[_Update] = asyncio.Queue()

    def on_update(self, req: Request) -> None:  # engine thread: snapshot now, the request keeps changing
        if self.final_only and not req.finished:
            return
        upd = _Update(req.stable_text(req.params.stop), len(req.output_ids), req.finish_reason)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, upd)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _holdback(text: str, marker: str) -> str:
    """`text` without its longest suffix that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


class _Delta:
    """Turns the successive stable texts of one request into deltas: (reasoning, content); with think, the text
    is split at `</think>` (a possible partial `</think>` at the end is held back), else all of it is content."""

    def __init__(self, think: bool) -> None:
        self.think = think
        self.reasoning = self.content = ""  # sent so far

    def __call__(self, text: str, finished: bool) -> tuple[str, str]:
        if self.think:
            reasoning, content = split_think(text if finished else _holdback(text, THINK_END), in_think=True)
        else:
            reasoning, content = "", text
        out = (_extend(self.reasoning, reasoning), _extend(self.content, content))
        self.reasoning += out[0]
        self.content += out[1]
        return out


def _extend(sent: str, now: str) -> str:
    """What `now` adds to `sent` (nothing if it does not extend it: text already streamed cannot be taken back)."""
    return now[len(sent):] if now.startswith(sent) else ""


class _SSE(StreamingResponse):
    """Server-sent events that cancel their request however the response ends (done, client gone, shutdown)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- the app --------------------------------------------------------------------------------------------------
def build_app(engine: Engine, tokenizer: Any, model_name: str, api_key: str | None = None,
              max_tokens_limit: int | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread (`app.state.runner`).

    max_tokens_limit: the largest max_tokens a request may ask for (default: no limit beyond the context)."""
    if engine.tokenizer is None:
        raise ValueError("the engine needs a tokenizer (Engine(model, tokenizer)) to decode text and stop strings")
    runner = EngineRunner(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner, app.state.engine, app.state.tokenizer = runner, engine, tokenizer
    if api_key:
        app.add_middleware(_Auth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(_: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        eng = runner.engine
        return {"status": "ok" if runner.running else "stopped", "model": model_name,
                "running": sum(s is not None for s in eng.slots), "waiting": len(eng.waiting)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                           "model_not_found")
        return model_card()

    def params(body: _Body, n_prompt: int, default_max: int | None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                           "model", "model_not_found")
        _unsupported(body)
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", "prompt" if isinstance(body, CompletionBody) else "messages")
        if n_prompt > engine.max_len - 1:
            raise APIError(400, f"this model's maximum context length is {engine.max_len} tokens; the prompt has "
                           f"{n_prompt} (at most {engine.max_len - 1}, to leave room for an answer)",
                           "messages" if isinstance(body, ChatBody) else "prompt", "context_length_exceeded")
        name = "max_tokens"
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            name, max_tokens = "max_completion_tokens", body.max_completion_tokens
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{name} must be at least 1, got {max_tokens}", name, "invalid_value")
        if max_tokens is not None and max_tokens_limit is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"{name} is {max_tokens}; this server allows at most {max_tokens_limit}", name,
                           "invalid_value")
        if max_tokens is None:
            room = engine.max_len - n_prompt  # the engine stops with 'length' when the context is full
            max_tokens = min(default_max or room, max_tokens_limit or room)
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = None if body.top_p is None or body.top_p == 1 else body.top_p
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=top_p,
                                  seed=body.seed, stop=_stops(body.stop), ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e), str(e).split()[0], "invalid_value") from e

    def submit(prompt: list[int], sp: SamplingParams, param: str, stream: bool) -> tuple[Request, _Watch]:
        watch = _Watch(asyncio.get_running_loop(), final_only=not stream)
        try:
            req = runner.submit(prompt, sp, watch.on_update)
        except ValueError as e:
            raise APIError(400, str(e), param, "invalid_value") from e
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from e
        return req, watch

    async def final(req: Request, watch: _Watch, http: HTTPRequest) -> _Update:
        """Wait for the request to finish; cancel it if the client goes away (or this task is cancelled)."""
        try:
            while True:
                try:
                    upd = await asyncio.wait_for(watch.queue.get(), DISCONNECT_POLL_S)  # final_only: the end
                    break
                except TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "client closed the request", code="client_closed") from None
        finally:
            runner.cancel(req)  # no-op once finished
        if upd.finish_reason == "error":
            raise APIError(500, "generation failed (see the server log)", type="server_error", code="engine_error")
        if upd.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled (server shutting down)", type="server_error",
                           code="cancelled")
        return upd

    def usage(req: Request, n_output: int) -> dict[str, int]:
        n = len(req.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": n_output, "total_tokens": n + n_output}

    def stream(req: Request, watch: _Watch, head: dict[str, Any], chunk: Callable[[str, str, str | None], dict],
               first: dict[str, Any] | None, include_usage: bool, think: bool) -> _SSE:
        async def events() -> AsyncIterator[str]:
            with_usage = {"usage": None} if include_usage else {}
            if first is not None:
                yield _sse({**head, **first, **with_usage})
            delta = _Delta(think)
            while True:
                upd = await watch.queue.get()
                if upd.finish_reason == "error":
                    yield _sse(APIError(500, "generation failed (see the server log)", type="server_error",
                                        code="engine_error").body())
                    break
                if upd.finish_reason == "cancelled":
                    yield _sse(APIError(503, "the request was cancelled (server shutting down)",
                                        type="server_error", code="cancelled").body())
                    break
                reasoning, content = delta(upd.text, upd.finish_reason is not None)
                if reasoning or content:
                    yield _sse({**head, **chunk(reasoning, content, None), **with_usage})
                if upd.finish_reason is not None:
                    yield _sse({**head, **chunk("", "", upd.finish_reason), **with_usage})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(req, upd.n_output)})
                    break
            yield "data: [DONE]\n\n"

        return _SSE(events(), on_close=lambda: runner.cancel(req))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                               "unsupported_parameter")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sp = params(body, len(ids), 16)  # OpenAI's default max_tokens for completions
        req, watch = submit(ids, sp, "prompt", bool(body.stream))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(req.created),
                "model": model_name}

        def choice(_: str, text: str, finish: str | None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return stream(req, watch, head, choice, None, include, think=False)
        upd = await final(req, watch, http)
        return {**head, **choice("", upd.text, upd.finish_reason), "usage": usage(req, upd.n_output)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        if body.messages is None:
            raise APIError(400, "messages is required: a list of {role, content} objects", "messages",
                           "missing_required_parameter")
        try:
            ids = encode_chat(body.messages, tokenizer, think=body.think)
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from e
        sp = params(body, len(ids), None)
        req, watch = submit(ids, sp, "messages", bool(body.stream))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(req.created),
                "model": model_name}

        def choice(reasoning: str, content: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, str] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return stream(req, watch, head, choice, first, include, body.think)
        upd = await final(req, watch, http)
        message: dict[str, Any] = {"role": "assistant", "content": upd.text}
        if body.think:
            message["reasoning_content"], message["content"] = split_think(upd.text, in_think=True)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": upd.finish_reason}],
                "usage": usage(req, upd.n_output)}

    return app


def serve(
    engine: Engine, tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
    api_key: str | None = None, max_tokens_limit: int | None = None, log_level: str = "info",
    timeout_graceful_shutdown: float | None = 30.0,
) -> None:
    """Run the server until SIGINT/SIGTERM: uvicorn stops accepting connections, lets the requests in flight
    finish (for at most timeout_graceful_shutdown seconds, None = no limit, then cancels them), and the engine
    thread stops."""
    app = build_app(engine, tokenizer, model_name, api_key=api_key, max_tokens_limit=max_tokens_limit)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=timeout_graceful_shutdown)  # type: ignore[arg-type]
    uvicorn.Server(config).run()
