"""PNG figures of a :class:`~curvlens.results.Report` (used by :func:`curvlens.report.plot`).

matplotlib is imported lazily and used through its object-oriented API (``Figure`` and the Agg
canvas), so plotting never changes the user's pyplot backend or global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlens._io import save_figure

if TYPE_CHECKING:
    from curvlens.results import LayerReport, Report

__all__ = ["write_plots"]

_KIND_COLORS = {"conv": "tab:blue", "linear": "tab:orange", "embedding": "tab:green",
                "head": "tab:red"}


def _mpl() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "curvlens plots need matplotlib: pip install matplotlib (or curvlens[examples])"
        ) from None
    return Figure, FigureCanvasAgg


def _color(kind: str) -> str:
    return _KIND_COLORS.get(kind, "tab:gray")


def _grid(n: int, Figure: Any, title: str) -> tuple[Any, list[Any]]:
    cols = max(1, min(4, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n]


def _save(fig: Any, Canvas: Any, path: Path) -> Path:
    Canvas(fig)
    return save_figure(fig, path)


def _small_ticks(ax: Any) -> None:
    """Small tick labels, minor ones too (matplotlib labels those on axes under a decade)."""
    ax.tick_params(which="major", labelsize=7)
    ax.tick_params(which="minor", labelsize=5)


def _window(rep: LayerReport, paper_compatible: bool) -> int:
    K = len(rep.sigma)
    return K if paper_compatible or rep.rank <= 0 else min(rep.rank, K)


def _epoch_label(report: Report) -> str:
    return "" if report.epoch is None else f" (epoch {report.epoch})"


def _alpha_fits(report: Report, Figure: Any, Canvas: Any, path: Path, pc: bool) -> Path:
    fig, axes = _grid(len(report.layers), Figure,
                      "log h_k vs log sigma_k, fitted slope alpha" + _epoch_label(report))
    for ax, (name, rep) in zip(axes, report.layers.items()):
        w = _window(rep, pc)
        sig, h = np.asarray(rep.sigma[:w], float), np.asarray(rep.h[:w], float)
        pos = (h > 0) & (sig > 0)
        ax.loglog(sig[pos], h[pos], "o", ms=4, color=_color(rep.kind), label="h_k (exact)")
        if len(rep.h_kron) >= w and w:
            hk = np.asarray(rep.h_kron[:w], float)
            ok = (hk > 0) & (sig > 0)
            ax.loglog(sig[ok], hk[ok], "x", ms=4, color="0.5", label="h_kron (K-FAC)")
        if pos.sum() >= 2 and math.isfinite(rep.alpha):
            lx, ly = np.log(sig[pos]), np.log(h[pos])
            slope, icpt = np.polyfit(lx, ly, 1)
            xs = np.linspace(lx.min(), lx.max(), 20)
            ax.loglog(np.exp(xs), np.exp(icpt + slope * xs), "-", color="k", lw=1,
                      label=f"fit alpha={rep.alpha:.2f}")
        neg = int((h <= 0).sum())
        ax.set_title(f"{name} ({rep.kind})" + (f", {neg} h<=0" if neg else ""), fontsize=9)
        ax.set_xlabel("sigma_k", fontsize=8)
        ax.set_ylabel("h_k", fontsize=8)
        _small_ticks(ax)
        ax.legend(fontsize=7)
    return _save(fig, Canvas, path)


def _transfer(report: Report, Figure: Any, Canvas: Any, path: Path) -> Path:
    fig = Figure(figsize=(5.2, 4.8), layout="constrained")
    ax = fig.subplots()
    values = []
    left_out = 0
    for name, rep in report.layers.items():
        p = rep.predicted_s
        if not (rep.trusted("alpha") and rep.trusted("gamma")):
            left_out += math.isfinite(p)
            continue
        c = _color(rep.kind)
        if math.isfinite(rep.s_rayleigh) and rep.trusted("s_rayleigh"):
            ax.plot(p, rep.s_rayleigh, "o", color=c)
            ax.annotate(name, (p, rep.s_rayleigh), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
            values += [p, rep.s_rayleigh]
        else:
            left_out += 1
        if math.isfinite(rep.s_lanczos) and rep.trusted("s_lanczos"):
            ax.plot(p, rep.s_lanczos, "s", mfc="none", color=c)
            values += [rep.s_lanczos]
    if values:
        lo, hi = min(values), max(values)
        pad = 0.1 * (hi - lo) + 0.1
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="s = alpha*gamma")
    for kind, c in _KIND_COLORS.items():
        if any(r.kind == kind for r in report.layers.values()):
            ax.plot([], [], "o", color=c, label=kind)
    ax.plot([], [], "o", color="0.3", label="s (Rayleigh, sorted h)")
    ax.plot([], [], "s", mfc="none", color="0.3", label="s (Lanczos eigenvalues)")
    ax.set_xlabel("predicted s = alpha * gamma")
    ax.set_ylabel("measured s")
    ax.set_title("transfer identity" + _epoch_label(report)
                 + (f"\n({left_out} untrusted layers left out)" if left_out else ""))
    ax.legend(fontsize=7)
    return _save(fig, Canvas, path)


def _alpha_by_layer(report: Report, Figure: Any, Canvas: Any, path: Path) -> Path:
    names = list(report.layers)
    reps = list(report.layers.values())
    fig = Figure(figsize=(max(4.5, 0.6 * len(names) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    alpha = np.array([r.alpha for r in reps], float)
    lo = np.array([r.alpha_ci[0] for r in reps], float)
    hi = np.array([r.alpha_ci[1] for r in reps], float)
    ok = np.array([r.trusted("alpha") for r in reps], bool)
    ax.bar(x, np.nan_to_num(alpha), color=[_color(r.kind) if t else "0.85"
                                            for r, t in zip(reps, ok)],
           hatch=[None if t else "//" for t in ok])
    has_ci = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(alpha)
    level = 100 * float(report.meta.get("ci_level", 0.95))
    if has_ci.any():
        err = np.vstack([alpha - lo, hi - alpha])[:, has_ci].clip(min=0)
        ax.errorbar(x[has_ci], alpha[has_ci], yerr=err, fmt="none", ecolor="k", capsize=3,
                    label=f"{level:.0f}% interval")
    handles, _ = ax.get_legend_handles_labels()
    if not ok.all():  # a proxy: an empty bar container has no patch to draw a swatch from
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="0.85", hatch="//", edgecolor="0.3", linewidth=0,
                             label=f"untrusted ({int((~ok).sum())})"))
    if handles:
        ax.legend(handles=handles, fontsize=7)
    ax.axhline(2.0, color="0.5", lw=0.8, ls=":")
    ax.set_xticks(x, names, rotation=45 if len(names) > 5 else 0, ha="right", fontsize=7)
    ax.set_ylabel("alpha")
    ax.set_title("curvature exponent alpha by layer" + _epoch_label(report))
    return _save(fig, Canvas, path)


def _alpha_over_epochs(history: Sequence[Report], Figure: Any, Canvas: Any, path: Path) -> Path:
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    xs = [r.epoch if r.epoch is not None else i for i, r in enumerate(history)]
    names: list[str] = []
    for r in history:
        names.extend(n for n in r.layers if n not in names)
    for name in names:
        ys = [r.layers[name].alpha if name in r.layers else math.nan for r in history]
        kind = next(r.layers[name].kind for r in history if name in r.layers)
        ax.plot(xs, ys, "o-", ms=3, label=f"{name} ({kind})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("alpha")
    ax.set_title("curvature exponent alpha over training")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, Canvas, path)


def _rank_fits(sig: np.ndarray) -> dict[str, np.ndarray]:
    """Fitted ``sigma_k`` of the three BIC rank models (OLS in log sigma)."""
    k = np.arange(1, sig.size + 1, dtype=float)
    lk = np.log(k)
    designs = {"power_law": [np.ones_like(k), lk], "exponential": [np.ones_like(k), k],
               "lognormal": [np.ones_like(k), lk, lk ** 2]}
    out = {}
    for model, cols in designs.items():
        X = np.stack(cols, 1)
        if sig.size > X.shape[1]:
            coef, *_ = np.linalg.lstsq(X, np.log(sig), rcond=None)
            out[model] = np.exp(X @ coef)
    return out


def _rank_profile(report: Report, Figure: Any, Canvas: Any, path: Path, pc: bool) -> Path:
    fig, axes = _grid(len(report.layers), Figure,
                      "gradient singular values sigma_k vs k, BIC rank models"
                      + _epoch_label(report))
    styles = {"power_law": "-", "exponential": "--", "lognormal": ":"}
    for ax, (name, rep) in zip(axes, report.layers.items()):
        w = _window(rep, pc)
        sig = np.asarray(rep.sigma[:w], float)
        sig = sig[sig > 0]
        k = np.arange(1, sig.size + 1)
        ax.loglog(k, sig, "o", ms=4, color=_color(rep.kind), label="sigma_k")
        best = rep.bic_best
        for model, fitted in _rank_fits(sig).items():
            bic = rep.bic.get(model, math.nan)
            label = f"{model} BIC={bic:.1f}" + (" *" if model == best else "")
            ax.loglog(k, fitted, styles[model], color="k", lw=1.6 if model == best else 0.8,
                      label=label)
        ax.set_title(f"{name} ({rep.kind}), gamma={rep.gamma:.2f}", fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.set_ylabel("sigma_k", fontsize=8)
        _small_ticks(ax)
        ax.legend(fontsize=6)
    return _save(fig, Canvas, path)


def write_plots(report: Report, directory: Path, history: list[Report]) -> list[Path]:
    """Write every figure of :func:`curvlens.report.plot`; returns the paths."""
    if not report.layers:
        raise ValueError("the report has no layers; nothing to plot")
    Figure, Canvas = _mpl()
    directory.mkdir(parents=True, exist_ok=True)
    pc = bool(report.meta.get("paper_compatible", False))
    paths = [
        _alpha_fits(report, Figure, Canvas, directory / "alpha_fits.png", pc),
        _transfer(report, Figure, Canvas, directory / "transfer.png"),
        _alpha_by_layer(report, Figure, Canvas, directory / "alpha_by_layer.png"),
        _rank_profile(report, Figure, Canvas, directory / "rank_profile.png", pc),
    ]
    if len(history) >= 2:
        paths.append(_alpha_over_epochs(history, Figure, Canvas,
                                        directory / "alpha_over_epochs.png"))
    return paths
