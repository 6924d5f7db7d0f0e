"""An OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn).

    nanoseek serve runs/ckpt [--tokenizer runs/data/tokenizer.json] [--port 8000] [--api-key-file FILE]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "Hi"}])

Routes: GET /health (never needs the key), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream`, SSE chunks ending in `data: [DONE]`), GET /metrics (Prometheus text, `metrics.py`; no key, as in
vLLM) and GET / (a chat page in plain HTML/JS/CSS from `static/`, nothing remote; it asks for the key if needed).
The engine thread (`runner.EngineRunner`) steps the engine while any request is queued or running, so concurrent
HTTP requests share decode forwards (continuous batching).
Request bodies, their mapping to sampling parameters, the errors and the response bodies are in `api.py` (extra
fields beyond OpenAI's: `top_k`, `ignore_eos`, `think` on chat). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects cancels its request.

What lm-evaluation-harness's `local-completions` and OpenAI clients use is there: `n` choices (streamed too, each
chunk naming its choice's index), `logprobs` (0..20) and `echo` on /v1/completions in OpenAI's legacy format, the
prompt scored with `echo` and `max_tokens: 0`, and `logprobs` + `top_logprobs` on chat, streamed too. Log-probs are
those of the raw model distribution (before temperature / top-k / top-p, as vLLM's default), computed by the
engine thread in the same batched forwards as everything else (prompt log-probs during prefill: see
`engine.SamplingParams`), so scoring never runs the model beside it. A text prompt gets the tokenizer's bos first,
as `nanoseek eval` and Hugging Face / vLLM do for DeepSeek (echo leaves it out: see `api.Echo`), so that lm-eval's
numbers through the server are the local ones. lm-eval needs a tokenizer of its own to count context tokens, e.g.
a local Hugging Face tokenizer directory (`tokenizer.json` and a `tokenizer_config.json`):

    lm_eval --model local-completions --tasks TASKS --model_args base_url=http://127.0.0.1:8000/v1/completions,
        model=NAME,tokenizer_backend=huggingface,tokenizer=DIR,tokenized_requests=False   (all on one line)

Sent as text (tokenized_requests=False), every prompt gets the bos whether that tokenizer adds it or not; sent as
token ids (the default), the ids are scored as given, with a bos only if the tokenizer adds one (add_bos_token=True).

One client cannot stall the others: bodies over `max_body_bytes` get 413 before they are parsed, prompts over
`max_prompt_chars` 400 before they are tokenised, tokenising runs off the event loop, bad sampling values get 400
(`api.py`), and a request whose sampling still raises fails alone in the engine. At shutdown, requests still
running when the grace period is over end with an error in OpenAI's shape (a JSON 503, or an SSE error event and
`[DONE]`) rather than a cut connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import (
    APIError,
    BaseBody,
    ChatBody,
    ChoiceLogprobs,
    CompletionBody,
    CompletionChoice,
    Echo,
    Progress,
    ThinkDelta,
    TokenSpeller,
    chat_chunk_choice,
    chat_first_choice,
    chat_logprobs,
    chat_message_choice,
    chat_prompt,
    chat_tools,
    check_request,
    choice_params,
    completion_choice,
    completion_prompt,
    finish_error,
    model_not_found,
    n_choices,
    sampling_params,
    tool_finish,
    usage,
    validation_error,
)
from .engine import Engine, Request, SamplingParams
from .eplb import EPLBConfig, Rebalancer
from .metrics import CONTENT_TYPE, CountRequests, ServerMetrics
from .runner import EngineRunner, RunnerClosed

log = logging.getLogger("nanoseek.server")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there
MAX_BODY_BYTES = 4 * 2**20  # default request body limit (a full 128K-token context is well under 1 MB of text)
PROMPT_CHARS_PER_TOKEN = 64  # default prompt limit in characters per context token: longer cannot fit
SHUTDOWN_DRAIN_S = 5.0  # after the grace period: how long cancelled requests get to send their error
STATIC_DIR = Path(__file__).with_name("static")  # the chat page: plain HTML/JS/CSS, no build step, nothing remote
STATIC_PATH = "/static"
PUBLIC_PATHS = ("/health", "/metrics", "/")  # and the page's files under STATIC_PATH
# the page may load only its own files and talk only to this server
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'", "Cache-Control": "no-cache"}


# ---- errors ---------------------------------------------------------------------------------------------------
class _ErrorJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text that is not valid UTF-8 (a lone
    surrogate)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return _ErrorJSON(err.body(), status_code=err.status, headers=headers)


class _Auth:
    """ASGI middleware: every HTTP route but the public ones (/health, /metrics as in vLLM, the chat page: it asks
    its user for the key) needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _ok(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path") or ""
        if scope["type"] == "http" and path not in PUBLIC_PATHS and not path.startswith(STATIC_PATH + "/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not self._ok(given):
                msg = "missing API key" if not given else "incorrect API key"
                err = APIError(401, f"{msg}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before any of the app runs, at once when
    its Content-Length says so, else (chunked) as soon as what arrived passes the limit. The body is read here and
    handed on whole."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        err = APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                       code="request_too_large")
        await _error_response(err)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if length.isdigit() and (len(length) > 18 or int(length) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict[str, Any]:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()  # then disconnects, as usual

        await self.app(scope, replay, send)


# ---- one generation seen from the event loop ------------------------------------------------------------------
class _Mailbox:
    """Snapshots from the engine thread to the event loop in batches: the first one posted after the loop emptied
    the box schedules the delivery of all that arrive until it runs, so a step that updates 32 streams costs one
    wake-up of the loop (one self-pipe write), not 32."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[Progress], Progress]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Progress], upd: Progress) -> None:  # engine thread
        with self._lock:
            self._items.append((queue, upd))
            if len(self._items) > 1:  # a delivery is already scheduled
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self) -> None:  # the loop
        with self._lock:
            items, self._items = self._items, []
        for queue, upd in items:
            queue.put_nowait(upd)


class _Watch:
    """Engine-thread updates of one choice's request, delivered as `Progress` snapshots to the request's
    asyncio.Queue on the server's loop (final_only: just the last one, carrying all the log-probs)."""

    def __init__(self, mailbox: _Mailbox, queue: asyncio.Queue[Progress], index: int, final_only: bool) -> None:
        self.mailbox, self.queue, self.index, self.final_only = mailbox, queue, index, final_only
        self.sent = 0  # log-prob entries already in a snapshot
        self.first = True

    def on_update(self, req: Request) -> None:  # engine thread: snapshot now, the request keeps changing
        if self.final_only and not req.finished:
            return
        new = tuple(req.logprobs[self.sent:])
        self.sent += len(new)
        prompt = tuple(req.prompt_logprobs) if self.first and req.params.prompt_logprobs is not None else None
        self.first = False
        upd = Progress(self.index, req.stable_text(req.params.stop), len(req.output_ids), req.finish_reason,
                       req.stop_text is not None, new, prompt)
        self.mailbox.post(self.queue, upd)


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
              max_tokens_limit: int | None = None, max_body_bytes: int | None = None,
              max_prompt_chars: int | None = None, eplb: EPLBConfig | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread (`app.state.runner`).

    api_key: required as a bearer token on every route but /health (None: no authentication; an empty or blank
    key is refused, not taken as none). max_tokens_limit: the largest max_tokens a request may ask for (default:
    no limit beyond the context). max_body_bytes: larger request bodies get 413 (default MAX_BODY_BYTES).
    max_prompt_chars: longer prompts (all message contents together, for chat) get 400 before tokenising (default:
    PROMPT_CHARS_PER_TOKEN per token of the engine's context). eplb: re-plan redundant experts from the served
    load every eplb.interval seconds (infer/eplb.py; GET /eplb shows the plan)."""
    if engine.tokenizer is None:
        raise ValueError("the engine needs a tokenizer (Engine(model, tokenizer)) to decode text and stop strings")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty, which would leave the server open to anyone: give a key, or "
                         "api_key=None to serve without authentication")
    max_body_bytes = MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    prompt_chars = max_prompt_chars if max_prompt_chars is not None else PROMPT_CHARS_PER_TOKEN * engine.max_len
    runner = EngineRunner(engine)
    metrics = ServerMetrics(engine)  # its expert-load hooks sit on the model while the app runs
    created = int(time.time())
    rebalancer = (Rebalancer(engine.model, metrics.expert_load, eplb, on_install=engine.model_changed)
                  if eplb is not None and metrics.expert_load is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if metrics.expert_load is not None:
            metrics.expert_load.attach()
            engine.model_changed()  # hooks added: a step compiled before would not run them
        runner.start()
        replans = asyncio.create_task(rebalancer.run()) if rebalancer is not None else None
        try:
            yield
        finally:
            if replans is not None:
                replans.cancel()
            await asyncio.to_thread(runner.stop)
            if metrics.expert_load is not None:
                metrics.expert_load.remove()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner, app.state.engine, app.state.tokenizer = runner, engine, tokenizer
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(_Auth, api_key=api_key)  # outside the body limit: no key, no body read
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: refusals count too

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

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await asyncio.to_thread(metrics.render, runner), media_type=CONTENT_TYPE)  # reads the device

    if rebalancer is not None:
        app.state.rebalancer = rebalancer

        @app.get("/eplb")
        async def eplb_status() -> dict[str, Any]:
            return await asyncio.to_thread(rebalancer.status)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise model_not_found(name, model_name)
        return model_card()

    spell = TokenSpeller(tokenizer)
    mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()

    def params(body: BaseBody, n_prompt: int, default_max: int | None) -> SamplingParams:
        return sampling_params(body, n_prompt, model_name=model_name, max_len=engine.max_len,
                               max_tokens_limit=max_tokens_limit, default_max_tokens=default_max)

    def submit(prompt: list[int], sp: SamplingParams, n: int, param: str, stream: bool
               ) -> tuple[list[Request], asyncio.Queue[Progress]]:
        """Submit the n choices of a request (choice j with `choice_params(sp, j)`); their snapshots arrive on
        one queue."""
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if (mailbox := mailboxes.get(loop)) is None:
            mailbox = mailboxes[loop] = _Mailbox(loop)
        reqs: list[Request] = []
        try:
            for j in range(n):
                watch = _Watch(mailbox, queue, j, final_only=not stream)
                reqs.append(runner.submit(prompt, choice_params(sp, j), metrics.track(watch.on_update)))
        except ValueError as e:
            raise APIError(400, str(e), param, "invalid_value") from e
        except RunnerClosed as e:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable") from e
        finally:
            if len(reqs) < n:
                for req in reqs:
                    runner.cancel(req)
        metrics.count_prompt(len(prompt))  # once: the choices share it, as `usage` counts it
        return reqs, queue

    async def finals(reqs: list[Request], queue: asyncio.Queue[Progress], http: HTTPRequest) -> list[Progress]:
        """Wait for every choice to finish (their last snapshots, by index); cancel them all if the client goes
        away (or this task is cancelled) or one of them fails."""
        done: dict[int, Progress] = {}
        try:
            while len(done) < len(reqs):
                try:
                    upd = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)  # final_only: the ends
                except TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                if (err := finish_error(upd.finish_reason)) is not None:
                    raise err
                done[upd.index] = upd
        finally:
            for req in reqs:
                runner.cancel(req)  # no-op once finished
        return [done[j] for j in range(len(reqs))]

    def stream(reqs: list[Request], queue: asyncio.Queue[Progress], head: dict[str, Any],
               chunks: Callable[[Progress], list[dict[str, Any]]], first: list[dict[str, Any]],
               include_usage: bool) -> _SSE:
        """SSE of the choices' chunks (`chunks` turns a snapshot into the choices of zero or more chunks) until
        every choice finished; an error event if one of them fails."""
        async def events() -> AsyncIterator[str]:
            with_usage = {"usage": None} if include_usage else {}
            if first:  # at once (the role), before the first token
                yield "".join(_sse({**head, "choices": [choice], **with_usage}) for choice in first)
            out: list[str] = []
            n_output = [0] * len(reqs)
            left, failed = len(reqs), False
            while left and not failed:
                ups = [await queue.get()]
                while not queue.empty():  # whatever else has arrived goes out in the same write
                    ups.append(queue.get_nowait())
                for upd in ups:
                    if (err := finish_error(upd.finish_reason)) is not None:
                        out.append(_sse(err.body()))
                        failed = True
                        break
                    out += [_sse({**head, "choices": [choice], **with_usage}) for choice in chunks(upd)]
                    if upd.finish_reason is not None:
                        n_output[upd.index] = upd.n_output
                        left -= 1
                if out:
                    yield "".join(out)
                    out = []
            if include_usage and not failed:
                out.append(_sse({**head, "choices": [], "usage": usage(len(reqs[0].prompt_ids), sum(n_output))}))
            yield "".join(out) + "data: [DONE]\n\n"

        def close() -> None:
            for req in reqs:
                runner.cancel(req)

        return _SSE(events(), on_close=close)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        check_request(body, model_name)
        ids, n_added = await asyncio.to_thread(completion_prompt, body, tokenizer, prompt_chars)  # off the loop
        sp = params(body, len(ids), 16)  # OpenAI's default max_tokens for completions
        echo = await asyncio.to_thread(Echo.of, tokenizer, ids, n_added) if body.echo else None
        n = n_choices(body)
        reqs, queue = submit(ids, sp, n, "prompt", bool(body.stream))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(reqs[0].created),
                "model": model_name}
        want_logprobs = body.logprobs is not None
        choices = [CompletionChoice(spell, echo, want_logprobs) for _ in range(n)]
        if body.stream:
            def chunks(upd: Progress) -> list[dict[str, Any]]:
                text, logprobs = choices[upd.index].step(upd)
                out = []
                if text or (logprobs and logprobs["tokens"]):
                    out.append(completion_choice(upd.index, text, logprobs))
                if upd.finish_reason is not None:
                    out.append(completion_choice(upd.index, "", finish_reason=upd.finish_reason))
                return out

            return stream(reqs, queue, head, chunks, [], body.include_usage)
        ends = await finals(reqs, queue, http)

        def whole() -> list[dict[str, Any]]:
            return [completion_choice(j, *choices[j].step(upd), finish_reason=upd.finish_reason)
                    for j, upd in enumerate(ends)]

        out = await asyncio.to_thread(whole) if want_logprobs else whole()  # detokenising: off the event loop
        return {**head, "choices": out, "usage": usage(len(ids), sum(u.n_output for u in ends))}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody, http: HTTPRequest) -> dict[str, Any] | _SSE:
        check_request(body, model_name)
        # off the event loop; only the template's markers become special tokens
        ids = await asyncio.to_thread(chat_prompt, body, tokenizer, prompt_chars)
        tools = chat_tools(body)  # validated by chat_prompt: a parser per choice splits off the tool calls
        sp = params(body, len(ids), None)
        n = n_choices(body)
        reqs, queue = submit(ids, sp, n, "messages", bool(body.stream))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(reqs[0].created), "model": model_name}
        lps = [ChoiceLogprobs(tokenizer, include_stop=False) if body.logprobs else None for _ in range(n)]

        def logprobs_of(upd: Progress) -> dict[str, Any] | None:
            lp = lps[upd.index]
            if lp is None:
                return None
            lp.add(upd.logprobs, upd.n_output)
            return chat_logprobs(lp.take(len(upd.text), final=upd.finish_reason is not None, cut=upd.cut), spell)

        if body.stream:
            deltas = [ThinkDelta(body.think) for _ in range(n)]
            parsers = [tools.parser() for _ in range(n)]

            def chunks(upd: Progress) -> list[dict[str, Any]]:
                finished = upd.finish_reason is not None
                reasoning, content = deltas[upd.index](upd.text, finished)
                parser, calls = parsers[upd.index], []
                if parser is not None:  # the same parser as non-streaming, fed the content in pieces
                    content, calls = parser.feed(content)
                    if finished:
                        rest, more = parser.finish()
                        content, calls = content + rest, calls + more
                logprobs = logprobs_of(upd)
                out = []
                if reasoning or content or calls or (logprobs and logprobs["content"]):
                    out.append(chat_chunk_choice(upd.index, reasoning, content, None, logprobs,
                                                 [c.delta() for c in calls]))
                if finished:
                    out.append(chat_chunk_choice(upd.index, "", "", tool_finish(upd.finish_reason, parser)))
                return out

            return stream(reqs, queue, head, chunks, [chat_first_choice(j) for j in range(n)],
                          body.include_usage)
        ends = await finals(reqs, queue, http)

        def whole() -> list[dict[str, Any]]:
            return [chat_message_choice(j, upd.text, upd.finish_reason, body.think, logprobs_of(upd), tools.parser())
                    for j, upd in enumerate(ends)]

        out = await asyncio.to_thread(whole) if body.logprobs else whole()  # detokenising: off the event loop
        return {**head, "object": "chat.completion", "choices": out,
                "usage": usage(len(ids), sum(u.n_output for u in ends))}

    return app


class _Server(uvicorn.Server):
    """uvicorn's server whose shutdown, once the grace period is over, cancels the requests still running through
    the engine (`EngineRunner.cancel_all`), so that each ends with an error in OpenAI's shape: a JSON 503, or an SSE
    error event and `[DONE]`. uvicorn's own cancelling of their tasks (a plain-text 500, a stream cut without a
    word) comes SHUTDOWN_DRAIN_S later, only for what still hangs."""

    def __init__(self, config: uvicorn.Config, runner: EngineRunner, grace: float | None) -> None:
        super().__init__(config)
        self.runner, self.grace = runner, grace

    async def shutdown(self, sockets: Any = None) -> None:
        loop = asyncio.get_running_loop()
        timer = None if self.grace is None else loop.call_later(self.grace, self.runner.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                timeout_graceful_shutdown: float | None = 30.0) -> uvicorn.Server:
    """The uvicorn server of a `build_app` app: on SIGINT/SIGTERM (or `should_exit`) it stops accepting
    connections, lets the requests in flight finish for at most timeout_graceful_shutdown seconds (None = no
    limit), then ends the rest with an error response, and the engine thread stops."""
    grace = timeout_graceful_shutdown
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None if grace is None else grace + SHUTDOWN_DRAIN_S)  # type: ignore[arg-type]
    return _Server(config, app.state.runner, grace)


def serve(
    engine: Engine, tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
    api_key: str | None = None, max_tokens_limit: int | None = None, log_level: str = "info",
    timeout_graceful_shutdown: float | None = 30.0, max_body_bytes: int | None = None,
    max_prompt_chars: int | None = None, eplb: EPLBConfig | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM (see `make_server` for the shutdown, `build_app` for the options)."""
    app = build_app(engine, tokenizer, model_name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                    max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars, eplb=eplb)
    make_server(app, host, port, log_level, timeout_graceful_shutdown).run()
