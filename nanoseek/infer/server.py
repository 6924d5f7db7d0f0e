"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn).

    nanoseek serve runs/ckpt [--tokenizer runs/data/tokenizer.json] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "Hi"}])

Routes: GET /health (never needs the key), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream`, SSE chunks ending in `data: [DONE]`). The engine thread (`runner.EngineRunner`) steps the engine
while any request is queued or running, so concurrent HTTP requests share decode forwards (continuous batching).
Request bodies, their mapping to sampling parameters, the errors and the response bodies are in `api.py` (extra
fields beyond OpenAI's: `top_k`, `ignore_eos`, `think` on chat). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import (
    APIError,
    BaseBody,
    ChatBody,
    CompletionBody,
    ThinkDelta,
    chat_chunk_choice,
    chat_first_choice,
    chat_message_choice,
    chat_prompt,
    completion_choice,
    completion_prompt,
    finish_error,
    model_not_found,
    sampling_params,
    usage,
    validation_error,
)
from .engine import Engine, Request, SamplingParams
from .runner import EngineRunner, RunnerClosed

log = logging.getLogger("nanoseek.server")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there


# ---- errors ---------------------------------------------------------------------------------------------------
def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(_: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = runner.load()
        return {"status": "ok" if runner.running else "stopped", "model": model_name, "running": running,
                "waiting": waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise model_not_found(name, model_name)
        return model_card()

    def params(body: BaseBody, n_prompt: int, default_max: int | None) -> SamplingParams:
        return sampling_params(body, n_prompt, model_name=model_name, max_len=engine.max_len,
                               max_tokens_limit=max_tokens_limit, default_max_tokens=default_max)

    def submit(prompt: list[int], sp: SamplingParams, param: str, stream: bool) -> tuple[Request, _Watch]:
        watch = _Watch(asyncio.get_running_loop(), final_only=not stream)
        try:
            req = runner.submit(prompt, sp, watch.on_update)
        except ValueError as e:
            raise APIError(400, str(e), param, "invalid_value") from e
        except RunnerClosed as e:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable") from e
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
        if (err := finish_error(upd.finish_reason)) is not None:
            raise err
        return upd

    def stream(req: Request, watch: _Watch, head: dict[str, Any], chunk: Callable[[str, str, str | None], dict],
               first: dict[str, Any] | None, include_usage: bool, think: bool) -> _SSE:
        async def events() -> AsyncIterator[str]:
            with_usage = {"usage": None} if include_usage else {}
            if first is not None:
                yield _sse({**head, **first, **with_usage})
            delta = ThinkDelta(think)
            while True:
                upd = await watch.queue.get()
                if (err := finish_error(upd.finish_reason)) is not None:
                    yield _sse(err.body())
                    break
                reasoning, content = delta(upd.text, upd.finish_reason is not None)
                if reasoning or content:
                    yield _sse({**head, **chunk(reasoning, content, None), **with_usage})
                if upd.finish_reason is not None:
                    yield _sse({**head, **chunk("", "", upd.finish_reason), **with_usage})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(len(req.prompt_ids), upd.n_output)})
                    break
            yield "data: [DONE]\n\n"

        return _SSE(events(), on_close=lambda: runner.cancel(req))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        ids = completion_prompt(body, tokenizer)
        sp = params(body, len(ids), 16)  # OpenAI's default max_tokens for completions
        req, watch = submit(ids, sp, "prompt", bool(body.stream))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(req.created),
                "model": model_name}
        if body.stream:
            return stream(req, watch, head, lambda _, text, finish: completion_choice(text, finish), None,
                          body.include_usage, think=False)
        upd = await final(req, watch, http)
        return {**head, **completion_choice(upd.text, upd.finish_reason),
                "usage": usage(len(req.prompt_ids), upd.n_output)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        ids = chat_prompt(body, tokenizer)  # only the template's markers become special tokens
        sp = params(body, len(ids), None)
        req, watch = submit(ids, sp, "messages", bool(body.stream))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(req.created),
                "model": model_name}
        if body.stream:
            return stream(req, watch, head, chat_chunk_choice, chat_first_choice(), body.include_usage, body.think)
        upd = await final(req, watch, http)
        return {**head, "object": "chat.completion", **chat_message_choice(upd.text, upd.finish_reason, body.think),
                "usage": usage(len(req.prompt_ids), upd.n_output)}

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
