"""Progress bars stay out of logs: quiet when the stream is not a terminal."""

from __future__ import annotations

import io

from curvlens._progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_writes_nothing_to_a_file_and_still_iterates():
    log = io.StringIO()
    assert list(progress_bar(range(50), desc="epoch", file=log)) == list(range(50))
    bar = progress_bar(total=10, file=log)
    bar.update(10)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert log.getvalue() == ""


def test_bar_shows_on_a_terminal_and_can_be_turned_off():
    term = _Terminal()
    list(progress_bar(range(3), desc="epoch", file=term))
    assert "epoch" in term.getvalue() and "3/3" in term.getvalue()
    term = _Terminal()
    list(progress_bar(range(3), enabled=False, file=term))
    assert term.getvalue() == ""
