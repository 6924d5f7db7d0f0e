"""One way to set and check every configuration object: `KEY=VALUE` overrides typed by the dataclass annotations.

A config class declares each field's allowed range once, next to its default::

    @dataclass
    class GRPOConfig:
        lr: float = param(1e-4, POSITIVE)
        eps_high: float | None = param(None, NON_NEGATIVE)

        def __post_init__(self) -> None:
            check_fields(self)

`check_fields` checks (and normalises: lists -> tuples, ints -> floats) every field against its type annotation and
range; `parse_field` turns the text of a `--set`, `--knob` or JSON value into the annotated type; `override` applies
`KEY=VALUE` strings to a config. Every error is a one-line ConfigError naming the field, the value and what is
allowed, e.g. ``lr must be a positive number, got -1``.

This module is a leaf: it imports nothing from nanoseek.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that is malformed or inconsistent; the one-line message names the field."""


@dataclass(frozen=True)
class Range:
    """Allowed numeric values: lo <= v <= hi (strict where `lo_open` / `hi_open`); None: unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self, noun: str) -> str:
        """'a positive integer', 'a number in [0, 1]', 'an integer >= 2' ..."""
        if self.hi is None and self.lo == 0:
            return f"a {'positive' if self.lo_open else 'non-negative'} {noun}"
        article = "an" if noun[0] in "aeiou" else "a"
        if self.hi is None and self.lo is not None:
            return f"{article} {noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None and self.hi is not None:
            return f"{article} {noun} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        if self.lo is None:
            return f"{article} {noun}"
        return (f"{article} {noun} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                f"{')' if self.hi_open else ']'}")


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # a share of a run, a ratio of two learning rates


def at_least(n: float) -> Range:
    return Range(n)


def param(default: Any = dataclasses.MISSING, allowed: Range | None = None, *,
          default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its allowed range (checked by `check_fields`; numbers only, also inside tuples)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"range": allowed})


# ---- checking values against annotations ---------------------------------------------------------------------------
class _Mismatch(Exception):
    pass


_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _seq_items(tp: Any) -> tuple[list[Any], bool]:
    """Element types of tuple[...] / list[...] and whether the length is fixed."""
    args = list(get_args(tp))
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        return args, True
    return args[:1] or [Any], False


def describe(tp: Any, rng: Range | None = None) -> str:
    """What a value of annotation `tp` within `rng` may be, in words."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " or ".join(describe(a, rng) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return (rng or Range()).describe("integer")
    if tp is float:
        return (rng or Range()).describe("number")
    if tp is str:
        return "a string"
    if get_origin(tp) in (tuple, list):
        items, fixed = _seq_items(tp)
        each = describe(items[0], rng) if len(set(items)) == 1 else "; ".join(describe(a, rng) for a in items)
        count = f"{len(items)} " if fixed else ""
        return f"{count}comma-separated values, each {each}"
    if tp is dict or get_origin(tp) is dict:
        return "a JSON object"
    return f"a {getattr(tp, '__name__', tp)}"


def _check(tp: Any, v: Any, rng: Range | None) -> Any:
    """`v` normalised to annotation `tp` (lists -> tuples, ints -> floats); _Mismatch when it does not fit."""
    if tp is Any:
        return v
    if tp is type(None):
        if v is None:
            return None
        raise _Mismatch
    if _is_union(tp):
        for a in get_args(tp):
            try:
                return _check(a, v, rng)
            except _Mismatch:
                continue
        raise _Mismatch
    if get_origin(tp) is Literal:
        if any(v == a and type(v) is type(a) for a in get_args(tp)):
            return v
        raise _Mismatch
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _Mismatch
    if tp in (int, float):
        ok_types = (int,) if tp is int else (int, float)
        if isinstance(v, bool) or not isinstance(v, ok_types) or not math.isfinite(v) or (rng and v not in rng):
            raise _Mismatch
        return float(v) if tp is float else v
    if tp is str:
        if isinstance(v, str):
            return v
        raise _Mismatch
    if get_origin(tp) in (tuple, list):
        items, fixed = _seq_items(tp)
        if not isinstance(v, (tuple, list)) or (fixed and len(v) != len(items)):
            raise _Mismatch
        out = [_check(items[i] if fixed else items[0], x, rng) for i, x in enumerate(v)]
        return tuple(out) if get_origin(tp) is tuple else out
    if tp is dict or get_origin(tp) is dict:
        if isinstance(v, dict):
            return v
        raise _Mismatch
    if isinstance(tp, type) and not isinstance(v, tp):
        raise _Mismatch
    return v


def _parse(tp: Any, text: str) -> Any:
    """The text of a value (command line, `--knob`) as annotation `tp`; _Mismatch when it cannot be."""
    s = text.strip()
    if tp is Any:
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return text
    if tp is type(None):
        if s.lower() in _NONE_WORDS:
            return None
        raise _Mismatch
    if _is_union(tp):
        args = get_args(tp)
        if type(None) in args and s.lower() in _NONE_WORDS:
            return None
        for a in args:
            try:
                return _parse(a, text)
            except _Mismatch:
                continue
        raise _Mismatch
    if get_origin(tp) is Literal:
        for a in get_args(tp):
            if str(a) == s:
                return a
        raise _Mismatch
    if tp is bool:
        if s.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[s.lower()]
        raise _Mismatch
    if tp in (int, float):
        try:
            return tp(s)
        except ValueError:
            raise _Mismatch from None
    if tp is str:
        return text
    if get_origin(tp) in (tuple, list):
        items, fixed = _seq_items(tp)
        inner = s[1:-1] if s[:1] + s[-1:] in ("()", "[]") else s
        parts = inner.split(",") if inner.strip() else []
        if fixed and len(parts) != len(items):
            raise _Mismatch
        out = [_parse(items[i] if fixed else items[0], p) for i, p in enumerate(parts)]
        return tuple(out) if get_origin(tp) is tuple else out
    if tp is dict or get_origin(tp) is dict:
        try:
            v = json.loads(s)
        except json.JSONDecodeError:
            raise _Mismatch from None
        if isinstance(v, dict):
            return v
        raise _Mismatch
    raise _Mismatch


def _error(name: str, tp: Any, rng: Range | None, value: Any) -> ConfigError:
    return ConfigError(f"{name} must be {describe(tp, rng)}, got {value!r}")


def check_value(name: str, tp: Any, value: Any, rng: Range | None = None) -> Any:
    """`value` normalised to annotation `tp` within `rng`, else a ConfigError naming `name`."""
    try:
        return _check(tp, value, rng)
    except _Mismatch:
        raise _error(name, tp, rng, value) from None


def parse_value(name: str, tp: Any, text: str, rng: Range | None = None) -> Any:
    """The text `text` as annotation `tp` within `rng`, else a ConfigError naming `name`."""
    try:
        value = _parse(tp, text)
    except _Mismatch:
        raise _error(name, tp, rng, text) from None
    try:
        return _check(tp, value, rng)
    except _Mismatch:
        raise ConfigError(f"{name} must be {describe(tp, rng)}, got {text.strip()}") from None


# ---- dataclass fields ----------------------------------------------------------------------------------------------
@functools.cache
def type_hints(cls_or_function: Any) -> dict[str, Any]:
    """The resolved annotations of a class or function (cached)."""
    return typing.get_type_hints(cls_or_function)


def field_names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_spec(cls: Any, name: str) -> tuple[Any, Range | None]:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return type_hints(cls if isinstance(cls, type) else type(cls))[name], f.metadata.get("range")


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance `obj` by its annotation and declared range; normalise in place."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(f.name, hints[f.name], value, f.metadata.get("range"))
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def parse_field(cls: Any, name: str, text: str) -> Any:
    """The text of a `--set` value for field `name` of dataclass `cls`, typed by its annotation."""
    tp, rng = _field_spec(cls, name)
    return parse_value(name, tp, text, rng)


def unknown_key(key: str, valid: Iterable[str], what: str = "field") -> ConfigError:
    """"unknown field 'lrr'; did you mean 'lr'?", with the valid names when they are few or none is close."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=3)
    hints = []
    if close:
        quoted = [repr(c) for c in close]
        alternatives = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        hints.append(f"did you mean {alternatives}?")
    if not close or len(valid) <= 12:
        hints.append(f"valid: {', '.join(valid)}")
    return ConfigError(f"unknown {what} {key!r}; {' '.join(hints)}")


def parse_assignments(items: Iterable[str] | None, flag: str = "--set") -> dict[str, str]:
    """`["lr=1e-3", "betas=0.9,0.95"]` -> `{"lr": "1e-3", "betas": "0.9,0.95"}` (the later of two equal keys wins)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def override(cfg: T, sets: Iterable[str] | Mapping[str, str], what: str | None = None) -> T:
    """A copy of dataclass `cfg` with `KEY=VALUE` strings (or a {key: text} mapping) applied and checked."""
    pairs = sets if isinstance(sets, Mapping) else parse_assignments(sets)
    names = field_names(cfg)
    changes = {}
    for key, text in pairs.items():
        if key not in names:
            raise unknown_key(key, names, what or f"{type(cfg).__name__} field")
        changes[key] = parse_field(type(cfg), key, text)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
