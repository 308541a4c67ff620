r"""Rendering a :class:`~curvlens.results.Report`: the per-layer table, JSON, CSV and plots.

The table shows, per layer, the quantities of the transfer identity ``s = alpha * gamma`` of
"Spectral Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of the Curvature
Exponent" (Calvo, 2026, arXiv:2606.02596): the curvature exponent
``alpha``, the gradient rank-decay exponent ``gamma``, the measured curvature decay ``s`` (from
the sorted ``h_k``), the prediction ``alpha * gamma`` and its relative error, the participation
ratio, the zeta bound and the BIC rank-profile winner, with a summary line per layer type.

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
    fc  linear  4x3  2.00  1.00  2.10  -  -  -  -  -  0
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from curvlens._csv import write_csv
from curvlens._io import atomic_write_text
from curvlens._plots import write_plots
from curvlens.results import RUN_FORMAT, RUN_VERSION, LayerReport, Report, read_reports

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
]

_BIC_SHORT = {"power_law": "pow", "exponential": "exp", "lognormal": "logn", "": "-"}

# (header, width, getter) of the table columns after the layer name.
_COLUMNS: list[tuple[str, int]] = [
    ("kind", 6), ("shape", 8), ("alpha", 5), ("gamma", 5), ("s", 5), ("a*g", 5), ("err", 5),
    ("PR", 5), ("zeta", 5), ("BIC", 4), ("w", 2),
]


# --------------------------------------------------------------------------- table


def _num(x: float, width: int = 5) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    text = f"{x:.2f}"
    if len(text) > width:
        text = f"{x:.1f}" if abs(x) < 10 ** (width - 2) else f"{x:.0e}"
    return text


def _pct(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.1f}%" if x < 0.995 else f"{100 * x:.0f}%"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape) if shape else "-"


def _cells(rep: LayerReport) -> list[str]:
    return [
        rep.kind or "-",
        _shape(rep.shape),
        _num(rep.alpha),
        _num(rep.gamma),
        _num(rep.s_rayleigh),
        _num(rep.predicted_s),
        _pct(rep.transfer_error_rayleigh),
        _num(rep.pr_h),
        _num(rep.zeta_bound),
        _BIC_SHORT.get(rep.bic_best, rep.bic_best[:4]),
        str(len(rep.warnings)),
    ]


def _fit_name(name: str, width: int) -> str:
    return name if len(name) <= width else "~" + name[-(width - 1):]


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def median_transfer_error(report: Report, which: str = "rayleigh") -> float:
    """Median of ``|s - alpha gamma| / s`` over the layers where it is defined (NaN if none).

    Args:
        report: the report.
        which: ``"rayleigh"`` (``s`` from the sorted ``h_k``) or ``"lanczos"``.
    """
    if which not in ("rayleigh", "lanczos"):
        raise ValueError(f"which must be 'rayleigh' or 'lanczos', got {which!r}")
    errors = _finite(getattr(r, f"transfer_error_{which}") for r in report.layers.values())
    return statistics.median(errors) if errors else math.nan


def summary_lines(report: Report) -> list[str]:
    """One line per layer type (median alpha, gamma, s, error) and one over all layers."""
    lines = []
    kinds: dict[str, list[LayerReport]] = {}
    for rep in report.layers.values():
        kinds.setdefault(rep.kind or "?", []).append(rep)
    for kind, reps in kinds.items():
        parts = [f"{kind:<9} n={len(reps):<3}"]
        for label, attr in (("alpha", "alpha"), ("gamma", "gamma"), ("s", "s_rayleigh")):
            vals = _finite(getattr(r, attr) for r in reps)
            parts.append(f"{label} {_num(statistics.median(vals)) if vals else '-'}")
        errs = _finite(r.transfer_error_rayleigh for r in reps)
        parts.append(f"err {_pct(statistics.median(errs)) if errs else '-'}")
        lams = _finite(r.s_lanczos for r in reps)
        if lams:
            parts.append(f"s_lanczos {_num(statistics.median(lams))}")
        lines.append("  ".join(parts))
    n = len(_finite(r.transfer_error_rayleigh for r in report.layers.values()))
    med = median_transfer_error(report)
    line = f"median transfer error over {n} layers: {_pct(med)}"
    lan = median_transfer_error(report, "lanczos")
    if math.isfinite(lan):
        line += f" (Rayleigh s); {_pct(lan)} (Lanczos s)"
    lines.append(line)
    return lines


def table(report: Report, *, width: int = 80, summary: bool = True) -> str:
    """The per-layer table of a report, readable in a ``width``-column terminal.

    Columns: layer, kind, matrix shape, ``alpha``, ``gamma``, ``s`` (Rayleigh), ``a*g``
    (``alpha * gamma``), ``err`` (``|s - alpha gamma| / s``), ``PR`` (participation ratio of the
    positive ``h_k``), ``zeta`` (``zeta(s)^2 / zeta(2s)``, the PR bound of a pure power law),
    ``BIC`` (rank-profile winner: pow / exp / logn), ``w`` (number of warnings). ``-`` marks an
    undefined value (the layer's ``warnings`` say why).

    Args:
        report: the report to render.
        width: target line width (the layer-name column absorbs the difference; >= 72).
        summary: append the per-layer-type summary lines.

    Returns:
        The table as one string (no trailing newline).
    """
    fixed = sum(w + 1 for _, w in _COLUMNS)
    name_w = max(6, min(max((len(n) for n in report.layers), default=5), width - fixed))
    header = f"{'layer':<{name_w}}" + "".join(
        f" {h:<{w}}" if h in ("kind", "BIC") else f" {h:>{w}}" for h, w in _COLUMNS
    )
    lines = [_title(report, max(width, len(header))), header]
    for name, rep in report.layers.items():
        cells = _cells(rep)
        row = f"{_fit_name(name, name_w):<{name_w}}"
        for (h, w), cell in zip(_COLUMNS, cells):
            row += f" {cell:<{w}}" if h in ("kind", "BIC") else f" {cell:>{w}}"
        lines.append(row.rstrip())
    if summary and report.layers:
        lines.append("-" * len(header))
        lines.extend(summary_lines(report))
    return "\n".join(lines)


#: Alias kept for readability at call sites (``print(render_table(report))``).
render_table = table


def _title(report: Report, width: int) -> str:
    parts = []
    if report.epoch is not None:
        parts.append(f"epoch {report.epoch}")
    if report.step is not None:
        parts.append(f"step {report.step}")
    meta = report.meta
    if "batch_size" in meta:
        parts.append(f"batch {meta['batch_size']}")
    if "top_k" in meta:
        parts.append(f"K={meta['top_k']}")
    if meta.get("kronecker_backend") not in (None, "None"):
        parts.append(f"kron {meta.get('kronecker_mode', '?')}/{meta['kronecker_backend']}")
    title = "curvlens report" + (" | " + ", ".join(parts) if parts else "")
    return title[:width]


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
