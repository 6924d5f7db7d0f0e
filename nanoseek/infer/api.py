"""The OpenAI API as data, without HTTP: request bodies (pydantic), their mapping to prompts and `SamplingParams`,
errors in OpenAI's shape, and the response / stream-chunk bodies. server.py puts these behind routes.

Extra request fields beyond OpenAI's: `top_k`, `ignore_eos`, and `think` on chat (R1: open `<think>` in the
prompt and return the reasoning separately as `reasoning_content`). Errors are
`{"error": {"message", "type", "param", "code"}}` with an HTTP status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from .chat import THINK_END, encode_prompt, split_think
from .engine import SamplingParams


# ---- errors ---------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP status `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The APIError of pydantic's validation errors of a request body (the first one is reported)."""
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


def model_not_found(name: str, model_name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                    "model_not_found")


def finish_error(finish_reason: str | None) -> APIError | None:
    """The error a request that ended this way is answered with (None: it ended normally)."""
    if finish_reason == "error":
        return APIError(500, "generation failed (see the server log)", type="server_error", code="engine_error")
    if finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (server shutting down)", type="server_error",
                        code="cancelled")
    return None


# ---- request bodies -------------------------------------------------------------------------------------------
class BaseBody(BaseModel):
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

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: a last chunk with the usage (and `usage: null` on the others)."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(BaseBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(BaseBody):
    messages: Any = None  # validated by chat.validate_messages for clear messages
    max_completion_tokens: int | None = None
    think: bool = False  # extra: R1-style reasoning (prompt opens <think>, answer split into reasoning_content)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def check_supported(body: BaseBody) -> None:
    """APIError for a field set to something this server does not do (n > 1, logprobs, tools, penalties, ...)."""
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


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


# ---- prompts --------------------------------------------------------------------------------------------------
def completion_prompt(body: CompletionBody, tokenizer: Any) -> list[int]:
    """The ids of a /v1/completions prompt: token ids as given, or the text encoded. The text is a raw prompt the
    client owns whole (no template, no turns to forge), so special-token strings in it become special ids, as a
    client that renders a chat template itself expects; chat requests never do this (see `chat_prompt`)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                           "unsupported_parameter")
        prompt = prompt[0]
    return tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)


def chat_prompt(body: ChatBody, tokenizer: Any) -> list[int]:
    """The ids of a chat request's messages with the generation prompt: only the template's markers are special
    ids (`chat.encode_prompt`); message content is plain text whatever it spells."""
    if body.messages is None:
        raise APIError(400, "messages is required: a list of {role, content} objects", "messages",
                       "missing_required_parameter")
    try:
        return encode_prompt(body.messages, tokenizer, think=body.think)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from e


def sampling_params(body: BaseBody, n_prompt: int, *, model_name: str, max_len: int,
                    max_tokens_limit: int | None = None, default_max_tokens: int | None = None) -> SamplingParams:
    """The engine's SamplingParams of a request whose prompt has n_prompt tokens, or an APIError: wrong model,
    unsupported fields, an empty or too long prompt, a bad max_tokens (at most `max_tokens_limit`; absent: the
    default, or the room left in the `max_len` context), bad sampling values. OpenAI's defaults: temperature 1."""
    if body.model != model_name:
        raise model_not_found(body.model, model_name)
    check_supported(body)
    is_chat = isinstance(body, ChatBody)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", "messages" if is_chat else "prompt")
    if n_prompt > max_len - 1:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt has "
                       f"{n_prompt} (at most {max_len - 1}, to leave room for an answer)",
                       "messages" if is_chat else "prompt", "context_length_exceeded")
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
        room = max_len - n_prompt  # the engine stops with 'length' when the context is full
        max_tokens = min(default_max_tokens or room, max_tokens_limit or room)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = None if body.top_p is None or body.top_p == 1 else body.top_p
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=top_p,
                              seed=body.seed, stop=stop_strings(body.stop), ignore_eos=body.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e), str(e).split()[0], "invalid_value") from e


# ---- responses ------------------------------------------------------------------------------------------------
def usage(n_prompt: int, n_output: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_output, "total_tokens": n_prompt + n_output}


def completion_choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    """`choices` of a completion or of one of its stream chunks."""
    return {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk_choice(reasoning: str, content: str, finish_reason: str | None) -> dict[str, Any]:
    """`choices` of a chat stream chunk (the delta holds only what is non-empty)."""
    delta: dict[str, str] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def chat_first_choice() -> dict[str, Any]:
    """`choices` of a chat stream's first chunk: the assistant role, no content yet."""
    return {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]}


def chat_message_choice(text: str, finish_reason: str | None, think: bool) -> dict[str, Any]:
    """`choices` of a finished chat completion (think: the reasoning split off into reasoning_content)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if think:
        message["reasoning_content"], message["content"] = split_think(text, in_think=True)
    return {"choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}


def _holdback(text: str, marker: str) -> str:
    """`text` without its longest suffix that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def _extend(sent: str, now: str) -> str:
    """What `now` adds to `sent` (nothing if it does not extend it: text already streamed cannot be taken back)."""
    return now[len(sent):] if now.startswith(sent) else ""


class ThinkDelta:
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
