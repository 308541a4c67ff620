r"""Rendering a :class:`~curvlens.results.Report`: the per-layer table, JSON, CSV and plots.

The table shows, per layer, the quantities of the transfer identity ``s = alpha * gamma`` of
"Spectral Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of the Curvature
Exponent" (Calvo, 2026, arXiv:2606.02596): the curvature exponent ``alpha``, the gradient
rank-decay exponent ``gamma`` and the measured curvature decay ``s`` (from the sorted ``h_k``),
each with the half-width of its confidence interval and a ``!`` when its trust flags are set,
the prediction ``alpha * gamma`` and its relative error, the Lanczos ``s`` and the BIC
rank-profile winner, with summary lines per layer type over the trusted layers only.

JSON and CSV files are written atomically (a temporary file in the same directory, then
``os.replace``, with the permissions a plain write would give, symbolic links followed) and read
back losslessly, NaN included (Python's ``json`` writes it as ``NaN``). A file holds one
report (``"format": "curvlens.report"``) or a run, the reports of several epochs
(``"format": "curvlens.run"``); :func:`load_reports` reads either.

Example:
    >>> from curvlens.results import LayerReport, Report
    >>> rep = Report(layers={"fc": LayerReport(name="fc", kind="linear", shape=(4, 3),
    ...                                        alpha=2.0, gamma=1.0, s_rayleigh=2.1)})
    >>> print(table(rep).splitlines()[2])  # doctest: +NORMALIZE_WHITESPACE
    fc  lin  4x3  2.00  1.00  2.10  -  -  -  -
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvlens._csv import write_csv
from curvlens._io import atomic_write_text
from curvlens._plots import write_plots
from curvlens._table import (
    median_interval,
    median_transfer_error,
    summary_lines,
    table,
)
from curvlens.results import RUN_FORMAT, RUN_VERSION, Report, read_reports

#: Alias kept for readability at call sites (``print(render_table(report))``).
render_table = table

__all__ = [
    "table",
    "render_table",
    "summary_lines",
    "to_json",
    "from_json",
    "save_reports",
    "load_reports",
    "to_csv",
    "plot",
    "median_transfer_error",
    "median_interval",
]

_RUN_FORMAT = "curvlens.run"


# --------------------------------------------------------------------------- JSON


def to_json(report: Report, path: str | os.PathLike) -> Path:
    """Write one report as JSON, atomically. Returns the path.

    Raises:
        TypeError: ``report`` is not a :class:`~curvlens.results.Report`.
    """
    if not isinstance(report, Report):
        raise TypeError(f"to_json needs a curvlens Report, got {type(report).__name__}")
    return report.to_json(path)


def save_reports(reports: Sequence[Report], path: str | os.PathLike,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write several reports (a run, e.g. ``lens.history``) as one JSON file, atomically.

    Args:
        reports: the reports, oldest first.
        path: the file to write.
        meta: run-level information (model, optimizer, seed, ...), JSON-compatible.
    """
    reports = list(reports)
    bad = [type(r).__name__ for r in reports if not isinstance(r, Report)]
    if bad:
        raise TypeError(f"save_reports needs curvlens Reports, got {bad[:3]}")
    data = {"format": RUN_FORMAT, "version": RUN_VERSION, "meta": dict(meta or {}),
            "reports": [r.to_dict() for r in reports]}
    return atomic_write_text(path, json.dumps(data, indent=1))


def load_reports(path: str | os.PathLike) -> list[Report]:
    """Read a report file or a run file; returns the reports, oldest first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, not JSON, or not a valid curvlens report or run (the message
            names the file, the field and the layer).
    """
    return read_reports(path)


def from_json(path: str | os.PathLike) -> Report:
    """Read a report written by :func:`to_json` (or the last report of a run file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a curvlens report, or an empty run.
    """
    return Report.from_json(path)


def to_csv(report: Report | Sequence[Report], path: str | os.PathLike) -> Path:
    """Write the scalar fields, one row per layer (and per report for a sequence), atomically.

    Floats are written with ``repr`` (shortest round-trip form, ``nan`` for NaN).
    """
    return write_csv([report] if isinstance(report, Report) else list(report), path)


# --------------------------------------------------------------------------- plots


def plot(report: Report, directory: str | os.PathLike,
         history: Sequence[Report] | None = None) -> list[Path]:
    """Write the PNG figures of a report (and of a run's history) into ``directory``.

    Figures: ``alpha_fits.png`` (log h_k vs log sigma_k per layer with the fitted line),
    ``transfer.png`` (measured s vs predicted alpha*gamma, identity line), ``alpha_by_layer.png``
    (alpha with its CI per layer), ``alpha_over_epochs.png`` (when ``history`` has two or more
    reports) and ``rank_profile.png`` (sigma_k vs k with the three BIC models).

    Returns:
        The paths written.

    Raises:
        TypeError: ``report`` is not a :class:`~curvlens.results.Report`.
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    if not isinstance(report, Report):
        raise TypeError(f"plot needs a curvlens Report, got {type(report).__name__}")
    return write_plots(report, Path(directory), list(history or []))
