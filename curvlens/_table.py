r"""The per-layer table and the summary lines of a :class:`~curvlens.results.Report`.

Exponents are printed with the half-width of their confidence interval (``2.01±.12``) and a
``!`` when their trust flags (:mod:`curvlens.trust`) say not to rely on them. Medians, per
layer type and over all layers, use only trusted layers, carry an order-statistic interval
(:func:`median_interval`), and say how many layers were left out and why.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: results.py imports this module
    from curvlens.results import LayerReport, Report

_BIC_SHORT = {"power_law": "pow", "exponential": "exp", "lognormal": "logn", "": "-"}
_KIND_SHORT = {"linear": "lin", "embedding": "emb"}
#: Mark of an untrusted exponent in the table.
UNTRUSTED = "!"
#: The exponents the transfer identity ``s = alpha * gamma`` needs (Rayleigh s).
_IDENTITY = ("alpha", "gamma", "s_rayleigh")

# (header, width) of the table columns after the layer name.
_COLUMNS: list[tuple[str, int]] = [
    ("kind", 4), ("shape", 8), ("alpha", 9), ("gamma", 9), ("s", 9), ("a*g", 4), ("err", 5),
    ("s_L", 5), ("BIC", 4),
]
_LEFT = ("kind", "BIC")


def _num(x: float | None, width: int = 5) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    text = f"{x:.2f}"
    if len(text) > width:
        text = f"{x:.1f}" if abs(x) < 10 ** (width - 2) else f"{x:.0e}"
    return text


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.1f}%" if x < 0.995 else f"{100 * x:.0f}%"


def _half(ci: Sequence[float]) -> str:
    """``±.12`` / ``±1.2`` / ``±12``: half the width of an interval, in three characters."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    h = (hi - lo) / 2
    if h < 0.995:
        return f"±.{round(100 * h):02d}"
    if h < 9.95:
        return f"±{h:.1f}"
    return f"±{min(h, 99):.0f}"


def _exponent(rep: LayerReport, name: str, ci: bool = True) -> str:
    value = getattr(rep, name)
    if not math.isfinite(value):
        return "-"
    text = _num(value) + (_half(getattr(rep, f"{name}_ci")) if ci else "")
    return text + ("" if rep.trusted(name) else UNTRUSTED)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape) if shape else "-"


def _cells(rep: LayerReport) -> list[str]:
    kind = rep.kind or "-"
    return [
        _KIND_SHORT.get(kind, kind[:4]),
        _shape(rep.shape),
        _exponent(rep, "alpha"),
        _exponent(rep, "gamma"),
        _exponent(rep, "s_rayleigh"),
        _num(rep.predicted_s),
        _pct(rep.transfer_error_rayleigh),
        _exponent(rep, "s_lanczos", ci=False),
        _BIC_SHORT.get(rep.bic_best, rep.bic_best[:4]),
    ]


def _fit_name(name: str, width: int) -> str:
    return name if len(name) <= width else "~" + name[-(width - 1):]


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _usable(rep: LayerReport, which: str) -> bool:
    """Trusted for the transfer identity with the Rayleigh or the Lanczos ``s``."""
    names = _IDENTITY if which == "rayleigh" else ("alpha", "gamma", "s_lanczos")
    return all(rep.trusted(n) for n in names)


def _why(reps: Iterable[LayerReport], names: Sequence[str]) -> Counter:
    """How often each flag code occurs among ``names`` of the untrusted layers (once a layer)."""
    out: Counter = Counter()
    for rep in reps:
        codes = {c for n in names for c in rep.trust_flags.get(n, "").split(",") if c}
        if not codes and not all(rep.trusted(n) for n in names):
            codes = {"undefined"}
        out.update(codes)
    return out


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    r"""Distribution-free interval for the median: order statistics ``(x_(j), x_(n+1-j))``.

    ``j`` is the largest index with :math:`P(\mathrm{Bin}(n, 1/2) < j) \le (1 - level)/2`, so
    the interval covers the population median with probability at least ``level`` for any
    continuous distribution of independent values. With too few values for that level (``n <
    6`` at 95%) it returns NaN.

    Args:
        values: the per-layer values (NaN and Inf are left out).
        level: coverage.

    Returns:
        ``(low, high)``.

    Example:
        >>> median_interval(list(range(1, 21)))
        (6, 15)
    """
    xs = sorted(_finite(values))
    n = len(xs)
    tail, j = 0.0, 0
    while n and j < n // 2:
        nxt = tail + math.comb(n, j) / 2.0**n  # P(Bin(n, 1/2) = j)
        if nxt > (1.0 - level) / 2:
            break
        tail, j = nxt, j + 1
    if j == 0:
        return (math.nan, math.nan)
    return (xs[j - 1], xs[n - j])


def median_transfer_error(report: Report, which: str = "rayleigh", *,
                          trusted_only: bool = True) -> float:
    """Median of ``|s - alpha gamma| / s`` over the layers where it is defined (NaN if none).

    Args:
        report: the report.
        which: ``"rayleigh"`` (``s`` from the sorted ``h_k``) or ``"lanczos"``.
        trusted_only: count only layers whose alpha, gamma and s are all trusted.
    """
    if which not in ("rayleigh", "lanczos"):
        raise ValueError(f"which must be 'rayleigh' or 'lanczos', got {which!r}")
    errors = _finite(getattr(r, f"transfer_error_{which}") for r in report.layers.values()
                     if not trusted_only or _usable(r, which))
    return statistics.median(errors) if errors else math.nan


def _median_text(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = median_interval(values)
    ci = f" [{_num(lo)}, {_num(hi)}]" if math.isfinite(lo) else ""
    return _num(statistics.median(values)) + ci


def _left_out(reps: list[LayerReport], kept: list[LayerReport], names: Sequence[str]) -> str:
    out = [r for r in reps if r not in kept]
    if not out:
        return ""
    why = ", ".join(f"{code} {k}" for code, k in sorted(_why(out, names).items()))
    return f"; {len(out)} left out ({why})"


def summary_lines(report: Report) -> list[str]:
    """Per layer type and over all layers: medians of trusted layers with 95% intervals.

    A layer counts when its alpha, gamma and Rayleigh s are all trusted (Lanczos s: its own
    flag); each line says how many layers were left out and why.
    """
    lines = []
    kinds: dict[str, list[LayerReport]] = {}
    for rep in report.layers.values():
        kinds.setdefault(rep.kind or "?", []).append(rep)
    for kind, reps in kinds.items():
        kept = [r for r in reps if _usable(r, "rayleigh")]
        errs = _finite(r.transfer_error_rayleigh for r in kept)
        lines.append(f"{kind:<9} {len(kept)} of {len(reps)} trusted"
                     f"{_left_out(reps, kept, _IDENTITY)}; err "
                     f"{_pct(statistics.median(errs)) if errs else '-'}")
        parts = [f"{label} {_median_text(_finite(getattr(r, attr) for r in kept))}"
                 for label, attr in (("alpha", "alpha"), ("gamma", "gamma"),
                                     ("s", "s_rayleigh"))]
        lam = _finite(r.s_lanczos for r in reps if r.trusted("s_lanczos"))
        if lam:
            parts.append(f"s_L {_median_text(lam)}")
        lines.append("  " + "  ".join(parts))
    reps = list(report.layers.values())
    kept = [r for r in reps if _usable(r, "rayleigh")]
    line = (f"median transfer error over {len(kept)} trusted layers: "
            f"{_pct(median_transfer_error(report))}")
    lan = median_transfer_error(report, "lanczos")
    if math.isfinite(lan):
        line += f" (Rayleigh s); {_pct(lan)} (Lanczos s)"
    lines.append(line)
    if len(kept) < len(reps):
        lines.append("  " + _left_out(reps, kept, _IDENTITY)[2:] + " of the medians")
    lines.extend(_sample_lines(report))
    return lines


def _sample_lines(report: Report) -> list[str]:
    need = _finite(r.samples_needed for r in report.layers.values())
    if not need:
        return []
    have = max((r.n_samples for r in report.layers.values()), default=0)
    K = max((r.top_k for r in report.layers.values()), default=0)
    short = sum(1 for x in need if x > have)
    return [f"noise floor: {short} of {len(need)} layers need more than the {have} samples "
            f"for all K={K} singular values above it (median {statistics.median(need):.0f}, "
            f"max {max(need):.0f} samples)"]


def table(report: Report, *, width: int = 80, summary: bool = True) -> str:
    """The per-layer table of a report, readable in a ``width``-column terminal.

    Columns: layer, kind (conv, lin, emb, head), matrix shape, ``alpha``, ``gamma`` and ``s``
    (Rayleigh) with the half-width of their confidence interval (``2.01±.12``), ``a*g``
    (``alpha * gamma``), ``err`` (``|s - alpha gamma| / s``), ``s_L`` (the Lanczos ``s``),
    ``BIC`` (rank-profile winner: pow / exp / logn). ``!`` marks an exponent whose trust flags
    are set (noise floor, few points, poor fit; the layer's ``trust_flags`` and ``warnings`` say
    which), ``-`` an undefined value (``nan_reasons`` says why).

    Args:
        report: the report to render.
        width: target line width (the layer-name column absorbs the difference; >= 72).
        summary: append the legend and the per-layer-type summary lines.

    Returns:
        The table as one string (no trailing newline).
    """
    fixed = sum(w + 1 for _, w in _COLUMNS)
    name_w = max(6, min(max((len(n) for n in report.layers), default=5), width - fixed))
    header = (f"{'layer':<{name_w}}" + "".join(
        f" {h:<{w}}" if h in _LEFT else f" {h:>{w}}" for h, w in _COLUMNS)).rstrip()
    lines = [_title(report, max(width, len(header))), header]
    for name, rep in report.layers.items():
        row = f"{_fit_name(name, name_w):<{name_w}}"
        for (h, w), cell in zip(_COLUMNS, _cells(rep)):
            row += f" {cell:<{w}}" if h in _LEFT else f" {cell:>{w}}"
        lines.append(row.rstrip())
    if summary and report.layers:
        lines.append("-" * len(header))
        lines.extend(_legend(report))
        lines.extend(summary_lines(report))
    return "\n".join(lines)


def _legend(report: Report) -> list[str]:
    level = report.meta.get("ci_level", 0.95)
    out = [f"±: half-width of the {100 * float(level):.0f}% interval; {UNTRUSTED}: untrusted fit"]
    counts = {n: sum(not r.trusted(n) for r in report.layers.values()
                     if math.isfinite(getattr(r, n)))
              for n in ("alpha", "gamma", "s_rayleigh", "s_lanczos")}
    if any(counts.values()):
        why = _why([r for r in report.layers.values() if not _usable(r, "rayleigh")
                    or not r.trusted("s_lanczos")], ("alpha", "gamma", "s_rayleigh", "s_lanczos"))
        out.append("untrusted: " + ", ".join(f"{n} {k}" for n, k in counts.items() if k)
                   + " (" + ", ".join(f"{c} {k}" for c, k in sorted(why.items())) + ")")
    return out


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
