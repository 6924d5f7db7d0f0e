"""DeepSeek-V3 / R1 chat template as plain functions.

    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tok)
    # '<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>'
    ids = encode_chat(messages, tok)                 # the same, tokenised (user text never becomes specials)
    ids = encode_prompt(messages, tok)               # an inference prompt: only the template's markers are specials
    reasoning, answer = split_think(r1_output, in_think=True)

The layout follows DeepSeek-V3's `tokenizer_config.json`: bos, then every system message (joined by a blank
line), then `<｜User｜>{content}` per user turn and `<｜Assistant｜>{content}<｜end▁of▁sentence｜>` per assistant
turn; the generation prompt is `<｜Assistant｜>` (R1 style `<｜Assistant｜><think>\\n` with think=True). As in R1's
template, an assistant turn in the history keeps only what follows its last `</think>` unless keep_think=True.

Tools (`tools=[...]`, OpenAI's function definitions) add a `# Tools` section to the system prompt; an assistant
message with `tool_calls` ends in DeepSeek-V3's calls block, and `tool` messages become its tool outputs block,
after which the next assistant turn (or the generation prompt) follows `<｜tool▁outputs▁end｜>` with no
`<｜Assistant｜>`, as V3's template has it (layout and parsing: `nanoseek.infer.tools`). Where V3's template leaves
the outputs block open (a user message right after `tool` messages), it is closed before `<｜User｜>`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ..data.tokenizer import SPECIAL_TOKENS
from .tools import TOOL_TOKENS, call_pieces, forced_pieces, history_calls, tools_pieces, validate_tools

ROLES = ("system", "user", "assistant", "tool")
THINK, THINK_END = SPECIAL_TOKENS["think"], SPECIAL_TOKENS["think_end"]
_NEEDED = ("bos", "eos", "user", "assistant")


def chat_specials(tokenizer_or_specials: object | Mapping[str, str] | None = None) -> dict[str, str]:
    """The strings of bos, eos, user, assistant, think and think_end: DeepSeek's spellings (None), a mapping of
    those names to strings, or read from a tokenizer (`special_ids` + `id_to_token`, e.g. nanoseek's Tokenizer)."""
    if tokenizer_or_specials is None:
        found: dict[str, str] = dict(SPECIAL_TOKENS)
    elif isinstance(tokenizer_or_specials, Mapping):
        found = {k: v for k, v in tokenizer_or_specials.items() if isinstance(v, str)}
    else:
        ids = getattr(tokenizer_or_specials, "special_ids", None)
        to_token = getattr(tokenizer_or_specials, "id_to_token", None)
        if ids is None or to_token is None:
            raise TypeError("expected a tokenizer with special_ids and id_to_token, a mapping or None")
        found = {name: tok for name, tid in ids.items() if (tok := to_token(tid)) is not None}
    missing = [name for name in _NEEDED if name not in found]
    if missing:
        raise ValueError(f"the chat template needs the special tokens {', '.join(missing)} "
                         f"({', '.join(SPECIAL_TOKENS[m] for m in missing)}); this tokenizer lacks them")
    found.setdefault("think", THINK)
    found.setdefault("think_end", THINK_END)
    return found


def _need_tool_tokens(sp: Mapping[str, str], why: str) -> None:
    missing = [SPECIAL_TOKENS[k] for k in TOOL_TOKENS if k not in sp]
    if missing:
        raise ValueError(f"{why} needs DeepSeek-V3's tool-call tokens, which this tokenizer lacks "
                         f"({', '.join(missing)})")


def _content(i: int, message: Any) -> tuple[str, str]:
    """(role, content) of one message, validated. Content may be a string or OpenAI-style text parts."""
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "assistant" and message.get("tool_calls") and message.get("content") is None:
        return role, ""  # a turn that only calls tools
    if "content" not in message:
        raise ValueError(f"messages[{i}] has no 'content'")
    content = message["content"]
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': str}}")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    return role, content


def validate_messages(messages: Any) -> list[tuple[str, str]]:
    """[(role, content)] of an OpenAI-style message list; ValueError naming the first problem."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    turns = [_content(i, m) for i, m in enumerate(messages)]
    after_calls = False  # a `tool` message answers the calls of the assistant turn before it (system between is ok)
    for i, ((role, _), m) in enumerate(zip(turns, messages, strict=True)):
        if role == "assistant" and m.get("tool_calls"):
            history_calls(i, m["tool_calls"])
        if role == "tool" and not after_calls:
            raise ValueError(f"messages[{i}] has role 'tool' but does not follow an assistant message with tool_calls")
        if role != "system":
            after_calls = role == "tool" or (role == "assistant" and bool(m.get("tool_calls")))
    return turns


def strip_think(content: str, think_end: str = THINK_END) -> str:
    """What follows the last `</think>` (the whole content when there is none), as R1's template keeps it."""
    return content.rsplit(think_end, 1)[-1]


def _pieces(messages: Any, sp: dict[str, str], add_generation_prompt: bool, keep_think: bool,
            think: bool, tools: Sequence[Mapping[str, Any]] | None = None,
            forced_call: str | None = None) -> list[tuple[str, str]]:
    """The template as (kind, text) pieces: kind 'special' (one special token), 'call' (a tool-call marker the
    assistant writes: one special token), 'system', 'user', 'assistant' or 'tool' (text). Adjacent text pieces of
    one kind are joined (a Hugging Face tokenizer sees them as one text too)."""
    turns = validate_messages(messages)
    uses_tools = bool(tools) or forced_call is not None or any(r == "tool" for r, _ in turns) or any(
        r == "assistant" and m.get("tool_calls") for (r, _), m in zip(turns, messages, strict=True))
    if uses_tools:
        _need_tool_tokens(sp, "tool calling")
    system = "\n\n".join(c for r, c in turns if r == "system")
    out: list[tuple[str, str]] = [("special", sp["bos"]), ("system", system)]
    if tools:
        out += tools_pieces(validate_tools(tools), sp, after_system=bool(system))
    outputs = False  # inside a tool outputs block
    for (role, content), m in zip(turns, messages, strict=True):
        if role in ("user", "assistant") and outputs:
            out.append(("special", sp["tool_outputs_end"]))
        if role == "user":
            out += [("special", sp["user"]), ("user", content)]
        elif role == "assistant":
            text = content if keep_think else strip_think(content, sp["think_end"])
            out += ([] if outputs else [("special", sp["assistant"])]) + [("assistant", text)]
            if m.get("tool_calls"):
                out += call_pieces(history_calls(0, m["tool_calls"]), sp)
            out.append(("special", sp["eos"]))
        elif role == "tool":
            out += [("tool", "\n") if outputs else ("special", sp["tool_outputs_begin"]),
                    ("special", sp["tool_output_begin"]), ("tool", content), ("special", sp["tool_output_end"])]
        if role != "system":
            outputs = role == "tool"
    if outputs:
        out.append(("special", sp["tool_outputs_end"]))
    if add_generation_prompt:
        if not outputs:
            out.append(("special", sp["assistant"]))
        if think:
            out += [("special", sp["think"]), ("assistant", "\n")]
        if forced_call is not None:
            out += forced_pieces(forced_call or None, sp)
    joined: list[tuple[str, str]] = []
    for kind, text in out:
        if text and joined and kind == joined[-1][0] and kind not in ("special", "call"):
            joined[-1] = (kind, joined[-1][1] + text)
        elif text:
            joined.append((kind, text))
    return joined


def render_chat(
    messages: Sequence[Mapping[str, Any]], tokenizer_or_specials: object | Mapping[str, str] | None = None,
    add_generation_prompt: bool = True, keep_think: bool = False, think: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The DeepSeek-V3 prompt string of `messages` ([{role: system|user|assistant|tool, content: str}, ...];
    assistant messages may carry OpenAI `tool_calls`).

    tokenizer_or_specials: where the special-token spellings come from (see `chat_specials`; None = DeepSeek's).
    add_generation_prompt: end with `<｜Assistant｜>` so the model answers next (after tool results, their
    `<｜tool▁outputs▁end｜>` is the prompt); think: then open `<think>\\n` (R1). keep_think: keep the
    `<think>…</think>` part of assistant turns (R1's template drops it). tools: OpenAI function definitions,
    shown in the system prompt (`tools.tools_pieces`)."""
    sp = chat_specials(tokenizer_or_specials)
    return "".join(text for _, text in _pieces(messages, sp, add_generation_prompt, keep_think, think, tools))


def encode_chat(
    messages: Sequence[Mapping[str, Any]], tokenizer: Any, add_generation_prompt: bool = True,
    keep_think: bool = False, think: bool = False, return_mask: bool = False,
    special_roles: Collection[str] = ("system", "assistant"), tools: Sequence[Mapping[str, Any]] | None = None,
    forced_call: str | None = None,
) -> list[int] | tuple[list[int], list[int]]:
    """Token ids of `render_chat(...)`: the template's own markers become special ids, and user content is encoded
    as plain text, so a user who types `<｜Assistant｜>` cannot forge a turn. The content of the roles in
    `special_roles` (system and assistant by default, never user) may contain specials, e.g. the `<think>` tags of
    a kept reasoning section in SFT data; inference prompts use `encode_prompt`, where no content may.

    return_mask: also a 0/1 list marking what SFT trains on: assistant content, its tool calls (markers included)
    and the end-of-sentence token that closes each assistant turn (not the system/user/tool text or the
    template's markers). tools: see `render_chat`; forced_call: see `encode_prompt`."""
    sp = chat_specials(tokenizer)
    special_ok = set(special_roles) - {"user"}
    ids: list[int] = []
    mask: list[int] = []
    prev = ""
    for kind, text in _pieces(messages, sp, add_generation_prompt, keep_think, think, tools, forced_call):
        if kind in ("special", "call"):
            tid = tokenizer.token_to_id(text)
            new = [tid] if tid is not None else tokenizer.encode(text, allow_special=True)
        else:
            new = tokenizer.encode(text, allow_special=kind in special_ok)
        trained = kind in ("assistant", "call") or (
            kind == "special" and text == sp["eos"] and prev in ("assistant", "call"))
        ids += new
        mask += [int(trained)] * len(new)
        prev = kind
    return (ids, mask) if return_mask else ids


def encode_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Any, think: bool = False,
                  tools: Sequence[Mapping[str, Any]] | None = None, forced_call: str | None = None) -> list[int]:
    """The prompt ids of a chat request (`nanoseek serve`, `nanoseek chat`, `nanoseek generate --chat`), with the
    generation prompt: `encode_chat` with all message content (system, user, assistant, tool, tool definitions
    and call arguments) encoded as plain text, so special tokens come only from the template. Neither a user who
    types `<｜Assistant｜>`, `<｜User｜>` or `<｜end▁of▁sentence｜>` nor an earlier answer or tool result that echoed
    one can forge a turn or a call. forced_call: after the generation prompt, open a tool call the model must
    complete ('': of any function, tool_choice 'required'; a name: of that function; see `tools.forced_pieces`)."""
    return encode_chat(messages, tokenizer, think=think, special_roles=(), tools=tools,  # type: ignore[return-value]
                       forced_call=forced_call)


def split_think(text: str, in_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of an R1-style output `[<think>]reasoning</think>answer`, both stripped of surrounding
    whitespace. The first `</think>` ends the reasoning. in_think: the prompt already opened `<think>` (think=True),
    so an output with no `</think>` yet is all reasoning; otherwise only a leading `<think>` opens one."""
    if not in_think:
        rest = text.lstrip()
        if not rest.startswith(THINK):
            return "", text.strip()
        text = rest[len(THINK):]
    reasoning, found, answer = text.partition(THINK_END)
    return reasoning.strip(), answer.strip() if found else ""
