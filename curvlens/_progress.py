"""Progress bars that stay out of logs.

Every tqdm bar of curvlens is made here with ``disable=None``: tqdm shows it when its output
stream is a terminal and disables it otherwise, so a run redirected to a file gets no bar lines
at all (never one line per batch). ``enabled=False`` turns a bar off whatever the stream.

Example:
    >>> bar = progress_bar(range(3), enabled=False)
    >>> list(bar)
    [0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "progress_write"]


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), quiet off a terminal.

    Args:
        iterable: what to iterate, or ``None`` for a bar driven by ``update``.
        enabled: ``False`` disables the bar (it still iterates, ``update``/``close`` are no-ops).
        **kwargs: passed to ``tqdm`` (``total``, ``desc``, ``unit``, ``leave``, ...).

    Returns:
        A ``tqdm`` object.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def progress_write(text: str) -> None:
    """Print a line without breaking an active bar (``tqdm.write``)."""
    from tqdm.auto import tqdm

    tqdm.write(text)
