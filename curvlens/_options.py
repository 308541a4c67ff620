"""Validation of string-enum options, shared by every public function that takes one."""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)

__all__ = ["parse_option"]


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
