"""Checking JSON values against the type hints of curvlens's dataclasses.

:func:`from_json_value` turns a value read from JSON into what a dataclass field of type ``tp``
holds, or raises ``ValueError`` naming where it sits and what was expected. It follows the type
hint itself (``int``, ``float``, ``str``, ``bool``, ``list[...]``, ``tuple[...]``,
``dict[str, ...]``, unions with ``None``, ``Literal``, string enums), so a field added to a
dataclass is checked without further code. Floats must be finite or NaN (``None`` reads as NaN,
as JSON has no NaN of its own) except the ends of a ``tuple[float, float]`` interval, which may
be unbounded; ints must be ints (``2.7``, ``2.0`` and ``True`` are not).

Example:
    >>> from_json_value([1, None], list[float], "sigma")
    [1.0, nan]
    >>> from_json_value(2.7, int, "top_k")
    Traceback (most recent call last):
    ...
    ValueError: top_k must be an int, got 2.7
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any

__all__ = ["field_types", "from_json_value"]

_NAN = float("nan")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: evaluated type hint}`` of a dataclass (computed once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where} must be {expected}, got {_short(value)}")


def from_json_value(value: Any, tp: Any, where: str, *, allow_inf: bool = False) -> Any:
    """``value`` checked against the type hint ``tp`` and converted (tuples, NaN for ``None``).

    Args:
        value: what JSON gave (or a Python value of the same shape).
        tp: the type hint, e.g. ``list[float]`` or ``tuple[int, int]``.
        where: how the error names the place, e.g. ``"layer 'fc': field 'sigma'"``.
        allow_inf: accept infinite floats (the ends of a ``tuple[float, float]`` interval may
            be unbounded; everywhere else a float is finite or NaN).

    Raises:
        ValueError: ``value`` does not fit ``tp``; the message starts with ``where``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return copy.deepcopy(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return from_json_value(value, arg, where)
            except ValueError as err:
                errors.append(str(err).removeprefix(f"{where} must be ").rsplit(", got", 1)[0])
        return _raise(where, " or ".join(errors + (["null"] if type(None) in args else [])),
                      value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _fail(where, f"one of {list(args)}", value)
    if tp is type(None):
        if value is None:
            return None
        raise _fail(where, "null", value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _fail(where, "an int", value)
    if tp is float:
        if value is None:
            return _NAN
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isinf(value) and not allow_inf:
                raise _fail(where, "a finite number or NaN", value)
            return float(value)
        raise _fail(where, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, "a string", value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value in allowed:
            return tp(value).value if not isinstance(value, enum.Enum) else value.value
        raise _fail(where, f"one of {allowed}", value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, "a list", value)
        item = args[0] if args else Any
        return [from_json_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            items = list(args)
            if len(value) != len(items):
                raise _fail(where, f"a list of {len(items)} entries", value)
        interval = items == [float, float]
        return tuple(from_json_value(v, t, f"{where}[{i}]", allow_inf=interval)
                     for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, "an object (a dict)", value)
        key_tp, val_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            out[from_json_value(k, key_tp, f"{where} key")] = from_json_value(
                v, val_tp, f"{where}[{k!r}]")
        return out
    return copy.deepcopy(value)  # a type this checker does not know: kept as read


def _raise(where: str, expected: str, value: Any) -> Any:
    raise _fail(where, expected, value)
