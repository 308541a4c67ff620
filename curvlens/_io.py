"""File reading and writing shared by the report writers and the command line.

* :func:`atomic_write` writes a whole file or nothing (:func:`atomic_write_text` for text; plots
  and ``.npz`` archives go through it too): a temporary file in the target's
  directory, flushed and synced, then ``os.replace``. The result has the permissions a plain
  ``open(path, "w")`` would give (an existing file keeps its mode, a new one gets
  ``0o666 & ~umask``); a symbolic link is followed (its target is replaced, the link stays);
  the temporary file is removed on any error, on ``KeyboardInterrupt`` and on ``SIGTERM``
  (when the write runs in the main thread and nobody else handles ``SIGTERM``; the process
  then still ends by ``SIGTERM``).
* :func:`read_text` and :func:`read_json` turn every way a file can be unreadable (missing, a
  directory, no permission, binary, empty, not JSON) into one-line errors naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_text", "read_json", "read_text", "save_figure"]


class _Terminated(BaseException):
    """Raised inside a write when ``SIGTERM`` arrives, so that cleanup runs first."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[bool]:
    """Turn ``SIGTERM`` into :class:`_Terminated` for the duration (main thread, default handler
    only); yields whether it did."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield False
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly visible to other threads)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path`` as a :class:`Path`."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a binary file that becomes ``path`` only once ``write`` returns.

    Args:
        path: the file to create or replace.
        write: writes the whole content to the open binary file it is given (for example
            ``lambda fh: fig.savefig(fh, format="png")``); an error it raises leaves ``path`` as
            it was.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        IsADirectoryError: ``path`` (or what its link points to) is a directory.
        OSError: the directory cannot be created or written; the old file is left as it was.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))  # follow symbolic links: replace the target
    if target.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    tmp = None
    terminated = False
    with _sigterm_raises():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                       dir=target.parent)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            tmp = None
        except _Terminated:
            terminated = True
        finally:
            _remove(tmp)
    if terminated:  # cleaned up: now end the way SIGTERM ends a process
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM)  # pragma: no cover (not reached)
    return path


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib ``Figure`` (with a canvas attached) to ``path`` atomically, in the format
    its suffix names (PNG when it has none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi))


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, unreadable, not UTF-8 text, or empty; the message names the
            file and ``what`` was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not a {what}: it is binary, not UTF-8 text") from None
    except OSError as err:
        raise ValueError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if not text.strip():
        raise ValueError(f"{str(path)!r} is empty, not a {what}")
    return text


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path`` (``NaN`` and ``Infinity`` accepted, as Python writes them).

    Raises:
        FileNotFoundError: no such file.
        ValueError: anything :func:`read_text` rejects, or invalid or truncated JSON.
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(Path(path))!r} is not valid JSON ({err}); is it a "
                         f"{what}?") from None
