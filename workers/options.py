"""Declared options: a dataclass field with its default, documentation and valid range, and the one
parser that builds such a dataclass from a TOML table or a plain dict.

Spec sections (orchestrator.spec), [train] (workers.train_options) and the options of built-in
datasets and models are declared with `option`, so that validation, the list of valid keys in
errors, and docs/spec.md share one source. The spec parses with `parse_section` and raises its
SpecError; a built-in loader called directly (`load_dataset({...})` from a notebook or a test)
parses its options with the same checks and raises its own error class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

from workers.errors import LongtailError


class SetupError(LongtailError, ValueError):
    """A campaign's inputs cannot be used (a plug-in that does not import, a model that does not fit the
    data, a dataset with wrong shapes); found before any compute, the message says where and why."""


REQUIRED = object()  # marker default: the key must be given


def positive(v) -> bool:
    return v > 0


def nonnegative(v) -> bool:
    return v >= 0


def option(default, doc: str, check: Callable[[Any], bool] | None = None, expect: str = "",
           affects_results: bool = True, neutral_default: bool = False):
    """A field: `check(value)` must hold, `expect` says in words what it accepts; `affects_results`
    marks keys whose change would change what a run produces (a resume with another value is refused).
    `neutral_default` marks keys added after campaigns existed whose default is the old behaviour: at
    their default they are left out of the spec hash, so that those campaigns still resume."""
    meta = {"doc": doc, "check": check, "expect": expect, "affects_results": affects_results,
            "neutral_default": neutral_default}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    """A declared field's default (a fresh copy for lists)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def defaults(cls, keys: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """{key: default} of an options dataclass (of `keys` only, in their order, when given)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {k: default_of(fields[k]) for k in (fields if keys is None else keys)}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def describe_keys(cls) -> str:
    """Every key of `cls` with its default and meaning, one per line (for "unknown key" errors)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = "(required)" if f.default is REQUIRED else f"= {toml_value(default_of(f))}"
        lines.append(f"  {f.name} {default}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, t) for t in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported option type {tp}")


def type_name(tp) -> str:
    """A type as the spec writes it in errors (TOML's true/false, not Python's)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(t) for t in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _floats(tp) -> bool:
    """Whether the numbers a field of type `tp` holds (alone or in lists) are floats."""
    return tp is float or any(_floats(t) for t in typing.get_args(tp))


def _coerce(value, tp):
    """Integers written where numbers are expected become floats (`lr = 1` means 1.0)."""
    if not _floats(tp):
        return value
    if isinstance(value, list):
        return [float(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def parse_section(cls, raw: dict, where: str, error: type[Exception] = SetupError, noun: str = "key",
                  check_defaults: bool = True, hint: str = ""):
    """Build options dataclass `cls` from the table `raw`; errors are `error`, start with `where`
    ("[train] in x.toml", "dataset 'mnist'"), call a key a `noun` and end with `hint`.

    With check_defaults=False a value equal to its default is accepted unchecked: a loader receives
    the spec's resolved section, defaults included, and an "unset" default (a "" root) is explained
    by the loader itself, in words that say what to set."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a table, found {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise error(f"{where}: unknown {noun}(s) {', '.join(unknown)}{hint}. Valid {noun}s:\n{describe_keys(cls)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is REQUIRED:
                raise error(f"{where}: missing required {noun} '{name}' ({f.metadata['doc']}); "
                            f"expected {f.metadata['expect'] or type_name(hints[name])}{hint}")
            continue
        value = raw[name]
        if not check_defaults and type(value) is type(f.default) and value == f.default:
            values[name] = value
            continue
        tp = hints[name]
        if not type_ok(value, tp):
            raise error(f"{where}: {noun} '{name}' must be {type_name(tp)}, found {value!r} "
                        f"({type(value).__name__}){hint}")
        value = _coerce(value, tp)
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise error(f"{where}: {noun} '{name}' must be {f.metadata['expect']}, found {value!r}{hint}")
        values[name] = value
    return cls(**values)
