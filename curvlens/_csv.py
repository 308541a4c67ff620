"""CSV rows of reports: one row per layer (and per report), written atomically.

Used by :meth:`Report.to_csv <curvlens.results.Report.to_csv>` and :func:`curvlens.report.to_csv`;
it reads reports and never imports :mod:`curvlens.results` at run time, so the data class can call
it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvlens._io import atomic_write_text

if TYPE_CHECKING:
    from curvlens.results import Report

__all__ = ["write_csv"]

_CSV_FIRST = ["epoch", "step", "layer", "kind", "m", "n", "top_k", "rank", "bic_best",
              "n_negative_h", "n_negative_lambda", "alpha_n", "k_kept", "n_warnings"]


def _csv_rows(report: Report) -> list[dict[str, Any]]:
    rows = []
    for name, rep in report.layers.items():
        m, n = (tuple(rep.shape) + (0, 0))[:2]
        row: dict[str, Any] = {
            "epoch": report.epoch, "step": report.step, "layer": name, "kind": rep.kind,
            "m": m, "n": n, "top_k": rep.top_k, "rank": rep.rank, "bic_best": rep.bic_best,
            "n_negative_h": rep.n_negative_h, "n_negative_lambda": rep.n_negative_lambda,
            "alpha_n": rep.alpha_n, "k_kept": rep.k_kept, "n_warnings": len(rep.warnings),
        }
        row.update({k: repr(v) if isinstance(v, float) else v
                    for k, v in rep.scalar_fields().items()})
        row.update({f"trust_{k}": flags for k, flags in rep.trust_flags.items()})
        rows.append(row)
    return rows


def write_csv(reports: Sequence[Report], path: str | os.PathLike) -> Path:
    """Write the scalar fields of ``reports``, one row per layer and report, atomically.

    Floats are written with ``repr`` (shortest round-trip form, ``nan`` for NaN).
    """
    rows = [row for r in reports for row in _csv_rows(r)]
    fields = list(_CSV_FIRST)
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
