"""The OpenAI API as data, without HTTP: request bodies (pydantic), their mapping to prompts and `SamplingParams`,
errors in OpenAI's shape, and the response / stream-chunk bodies. server.py puts these behind routes.

Extra request fields beyond OpenAI's: `top_k`, `ignore_eos`, and `think` on chat (R1: open `<think>` in the
prompt and return the reasoning separately as `reasoning_content`). Chat takes OpenAI's `tools` and `tool_choice`
in DeepSeek-V3's format (`tools.py`): the model's calls come back as `tool_calls` (finish_reason "tool_calls"),
each call whole in one stream delta; 'required' or a named function opens the call in the prompt. Errors are
`{"error": {"message", "type", "param", "code"}}` with an HTTP status.

A text prompt of /v1/completions gets the tokenizer's bos first (as Hugging Face and vLLM do for DeepSeek, whose
tokenizer adds it, and as `nanoseek eval` scores), unless it already starts with it; token-id prompts are taken as
given. `n` choices each run as their own request (choice j > 0 seeded from the request's seed and j). Log-probs
(`logprobs` + `echo` on completions, OpenAI's legacy format; `logprobs` + `top_logprobs` on chat) are those of the
raw model distribution, before temperature, top-k and top-p, as vLLM reports by default; with `echo`, the prompt's
tokens are scored too (as sent: the bos the server added is not echoed, see `Echo`; a first token with nothing
before it has none: null), and `max_tokens: 0` scores the prompt without generating (lm-evaluation-harness's
loglikelihood requests).

Hostile input is refused here, before it costs the engine anything: text that is not valid Unicode (a lone
surrogate), prompts over a length in characters (checked before tokenising), more than MAX_STOP_STRINGS stop
strings or one over MAX_STOP_CHARS characters, and sampling values the engine cannot use (NaN or tiny
temperatures, seeds beyond 64 bits: see `SamplingParams`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from .chat import THINK_END, chat_specials, encode_prompt, split_think, validate_messages
from .engine import SamplingParams, TokenLogprob, int64_seed
from .sampling import Detokenizer
from .tools import TOOL_TOKENS, ToolCallParser, ToolChoice, ToolChoiceError, history_calls, tool_choice

MAX_STOP_STRINGS = 16  # OpenAI allows 4; every stop string is searched for in every step's new text
MAX_STOP_CHARS = 400
MAX_LOGPROBS = 20  # most likely alternatives per token (vLLM's default limit)
MAX_N = 16  # choices per request: each is a request of its own in the engine


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
    top_logprobs: int | None = None
    tools: list[Any] | None = None  # validated by tools.tool_choice
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def n_choices(body: BaseBody) -> int:
    return 1 if body.n is None else body.n


def check_supported(body: BaseBody) -> None:
    """APIError for a field set to something this server does not do (best_of != n, penalties, ...)."""
    checks = [
        ("best_of", getattr(body, "best_of", None) not in (None, 1, n_choices(body)),
         "best_of is not supported (other than best_of = n)"),
        ("suffix", getattr(body, "suffix", None) is not None, "suffix is not supported"),
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
    """The non-empty stop strings of a request; APIError for more than MAX_STOP_STRINGS, or one longer than
    MAX_STOP_CHARS characters."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop",
                       "invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop string has {max(map(len, stops))} characters; at most {MAX_STOP_CHARS}",
                       "stop", "invalid_value")
    return [s for s in stops if s]


def _check_range(value: int | None, lo: int, hi: int, param: str) -> None:
    if value is not None and not lo <= value <= hi:
        raise APIError(400, f"{param} must be between {lo} and {hi}, got {value}", param, "invalid_value")


def check_request(body: BaseBody, model_name: str) -> None:
    """The checks that need no tokenising (run them first): the model, unsupported fields, the stop strings, n and
    the log-prob counts."""
    if body.model != model_name:
        raise model_not_found(body.model, model_name)
    check_supported(body)
    stop_strings(body.stop)
    _check_range(body.n, 1, MAX_N, "n")
    if isinstance(body, CompletionBody):
        _check_range(body.logprobs, 0, MAX_LOGPROBS, "logprobs")
    elif isinstance(body, ChatBody):
        _check_range(body.top_logprobs, 0, MAX_LOGPROBS, "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")


def check_text(text: str, param: str) -> None:
    """APIError for text that is not valid Unicode: a lone surrogate such as "\\ud800", which JSON can spell
    but no UTF-8 (and no tokenizer) can take."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                       f"{e.start}", param, "invalid_value") from None


def _check_length(n_chars: int, max_chars: int | None, param: str) -> None:
    if max_chars is not None and n_chars > max_chars:
        raise APIError(400, f"the prompt has {n_chars} characters; this server takes at most {max_chars}", param,
                       "context_length_exceeded")


# ---- prompts --------------------------------------------------------------------------------------------------
def completion_prompt(body: CompletionBody, tokenizer: Any, max_chars: int | None = None) -> tuple[list[int], int]:
    """(ids, n_added) of a /v1/completions prompt: token ids as given (n_added 0), or the text encoded (at most
    `max_chars` characters, checked before tokenising) after the tokenizer's bos (n_added 1), unless the text
    starts with the bos token itself (n_added 0). The text is a raw prompt the client owns whole (no template, no
    turns to forge), so special-token strings in it become special ids, as a client that renders a chat template
    itself expects; chat requests never do this (see `chat_prompt`)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                           "unsupported_parameter")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return list(prompt), 0
    _check_length(len(prompt), max_chars, "prompt")
    check_text(prompt, "prompt")
    ids = tokenizer.encode(prompt, allow_special=True)
    bos = getattr(tokenizer, "bos_id", None)
    if not prompt or bos is None or ids[:1] == [bos]:
        return ids, 0
    return [bos, *ids], 1


def chat_tools(body: ChatBody, tokenizer: Any = None) -> ToolChoice:
    """The request's validated `tools` and `tool_choice`; APIError naming the field, also for tools asked of a
    tokenizer without DeepSeek-V3's tool-call tokens (an older checkpoint) and for a forced call with `think`."""
    try:
        choice = tool_choice(body.tools, body.tool_choice)
    except ToolChoiceError as e:
        raise APIError(400, str(e), e.param, "invalid_value") from e
    if choice.rendered and tokenizer is not None:
        try:
            sp = chat_specials(tokenizer)
        except ValueError as e:  # no chat template at all
            raise APIError(400, str(e), "messages", "invalid_value") from e
        if missing := [k for k in TOOL_TOKENS if k not in sp]:
            raise APIError(400, f"this model's tokenizer has no tool-call tokens ({len(missing)} of DeepSeek-V3's "
                           "9 missing, e.g. <｜tool▁calls▁begin｜>): it cannot call tools", "tools",
                           "unsupported_parameter")
    if choice.forced and body.think:
        raise APIError(400, "tool_choice 'required' or a named function opens the call in the prompt, which leaves "
                       "no room for think's reasoning: use tool_choice 'auto' with think", "tool_choice",
                       "invalid_value")
    return choice


def chat_prompt(body: ChatBody, tokenizer: Any, max_chars: int | None = None) -> list[int]:
    """The ids of a chat request's messages with the generation prompt: only the template's markers are special
    ids (`chat.encode_prompt`); message content, tool definitions and call arguments are plain text whatever they
    spell. At most `max_chars` characters of content in all, checked before tokenising. With tools (see
    `chat_tools`), they are in the system prompt, and tool_choice 'required' or a named function opens a call."""
    if body.messages is None:
        raise APIError(400, "messages is required: a list of {role, content} objects", "messages",
                       "missing_required_parameter")
    try:
        turns = validate_messages(body.messages)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from e
    choice = chat_tools(body, tokenizer)
    texts = [content for _, content in turns] + [name + args for i, m in enumerate(body.messages)
                                                 if m.get("role") == "assistant" and m.get("tool_calls")
                                                 for name, args in history_calls(i, m["tool_calls"])]
    tools_json = json.dumps(choice.rendered, ensure_ascii=False) if choice.rendered else ""
    _check_length(sum(map(len, texts)) + len(tools_json), max_chars, "messages")
    for content in texts:
        check_text(content, "messages")
    check_text(tools_json, "tools")
    forced = None if not choice.forced else choice.name or ""
    try:
        return encode_prompt(body.messages, tokenizer, think=body.think, tools=choice.rendered, forced_call=forced)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from e


def sampling_params(body: BaseBody, n_prompt: int, *, model_name: str, max_len: int,
                    max_tokens_limit: int | None = None, default_max_tokens: int | None = None) -> SamplingParams:
    """The engine's SamplingParams of a request whose prompt has n_prompt tokens (of its first choice: see
    `choice_params`), or an APIError: wrong model, unsupported fields, an empty or too long prompt, a bad
    max_tokens (at most `max_tokens_limit` and the room the prompt leaves in the `max_len` context, else 400
    context_length_exceeded naming it; absent: the default, or that room; 0 only with echo: score the prompt), bad
    sampling values. OpenAI's defaults: temperature 1."""
    check_request(body, model_name)
    is_chat = isinstance(body, ChatBody)
    echo = isinstance(body, CompletionBody) and bool(body.echo)
    name = "max_tokens"
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", body.max_completion_tokens
    score_only = echo and max_tokens == 0
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", "messages" if is_chat else "prompt")
    if n_prompt > max_len - (0 if score_only else 1):
        room = "" if score_only else f" (at most {max_len - 1}, to leave room for an answer)"
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt has "
                       f"{n_prompt}{room}", "messages" if is_chat else "prompt", "context_length_exceeded")
    if max_tokens is not None and max_tokens < 1 and not score_only:
        raise APIError(400, f"{name} must be at least 1 (0 only with echo, to score the prompt), got {max_tokens}",
                       name, "invalid_value")
    if max_tokens is not None and max_tokens_limit is not None and max_tokens > max_tokens_limit:
        raise APIError(400, f"{name} is {max_tokens}; this server allows at most {max_tokens_limit}", name,
                       "invalid_value")
    if max_tokens is not None and not score_only and n_prompt + max_tokens > max_len:  # as OpenAI / vLLM: no clamp
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt has {n_prompt} "
                       f"and {name} asks for {max_tokens} more (at most {max_len - n_prompt})", name,
                       "context_length_exceeded")
    if max_tokens is None:
        room = max_len - n_prompt  # the engine stops with 'length' when the context is full
        max_tokens = min(default_max_tokens or room, max_tokens_limit or room)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = None if body.top_p is None or body.top_p == 1 else body.top_p
    logprobs = prompt_logprobs = None
    if isinstance(body, CompletionBody):
        logprobs = body.logprobs
        if echo:  # the prompt is scored when its log-probs are asked for (or there is nothing else to do)
            prompt_logprobs = logprobs if logprobs is not None or not score_only else 0
    elif isinstance(body, ChatBody) and body.logprobs:
        logprobs = body.top_logprobs or 0
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=top_p,
                              seed=body.seed, stop=stop_strings(body.stop), ignore_eos=body.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise APIError(400, str(e), str(e).split()[0], "invalid_value") from e


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice `index` of a request: choice 0 has the request's own (as with n = 1), choice j > 0
    the seed `seed * 1_000_003 + j` (reproducible; left random when the request has no seed)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=int64_seed(params.seed * 1_000_003 + index))


# ---- responses ------------------------------------------------------------------------------------------------
def usage(n_prompt: int, n_output: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_output, "total_tokens": n_prompt + n_output}


@dataclass(frozen=True)
class Progress:
    """A snapshot of one choice's request, taken on the engine thread after a step that changed it."""

    index: int  # the choice
    text: str  # the stable text: never ends inside a possible stop string (the full text once finished)
    n_output: int
    finish_reason: str | None
    cut: bool = False  # it ended at a stop string (the text is cut before it)
    logprobs: tuple[TokenLogprob, ...] = ()  # log-probs recorded since the previous snapshot (if asked for)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # in the first snapshot (if asked for)


@dataclass(frozen=True)
class Scored:
    """One token of a log-probs answer: its id, log-prob entry (None: the first prompt token) and the offset of its
    first character in the choice's text."""

    token: int
    entry: TokenLogprob | None
    offset: int


class TokenSpeller:
    """Token ids as log-probs spell them, cached: (string, UTF-8 bytes). The string is the token's text, or, for a
    token that is not whole UTF-8 on its own (part of a character), OpenAI's `bytes:\\xNN...`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        got = self._cache.get(token)
        if got is None:
            got = self._cache[token] = self._spell(token)
        return got

    def _spell(self, token: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([token])
        if "\ufffd" not in text:
            return text, text.encode()
        piece = self.tokenizer.id_to_token(token) or ""  # byte-level BPE: one character per byte
        raw = bytes(_BYTE_OF[c] for c in piece) if piece and all(c in _BYTE_OF for c in piece) else text.encode()
        try:
            return raw.decode(), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def _byte_of() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table that byte-level BPE vocabularies are written in."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    hidden = [b for b in range(256) if b not in shown]
    return {chr(b): b for b in shown} | {chr(256 + i): b for i, b in enumerate(hidden)}


_BYTE_OF = _byte_of()


class TokenOffsets:
    """The decoded text of a growing list of ids and the character offset where each id's text starts (an id that
    ends inside a UTF-8 character starts where that character does)."""

    def __init__(self, tokenizer: Any) -> None:
        self._detok = Detokenizer(tokenizer)
        self.ids: list[int] = []
        self.offsets: list[int] = []

    def extend(self, ids: Sequence[int]) -> None:
        for t in ids:
            self.offsets.append(len(self._detok.text))
            self.ids.append(t)
            self._detok.update(self.ids)

    def text(self) -> str:
        """The whole text (a trailing incomplete character as U+FFFD)."""
        return self._detok.finish(self.ids)


@dataclass(frozen=True)
class Echo:
    """A /v1/completions prompt as `echo` returns it: the prompt the client sent, i.e. its ids after the
    `n_added` the server put first (the bos before a text prompt), their text and each one's offset in it. The
    added bos is not echoed but conditions the first echoed token, which so has a log-prob; only a prompt's very
    first token (of token ids, or of a text that starts with the bos itself) has none (null).

    Why not echo the bos too (as vLLM does)? lm-eval's local-completions slices `token_logprobs[ctxlen:-1]` with
    `ctxlen` counted in its own tokenizer's ids, which for text requests (tokenized_requests=False) leave out the
    bos unless that tokenizer adds it; an echoed bos would shift every score by one token."""

    ids: list[int]  # the echoed ids
    n_added: int
    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer: Any, ids: Sequence[int], n_added: int) -> Echo:
        track = TokenOffsets(tokenizer)
        track.extend(ids[n_added:])
        return cls(track.ids, n_added, track.text(), track.offsets)

    def scored(self, prompt_logprobs: Sequence[TokenLogprob | None]) -> list[Scored]:
        """The echoed tokens with their entries, from the prompt log-probs of the whole prompt."""
        entries = prompt_logprobs[self.n_added:]
        return [Scored(t, e, o) for t, e, o in zip(self.ids, entries, self.offsets, strict=True)]


class ChoiceLogprobs:
    """The log-probs of one choice's generated tokens, fed in as the request grows (`add`) and handed out once
    (`take`) when the text they belong to is sent. The entry of the stop token that ended the request (it has no
    text) sits at the end of the text; tokens of a stop string the text was cut before are dropped."""

    def __init__(self, tokenizer: Any, include_stop: bool) -> None:
        self.include_stop = include_stop
        self._track = TokenOffsets(tokenizer)
        self._entries: list[TokenLogprob] = []
        self._taken = 0

    def add(self, entries: Sequence[TokenLogprob], n_output: int) -> None:
        for e in entries:
            if len(self._track.ids) < n_output:  # one of the output's tokens (an entry past them: the stop token)
                self._track.extend([e.token])
            self._entries.append(e)

    def take(self, upto: int, final: bool = False, cut: bool = False) -> list[Scored]:
        """The entries not taken yet whose text starts before character `upto` of the text; final: `upto` is the
        whole text's length, and all the rest is taken (before `upto` only if the text was cut at a stop string)."""
        out = []
        while self._taken < len(self._entries):
            i = self._taken
            stop = i >= len(self._track.offsets)
            offset = upto if stop else self._track.offsets[i]
            if not final and (stop or offset >= upto):
                break
            self._taken += 1
            if (final and cut and offset >= upto) or (stop and not self.include_stop):
                continue
            out.append(Scored(self._entries[i].token, self._entries[i], offset))
        return out


def legacy_logprobs(items: Sequence[Scored], spell: TokenSpeller, base: int = 0) -> dict[str, list[Any]]:
    """`logprobs` of a /v1/completions choice (OpenAI's legacy format); offsets shifted by `base`. top_logprobs
    holds the most likely tokens and the chosen one ("up to logprobs + 1", as OpenAI and vLLM)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for x in items:
        out["tokens"].append(spell(x.token)[0])
        out["text_offset"].append(base + x.offset)
        if x.entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(x.entry.logprob)
        top: dict[str, float] = {}
        for tid, lp in (*x.entry.top, (x.entry.token, x.entry.logprob)):
            top.setdefault(spell(tid)[0], lp)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(items: Sequence[Scored], spell: TokenSpeller) -> dict[str, Any]:
    """`logprobs` of a chat choice or delta: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(tid: int, lp: float) -> dict[str, Any]:
        text, raw = spell(tid)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**one(x.token, x.entry.logprob), "top_logprobs": [one(t, lp) for t, lp in x.entry.top]}
                        for x in items if x.entry is not None]}


class CompletionChoice:
    """One choice of a /v1/completions answer built from its `Progress` snapshots: `step` returns what a snapshot
    adds, (text, logprobs or None); fed only the final snapshot, that is the whole choice. With echo, the prompt
    comes first (text and, with logprobs, its scored tokens), and offsets count from the prompt's start."""

    def __init__(self, spell: TokenSpeller, echo: Echo | None, logprobs: bool) -> None:
        self.spell, self.echo = spell, echo
        self.lp = ChoiceLogprobs(spell.tokenizer, include_stop=True) if logprobs else None
        self.sent = ""
        self.echoed = echo is None

    def step(self, p: Progress) -> tuple[str, dict[str, list[Any]] | None]:
        text, items = "", []
        if not self.echoed and self.echo is not None:
            self.echoed = True
            text = self.echo.text
            if p.prompt_logprobs is not None:
                items = self.echo.scored(p.prompt_logprobs)
        piece = _extend(self.sent, p.text)
        self.sent += piece
        base = len(self.echo.text) if self.echo is not None else 0
        if self.lp is None:
            return text + piece, None
        self.lp.add(p.logprobs, p.n_output)
        finished = p.finish_reason is not None
        gen = self.lp.take(len(p.text), final=finished, cut=p.cut)
        logprobs = legacy_logprobs(items, self.spell)
        for k, v in legacy_logprobs(gen, self.spell, base).items():
            logprobs[k] += v
        return text + piece, logprobs


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None = None,
                      finish_reason: str | None = None) -> dict[str, Any]:
    """One of the `choices` of a completion or of one of its stream chunks."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, reasoning: str, content: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None,
                      tool_calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One of the `choices` of a chat stream chunk (the delta holds only what is non-empty; tool_calls: the
    `ToolCall.delta()`s of calls completed since the previous chunk)."""
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = list(tool_calls)
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_first_choice(index: int) -> dict[str, Any]:
    """One of the `choices` of a chat stream's first chunk: the assistant role, no content yet."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def chat_message_choice(index: int, text: str, finish_reason: str | None, think: bool,
                        logprobs: dict[str, Any] | None = None,
                        tools: ToolCallParser | None = None) -> dict[str, Any]:
    """One of the `choices` of a finished chat completion (think: the reasoning split off into
    reasoning_content; tools: a fresh parser that splits the answer into content and `tool_calls`, the content
    null when there are calls and no text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if think:
        message["reasoning_content"], message["content"] = split_think(text, in_think=True)
    if tools is not None:
        content, calls = tools.parse(message["content"])
        message["content"] = content if content or not calls else None
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        finish_reason = tool_finish(finish_reason, tools)
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_finish(finish_reason: str | None, tools: ToolCallParser | None) -> str | None:
    """The finish_reason of a choice: "tool_calls" when the model stopped after calling tools (a choice cut
    by max_tokens stays "length")."""
    return "tool_calls" if tools is not None and tools.calls and finish_reason == "stop" else finish_reason


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
