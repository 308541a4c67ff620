"""The paper-style table of ``curvlens reproduce``: measured exponents beside the published ones.

Rows per layer (alpha, gamma and the Rayleigh s with the half-width of their 95% intervals, a
``!`` for an untrusted fit, alpha*gamma, the transfer error, the Lanczos s, the alignment score),
then, per layer role, the median over trusted layers with a distribution-free 95% interval next
to the numbers published in "Spectral Asymptotics of Neural Network Loss Landscapes: An Exact
Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curvlens._io import save_figure
from curvlens._table import (
    _exponent,
    _finite,
    _num,
    _pct,
    _usable,
    _why,
    median_interval,
)
from curvlens.results import LayerReport, Report
from curvlens.trust import TrustPolicy

__all__ = ["PAPER", "layer_role", "paper_table", "paper_figure", "summary_numbers"]

#: The paper's published values per layer role (what the table prints beside the measurement).
PAPER: dict[str, str] = {
    "conv": "alpha ~ 2",
    "attention": "alpha 1.17-1.43",
    "mlp-up": "alpha 0.84",
    "mlp-down": "-",
    "mlp": "-",
    "embedding": "-",
    "head": "-",
    "lm-head": "alpha 4.53 (GPT-2 head)",
}
PAPER_MEDIAN_ERROR = "~2% over 93 layers"
_ATTENTION = (".q", ".k", ".v", ".proj", ".qkv")


def layer_role(task: str, name: str, rep: LayerReport) -> str:
    """The layer's role for the by-type summary: conv, attention, mlp-up, mlp-down, mlp,
    embedding, head or lm-head (the head of a language model)."""
    if rep.kind == "conv":
        return "conv"
    if rep.kind == "embedding" or name.split(".")[-1] in ("tok", "pos", "patch"):
        return "embedding"
    if name.endswith(_ATTENTION):
        return "attention"
    if name.endswith(".up"):
        return "mlp-up"
    if name.endswith(".down"):
        return "mlp-down"
    if rep.kind == "head" or name.split(".")[-1] == "head":
        return "lm-head" if "gpt" in task or task == "chars" else "head"
    return "mlp"


def _rows(results: dict[str, Report]) -> Iterable[tuple[str, str, str, LayerReport]]:
    for task, report in results.items():
        for name, rep in report.layers.items():
            yield task, name, layer_role(task, name, rep), rep


def _median_ci(values: list[float], pct: bool = False) -> str:
    if not values:
        return "-"
    fmt = _pct if pct else _num
    lo, hi = median_interval(values)
    ci = f" [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) else ""
    return fmt(statistics.median(values)) + ci


def summary_numbers(results: dict[str, Report]) -> dict[str, Any]:
    """Medians with 95% intervals per role and overall, counts of trusted layers (for JSON)."""
    rows = list(_rows(results))
    out: dict[str, Any] = {"layers": len(rows), "roles": {}}
    kept = [(role, rep) for _, _, role, rep in rows if _usable(rep, "rayleigh")]
    floor_ok = [rep for *_, rep in rows if _half_k(rep)]
    out["trusted"] = len(kept)
    out["half_k_above_floor"] = len(floor_ok)
    out["half_k_above_floor_by_task"] = _half_k_by_task(rows)
    out["samples_by_task"] = _samples_by_task(results)
    for role in dict.fromkeys(r for _, _, r, _ in rows):
        reps = [rep for r, rep in kept if r == role]
        entry: dict[str, Any] = {"n": sum(1 for _, _, r, _ in rows if r == role),
                                 "trusted": len(reps), "paper": PAPER.get(role, "-")}
        for name in ("alpha", "gamma", "s_rayleigh", "transfer_error_rayleigh"):
            vals = _finite(getattr(rep, name) for rep in reps)
            entry[name] = (statistics.median(vals) if vals else math.nan,
                           *median_interval(vals))
        out["roles"][role] = entry
    for role, entry in out["roles"].items():
        every = [rep for _, _, r, rep in rows if r == role]
        for name in ("alpha", "transfer_error_rayleigh"):
            vals = _finite(getattr(rep, name) for rep in every)
            entry[f"{name}_all"] = (statistics.median(vals) if vals else math.nan,
                                    *median_interval(vals))
    errs = _finite(rep.transfer_error_rayleigh for _, rep in kept)
    out["median_transfer_error"] = (statistics.median(errs) if errs else math.nan,
                                    *median_interval(errs))
    every = _finite(rep.transfer_error_rayleigh for *_, rep in rows)
    out["median_transfer_error_all"] = (statistics.median(every) if every else math.nan,
                                        *median_interval(every))
    need = _finite(rep.samples_needed for *_, rep in rows)
    out["samples_needed_median"] = statistics.median(need) if need else math.nan
    lan = _finite(rep.transfer_error_lanczos for *_, rep in rows if _usable(rep, "lanczos"))
    out["median_transfer_error_lanczos"] = (statistics.median(lan) if lan else math.nan,
                                            *median_interval(lan))
    return out


def _half_k_by_task(rows: list) -> dict[str, tuple[int, int]]:
    """``{task: (layers with >= K/2 singular values above the noise floor, layers)}``."""
    out: dict[str, tuple[int, int]] = {}
    for task, _, _, rep in rows:
        n, m = out.get(task, (0, 0))
        out[task] = (n + _half_k(rep), m + 1)
    return out


def _samples_by_task(results: dict[str, Report]) -> dict[str, dict[str, float]]:
    """``{task: {gradient, curvature, curvature_noise (median over its layers), flagged}}``:
    the samples of the gradient and of the curvatures, and how noisy the curvatures were."""
    out = {}
    for task, report in results.items():
        noise = _finite(rep.curvature_noise for rep in report.layers.values())
        flagged = sum("curvature_noise" in rep.trust_flags.get("alpha", "")
                      for rep in report.layers.values())
        grad = int(report.meta.get("batch_size", 0))
        out[task] = {"gradient": grad,
                     "curvature": int(report.meta.get("curvature_samples", grad)),
                     "curvature_noise": statistics.median(noise) if noise else math.nan,
                     "flagged": flagged}
    return out


def _half_k(rep: LayerReport) -> bool:
    return rep.k_kept >= max(1, rep.top_k) / 2


def paper_table(results: dict[str, Report]) -> str:
    """The table: one row per layer, then the by-role medians beside the paper's numbers."""
    head = (f"{'task':<13} {'layer':<17} {'role':<9} {'alpha':>9} {'gamma':>9} {'s':>9} "
            f"{'a*g':>5} {'err':>6} {'s_L':>6} {'align':>5}")
    lines = [head, "-" * len(head)]
    rows = list(_rows(results))
    for task, name, role, rep in rows:
        short = name if len(name) <= 17 else "~" + name[-16:]
        lines.append(f"{task:<13} {short:<17} {role:<9} {_exponent(rep, 'alpha'):>9} "
                     f"{_exponent(rep, 'gamma'):>9} {_exponent(rep, 's_rayleigh'):>9} "
                     f"{_num(rep.predicted_s):>5} {_pct(rep.transfer_error_rayleigh):>6} "
                     f"{_exponent(rep, 's_lanczos', ci=False):>6} {_num(rep.alignment_score):>5}")
    lines.append("-" * len(head))
    lines.append("±: half-width of the 95% interval; !: untrusted fit (left out of the medians)")
    nums = summary_numbers(results)
    out_of = [rep for *_, rep in rows if not _usable(rep, "rayleigh")]
    why = ", ".join(f"{c} {k}" for c, k in sorted(_why(out_of, ("alpha", "gamma",
                                                                  "s_rayleigh")).items()))
    lines.append(f"{nums['layers']} layers from {len(results)} tasks; {nums['trusted']} trusted"
                 + (f" ({len(out_of)} left out: {why})" if out_of else "")
                 + f"; {nums['half_k_above_floor']} with >= K/2 singular values above the "
                 "noise floor")
    ks = sorted({int(r.meta["top_k"]) for r in results.values() if "top_k" in r.meta})
    per_task = ", ".join(f"{task} {n}/{m}" for task, (n, m) in _half_k_by_task(rows).items())
    lines.append(f"K = {'/'.join(map(str, ks)) or '?'} (the paper used K = 20); >= K/2 above "
                 f"the floor per task: {per_task}")
    lines.append("samples per task: gradient and noise floor / curvatures (h_k, Lanczos, "
                 "Kronecker); median curvature noise |h1-h2|/|h1+h2| (layers flagged above "
                 f"{TrustPolicy().max_curvature_noise}):")
    lines += [f"  {task:<13} {e['gradient']:>7} / {e['curvature']:<6} "
              f"{e['curvature_noise']:.3f} ({e['flagged']} flagged)"
              for task, e in nums["samples_by_task"].items()]
    lines.append("")
    lines.append("alpha and transfer error per role: median [95% interval] over the trusted "
                 "layers, then over all layers (untrusted included, for comparison only)")
    lines.append(f"{'role':<10} {'trusted':>9}  {'alpha, trusted':<20} {'err, trusted':<21} "
                 f"{'alpha, all':<20} {'err, all':<21} paper")
    for role, e in nums["roles"].items():
        every = [rep for _, _, r, rep in rows if r == role]
        cells = []
        for reps in ([rep for rep in every if _usable(rep, "rayleigh")], every):
            cells.append(_median_ci(_finite(rep.alpha for rep in reps)))
            cells.append(_median_ci(_finite(rep.transfer_error_rayleigh for rep in reps),
                                    pct=True))
        lines.append(f"{role:<10} {e['trusted']:>4} of {e['n']:<3} {cells[0]:<20} {cells[1]:<21} "
                     f"{cells[2]:<20} {cells[3]:<21} {e['paper']}")
    every = _finite(rep.transfer_error_rayleigh for *_, rep in rows)
    lines.append(f"median transfer error over all {len(every)} layers (untrusted included): "
                 f"{_median_ci(every, pct=True)}")
    errs = _finite(rep.transfer_error_rayleigh for *_, rep in rows if _usable(rep, "rayleigh"))
    lan = _finite(rep.transfer_error_lanczos for *_, rep in rows if _usable(rep, "lanczos"))
    lines.append(f"median transfer error |s - alpha*gamma|/s, Rayleigh s, {len(errs)} trusted "
                 f"layers: {_median_ci(errs, pct=True)}  (paper: {PAPER_MEDIAN_ERROR})")
    if lan:
        lines.append(f"  with the Lanczos s instead ({len(lan)} layers): "
                     f"{_median_ci(lan, pct=True)}; the paper's s is the Rayleigh one")
    gaps = _finite(rep.s_gap for *_, rep in rows)
    align = _finite(rep.alignment_score for *_, rep in rows)
    if gaps and align:
        lines.append("Rayleigh minus Lanczos s on a common window: median "
                     f"{_num(statistics.median(gaps))}; alignment score median "
                     f"{_num(statistics.median(align))}")
    return "\n".join(lines)


def paper_figure(results: dict[str, Report], path: Path) -> Path:
    """alpha per trusted layer by role with the paper's values; s vs alpha*gamma."""
    from curvlens._plots import _mpl

    Figure, Canvas = _mpl()
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    rows = list(_rows(results))
    roles = list(dict.fromkeys(r for _, _, r, _ in rows))
    ref = {"conv": (2.0, 2.0), "attention": (1.17, 1.43), "mlp-up": (0.84, 0.84),
           "lm-head": (4.53, 4.53)}
    for i, role in enumerate(roles):
        reps = [rep for _, _, r, rep in rows if r == role]
        for j, rep in enumerate(reps):
            ok = _usable(rep, "rayleigh")
            if not math.isfinite(rep.alpha):
                continue
            x = i + (j - len(reps) / 2) * 0.6 / max(1, len(reps))
            lo, hi = rep.alpha_ci
            ax1.errorbar(x, rep.alpha, yerr=[[max(0, rep.alpha - lo)], [max(0, hi - rep.alpha)]]
                         if math.isfinite(lo) else None, fmt="o" if ok else "x", ms=3,
                         color="tab:blue" if ok else "0.7", lw=0.6)
        if role in ref:
            a, b = ref[role]
            ax1.fill_between([i - 0.4, i + 0.4], [a - 0.02] * 2, [b + 0.02] * 2, color="tab:red",
                             alpha=0.35, lw=0)
    ax1.set_xticks(range(len(roles)), roles, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("alpha (95% interval)")
    ax1.set_title("alpha by layer role (red: published; x: untrusted)", fontsize=9)
    vals = []
    for *_, rep in rows:
        if math.isfinite(rep.predicted_s) and math.isfinite(rep.s_rayleigh):
            ok = _usable(rep, "rayleigh")
            ax2.plot(rep.predicted_s, rep.s_rayleigh, "o" if ok else "x", ms=3,
                     color="tab:blue" if ok else "0.7")
            vals += [rep.predicted_s, rep.s_rayleigh]
        if _usable(rep, "lanczos") and math.isfinite(rep.predicted_s):
            ax2.plot(rep.predicted_s, rep.s_lanczos, "s", ms=3, mfc="none", color="tab:orange")
    if vals:
        lo, hi = min(vals), max(vals)
        ax2.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax2.plot([], [], "o", color="tab:blue", label="Rayleigh s (sorted h_k)")
    ax2.plot([], [], "x", color="0.7", label="Rayleigh s, untrusted layer")
    ax2.plot([], [], "s", mfc="none", color="tab:orange", label="Lanczos s (block spectrum)")
    ax2.set_xlabel("alpha * gamma")
    ax2.set_ylabel("measured s")
    ax2.set_title("transfer identity (grey x: untrusted, left out of the medians)", fontsize=9)
    ax2.legend(fontsize=7)
    Canvas(fig)
    return save_figure(fig, path)
