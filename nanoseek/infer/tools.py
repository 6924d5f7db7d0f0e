"""Tool calls as DeepSeek-V3 writes them: tool definitions into the prompt, the model's call tokens back into
OpenAI `tool_calls`.

    choice = tool_choice(body_tools, "auto")            # validated tools + tool_choice (ToolChoiceError)
    parser = choice.parser()                            # or ToolCallParser(names={"get_weather"})
    for piece in text_pieces:                           # detokenised text, split anywhere
        content, calls = parser.feed(piece)             # content to show, calls completed by this piece
    content, calls = parser.finish()                    # the end of the output: what was held back
    message["tool_calls"] = [c.openai() for c in parser.calls]

The layout is that of the chat template in DeepSeek-V3-0324's `tokenizer_config.json` (deepseek-ai/DeepSeek-V3-0324
on the Hugging Face hub; V3's and R1's are the same but for a few template bugs), which vLLM's
`deepseekv3_tool_parser.py` and SGLang's DeepSeekV3Detector parse: an assistant turn that calls tools is

    <｜Assistant｜>[content]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and the `tool` messages that answer it follow as
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>OUT<｜tool▁output▁end｜>[\\n<｜tool▁output▁begin｜>...]<｜tool▁outputs▁end｜>`,
after which the model answers with no `<｜Assistant｜>` (so the generation prompt after tool results is the
`<｜tool▁outputs▁end｜>` itself). DeepSeek's own templates take the tool definitions from the caller's system
prompt; like vLLM's `tool_chat_template_deepseekv3.jinja` (for V3-0324), nanoseek writes them there itself
(`tools_pieces`): the system prompt, a blank line, then a `# Tools` section with one JSON signature per line and
the call format spelled with the real special tokens (vLLM's wording, sentences on their own lines, without its
`<｜end▁of▁sentence｜>`: an end-of-sentence inside a prompt reads as a document boundary to a pre-trained model).

The parser is one state machine for streaming and non-streaming (non-streaming feeds everything at once), so the
calls and content never depend on how the text was split into pieces. A call is sent whole once its
`<｜tool▁call▁end｜>` arrives and it checks out (a known function, arguments a JSON object); arguments are not
streamed token by token, so a stream never has to take back a call it began. Anything malformed comes back as
content, verbatim with its markers: a call with bad JSON, an unknown function, no `<｜tool▁sep｜>`, or left
unterminated when the output ends (text between the calls of a block other than whitespace is content too); the
parser never raises. A suffix that could still grow into a marker is held back until it is decided. The V3.1
spelling `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` is read too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.tokenizer import SPECIAL_TOKENS
from .engine import stop_holdback

TOOL_TOKENS = tuple(k for k in SPECIAL_TOKENS if k.startswith("tool_"))  # the names of the 9 tool tokens
CALLS_BEGIN, CALLS_END = SPECIAL_TOKENS["tool_calls_begin"], SPECIAL_TOKENS["tool_calls_end"]
CALL_BEGIN, CALL_END = SPECIAL_TOKENS["tool_call_begin"], SPECIAL_TOKENS["tool_call_end"]
SEP = SPECIAL_TOKENS["tool_sep"]
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's function names (plus '.', as vLLM allows)
MAX_TOOLS = 128  # OpenAI's limit

Piece = tuple[str, str]  # (kind, text) as nanoseek.infer.chat's template pieces: kind 'special' is one token


class ToolChoiceError(ValueError):
    """A bad `tools` or `tool_choice`; `param` names which."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---- tool definitions -----------------------------------------------------------------------------------------
def validate_tools(tools: Any) -> list[Mapping[str, Any]]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]; returned as
    given (the prompt shows them as sent). ToolChoiceError naming the first problem."""
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise ToolChoiceError("tools", f"tools must be a list of function definitions, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise ToolChoiceError("tools", f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(fn, Mapping):
            raise ToolChoiceError("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolChoiceError("tools", f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '-' "
                                  f"or '.', got {name!r}")
        if name in seen:
            raise ToolChoiceError("tools", f"tools[{i}].function.name {name!r} is defined twice")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise ToolChoiceError("tools", f"tools[{i}].function.description must be a string")
        if not isinstance(fn.get("parameters", {}), Mapping):
            raise ToolChoiceError("tools", f"tools[{i}].function.parameters must be a JSON Schema object")
    return list(tools)


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The JSON signatures of `tools`, one per line (as Jinja's `tojson`: `json.dumps` with ensure_ascii off)."""
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def tools_pieces(tools: Sequence[Mapping[str, Any]], sp: Mapping[str, str], after_system: bool) -> list[Piece]:
    """The `# Tools` section of the system prompt (see the module docstring), as template pieces: 'system' text
    and the call format's markers as 'special' tokens. after_system: a system prompt precedes (a blank line
    between)."""
    head = ("\n\n" if after_system else "") + (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tools_text(tools)}\n</tools>\n\nFor function call returns, you should first print ")
    return [("system", head), ("special", sp["tool_calls_begin"]),
            ("system", "\nFor each function call, you should return object like:\n"),
            ("special", sp["tool_call_begin"]), ("system", "function"), ("special", sp["tool_sep"]),
            ("system", "<function_name>\n```json\n<function_arguments_in_json_format>\n```"),
            ("special", sp["tool_call_end"]),
            ("system", "\nAt the end of function call returns, you should print "),
            ("special", sp["tool_calls_end"])]


# ---- calls in the history -------------------------------------------------------------------------------------
def history_calls(i: int, calls: Any) -> list[tuple[str, str]]:
    """[(name, arguments)] of messages[i].tool_calls, an assistant message's OpenAI `tool_calls` ([{"type":
    "function", "function": {"name", "arguments"}}]); arguments as sent (a JSON string, or an object written as
    JSON). ValueError naming the field."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, Sequence) or isinstance(calls, str | bytes) or not calls:
        raise ValueError(f"{where} must be a non-empty list of {{'type': 'function', 'function': {{...}}}}")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or c.get("type", "function") != "function":
            raise ValueError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        name, args = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}[{j}].function.name must be a non-empty string")
        if isinstance(args, Mapping):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise ValueError(f"{where}[{j}].function.arguments must be a JSON string, got {type(args).__name__}")
        out.append((name, args))
    return out


def call_pieces(calls: Sequence[tuple[str, str]], sp: Mapping[str, str]) -> list[Piece]:
    """The calls block of an assistant turn. Kind 'call' is a marker the assistant writes (a special token that
    SFT trains on, unlike the template's own 'special' markers); names and arguments are 'assistant' text."""
    out: list[Piece] = [("call", sp["tool_calls_begin"])]
    for k, (name, args) in enumerate(calls):
        if k:
            out.append(("assistant", "\n"))
        out += [("call", sp["tool_call_begin"]), ("assistant", "function"), ("call", sp["tool_sep"]),
                ("assistant", f"{name}\n```json\n{args}\n```"), ("call", sp["tool_call_end"])]
    return out + [("call", sp["tool_calls_end"])]


def forced_pieces(name: str | None, sp: Mapping[str, str]) -> list[Piece]:
    """What tool_choice 'required' (name None) or a named function puts after the generation prompt, so that the
    model can only go on with a call (of that function): the calls block opened, then `function<｜tool▁sep｜>`
    (and `NAME\\n```json\\n`)."""
    out: list[Piece] = [("special", sp["tool_calls_begin"]), ("special", sp["tool_call_begin"]),
                        ("assistant", "function"), ("special", sp["tool_sep"])]
    return out + ([("assistant", f"{name}\n```json\n")] if name is not None else [])


# ---- tool_choice ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolChoice:
    """A request's validated tools and tool_choice. mode: 'none' (tools neither shown nor parsed), 'auto',
    'required' (some call is forced) or 'function' (a call of `name` is forced)."""

    tools: list[Mapping[str, Any]]
    mode: str = "auto"
    name: str | None = None

    @property
    def rendered(self) -> list[Mapping[str, Any]]:
        """The tools the prompt shows (none with tool_choice 'none', as vLLM by default)."""
        return [] if self.mode == "none" else self.tools

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    def prefix(self, sp: Mapping[str, str] | None = None) -> str:
        """The text forced after the generation prompt ('' unless forced): where the parser starts."""
        if not self.forced:
            return ""
        return "".join(t for _, t in forced_pieces(self.name, sp or SPECIAL_TOKENS))

    def parser(self) -> ToolCallParser | None:
        """A parser of the output (None with no tools or tool_choice 'none': the output is all content). With a
        forced call it starts inside that call; if the model botches it, the text from `<｜tool▁call▁begin｜>` on,
        the forced part included, comes back as content."""
        if not self.rendered:
            return None
        return ToolCallParser(tool_names(self.tools), start=self.prefix())


def tool_choice(tools: Any, choice: Any) -> ToolChoice:
    """The ToolChoice of a request's `tools` (None: none) and `tool_choice` (None: 'auto' with tools, as OpenAI;
    'none', 'auto', 'required' or {"type": "function", "function": {"name": NAME}}). ToolChoiceError naming the
    field."""
    tools = validate_tools(tools) if tools is not None else []
    if choice is None or choice == "none":
        return ToolChoice(tools, "none" if choice == "none" or not tools else "auto")
    if isinstance(choice, str):
        if choice not in ("auto", "required"):
            raise ToolChoiceError("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or "
                                  f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
        mode, name = choice, None
    else:
        fn = choice.get("function") if isinstance(choice, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
            raise ToolChoiceError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        mode = "function"
    if not tools:
        raise ToolChoiceError("tool_choice", f"tool_choice {choice!r} needs tools")
    if name is not None and name not in tool_names(tools):
        raise ToolChoiceError("tool_choice", f"tool_choice names the function {name!r}, which is not in tools "
                              f"({', '.join(tool_names(tools))})")
    return ToolChoice(tools, mode, name)


# ---- parsing the output ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    """One parsed call: its position among the output's calls, an id, the function and its JSON arguments (the
    text the model wrote, checked to be a JSON object)."""

    index: int
    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        """The call as a message's `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def delta(self) -> dict[str, Any]:
        """The call as a stream chunk's `delta.tool_calls` entry (whole: its index, id, name and arguments)."""
        return {"index": self.index, **self.openai()}


def parse_call(body: str, names: Collection[str] | None) -> tuple[str, str] | None:
    """(name, arguments) of what stands between `<｜tool▁call▁begin｜>` and `<｜tool▁call▁end｜>`, or None if it is
    malformed: `function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```` (V3) or `NAME<｜tool▁sep｜>ARGS` (V3.1), with a
    known NAME (any, if names is None) and ARGS a JSON object."""
    kind, found, rest = body.partition(SEP)
    if not found:
        return None
    if kind.strip() == "function":
        name, _, args = rest.partition("\n")
    else:
        name, args = kind, rest
    name, args = name.strip(), args.strip()
    if args.startswith("```"):
        args = args.removeprefix("```json") if args.startswith("```json") else args[3:]
        if not args.endswith("```"):
            return None
        args = args[:-3].strip()
    if not name or (names is not None and name not in names):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return (name, args) if isinstance(value, dict) else None


class ToolCallParser:
    """Splits a model's output, fed in pieces, into content and tool calls (see the module docstring).

    `feed(text)` and `finish()` return (content, calls): the content that is now certain and the calls completed
    since the last call. `content` and `calls` hold everything so far. names: the known functions (None: any).
    start: text the output continues (the forced prefix of tool_choice 'required' or a named function)."""

    def __init__(self, names: Collection[str] | None = None, start: str = "") -> None:
        self.names = None if names is None else frozenset(names)
        self.content = ""
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not decided yet
        self._in_call = False  # after a <｜tool▁call▁begin｜> (the call's text is in _buf)
        self._in_block = False  # after a <｜tool▁calls▁begin｜>: whitespace between calls is not content
        if start:
            self.feed(start)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: text held back is content, and so is a call left open (with its marker)."""
        return self._run(final=True)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output at once (a fresh parser's feed + finish)."""
        c1, k1 = self.feed(text)
        c2, k2 = self.finish()
        return c1 + c2, k1 + k2

    def _run(self, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        new: list[ToolCall] = []
        while True:
            markers = (CALL_END, CALL_BEGIN, CALLS_BEGIN, CALLS_END) if self._in_call else (
                (CALL_BEGIN, CALLS_BEGIN, CALLS_END) if self._in_block else (CALL_BEGIN, CALLS_BEGIN))
            at, marker = min(((i, m) for m in markers if (i := self._buf.find(m)) >= 0), default=(-1, ""))
            if at < 0:  # nothing decided until a marker (or the end) comes, except plain text outside a block
                if final:
                    out.append(CALL_BEGIN + self._buf if self._in_call else self._gap(self._buf))
                    self._buf, self._in_call = "", False
                elif not self._in_call and not self._in_block:
                    keep = stop_holdback(self._buf, markers)
                    out.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                break
            head, self._buf = self._buf[:at], self._buf[at + len(marker):]
            if self._in_call:
                self._in_call = False
                call = parse_call(head, self.names) if marker == CALL_END else None
                if call is not None:
                    new.append(ToolCall(len(self.calls) + len(new), f"call_{uuid.uuid4().hex[:24]}", *call))
                    continue
                out.append(CALL_BEGIN + head + (CALL_END if marker == CALL_END else ""))
                if marker == CALL_END:
                    continue
            else:
                out.append(self._gap(head))
            if marker == CALL_BEGIN:
                self._in_call = True
            else:
                self._in_block = marker == CALLS_BEGIN
        content = "".join(out)
        self.content += content
        self.calls += new
        return content, new

    def _gap(self, text: str) -> str:
        """Text between markers: content, except whitespace between the calls of a block."""
        return text if not self._in_block or text.strip() else ""
