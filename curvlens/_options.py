"""Validation of string-enum options, shared by every public function that takes one."""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)

__all__ = ["parse_option", "positive_int"]


def parse_option(cls: type[E], value: Any, what: str) -> E:
    """``cls(value)``, or a ``ValueError`` that names the option and lists the allowed values.

    Example:
        >>> from curvlens.layers import OnUnsupported
        >>> parse_option(OnUnsupported, "skip", "on_unsupported").value
        'skip'
    """
    try:
        return cls(value)
    except ValueError:
        raise ValueError(
            f"{what} must be one of {[v.value for v in cls]}, got {value!r}"
        ) from None


def positive_int(value: Any, what: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value
