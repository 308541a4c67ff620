r"""Statistics on spectra: power-law fits, participation ratios, the zeta bound.

The rank-profile models (BIC) live in :mod:`curvlens.rank_models` and are re-exported here.

These are the fitting rules of "Spectral Asymptotics of Neural Network Loss Landscapes: An Exact
Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596), section "Measurement":
every exponent is an ordinary-least-squares slope in natural logarithms,

.. math::
    \log y_k = c + b \log x_k, \qquad b = \frac{\sum (\log x_k - \overline{\log x})
    (\log y_k - \overline{\log y})}{\sum (\log x_k - \overline{\log x})^2},

over the points with ``x_k > 0`` and ``y_k > 0``. Robust extras: :math:`R^2`, a confidence
interval, and the Theil-Sen slope (median of the pairwise slopes). Everything is computed in
float64 with torch; inputs may be tensors, numpy arrays or lists.

**Intervals honest with K points.** A layer gives only ``K`` (10 to 40) points, and on a rank
axis they are not independent: sorting noisy values (the ``sigma_k`` of ``gamma``, the sorted
``h_k`` of ``s``) makes neighbouring residuals move together. The default interval
(``interval="studentized"``) is the OLS slope plus or minus a Student-t quantile times its
standard error, both corrected for that dependence: with :math:`\hat\rho` the lag-1
autocorrelation of the residuals (bias-corrected by :math:`(1 + 3\hat\rho)/n`, clipped to
``[0, 0.95]``), the variance is inflated by :math:`f = (1 + \rho)/(1 - \rho)` and the degrees of
freedom use the effective size :math:`n / f`. On synthetic layers with known exponents
(``K`` = 10, 20, 40; log-normal noise on ``h_k``; sorted noisy profiles) its 90% interval
covered the true exponent in 84-96% of 200 draws, while the pairs bootstrap percentile interval
(``interval="bootstrap"``, resampling ``(x_k, y_k)`` pairs; kept as an option) covered only
72-89%: with few points the resampled slopes are too concentrated, and resampling pairs ignores
the ordering. ``benchmarks/bench_intervals.py`` re-measures both. A bootstrap over the samples of
the fixed data would also capture the sampling noise of the directions themselves, but needs
per-sample gradients and ``h_k`` (``B`` times the cost); the half-batch noise floor and the trust
flags of :mod:`curvlens.trust` cover that source instead.

Undefined results are ``NaN`` and never silent: each result carries the reason in its
``warnings`` tuple, and :func:`zeta_bound` warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlens._arrays import _as_f64
from curvlens._intervals import (
    Interval,
    _bootstrap_slopes,
    _studentized_interval,
    student_t_quantile,
)
from curvlens.rank_models import (
    RankModel,
    RankModelComparison,
    RankModelFit,
    compare_rank_models,
)

__all__ = [
    "Interval",
    "PowerLawFit",
    "RankModel",
    "RankModelFit",
    "RankModelComparison",
    "compare_rank_models",
    "fit_power_law",
    "fit_rank_decay",
    "participation_ratio",
    "zeta_bound",
    "ols_slope",
    "student_t_quantile",
]

_NAN = float("nan")
# Theil-Sen uses all n(n-1)/2 pairs up to this many points, a seeded sample of pairs above.
_THEIL_SEN_MAX_POINTS = 2000
_THEIL_SEN_SAMPLED_PAIRS = 1_000_000


@dataclass(frozen=True)
class PowerLawFit:
    """An OLS fit ``log y = intercept + slope * log x``.

    For :func:`fit_power_law` ``exponent`` is the slope (``y ~ c x^exponent``); for
    :func:`fit_rank_decay` it is minus the slope (``y_k ~ c k^-exponent``), and ``ci`` and
    ``theil_sen`` follow the same sign convention.

    Attributes:
        exponent: the fitted exponent (NaN when undefined, see ``warnings``).
        intercept: the OLS intercept ``log c`` (natural log).
        r2: coefficient of determination of the log-log fit.
        n: number of points used (those with ``x > 0`` and ``y > 0``).
        ci: ``(low, high)`` confidence interval of ``exponent`` at ``level`` (by default the
            autocorrelation-corrected studentized interval, module docstring).
        theil_sen: Theil-Sen estimate of ``exponent`` (median of pairwise slopes).
        stderr: the classical OLS standard error of the slope.
        warnings: why any of the above is NaN, or what was dropped.
        level: the confidence level of ``ci``.
    """

    exponent: float
    intercept: float
    r2: float
    n: int
    ci: tuple[float, float] = (_NAN, _NAN)
    theil_sen: float = _NAN
    stderr: float = _NAN
    warnings: tuple[str, ...] = field(default=())
    level: float = 0.95

    @property
    def ok(self) -> bool:
        """Whether the exponent is defined."""
        return math.isfinite(self.exponent)


def _rank_cut(sigma: Tensor, size: int, eps: float, rank_tol: float | None = None
              ) -> tuple[float, int]:
    """``(tol, rank)``: singular values ``> tol * sigma_1`` count, ``tol = size * eps`` by
    default (``size = max(m, n)``, ``eps`` of the dtype the gradient was computed in)."""
    tol = rank_tol if rank_tol is not None else size * eps
    if sigma.numel() == 0 or float(sigma[0]) <= 0.0:
        return tol, 0
    return tol, int((sigma > tol * sigma[0]).sum())


def ols_slope(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Ordinary-least-squares slope of ``y`` on ``x`` (with intercept), no logarithms.

    Args:
        x: [n] abscissae.
        y: [n] ordinates.

    Returns:
        The slope, NaN when fewer than 2 points or all ``x`` equal.

    Example:
        >>> ols_slope([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
        2.0
    """
    xt, yt = _as_f64(x, "x"), _as_f64(y, "y")
    if xt.shape != yt.shape:
        raise ValueError(f"x and y need the same length, got {xt.numel()} and {yt.numel()}")
    return _ols(xt, yt)[0]


def _ols(x: Tensor, y: Tensor) -> tuple[float, float, float, float]:
    """``(slope, intercept, r2, stderr)`` of ``y`` on ``x``; NaN where undefined."""
    n = x.numel()
    if n < 2:
        return _NAN, _NAN, _NAN, _NAN
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    sxx = float((dx * dx).sum())
    if sxx <= 0.0:
        return _NAN, _NAN, _NAN, _NAN
    slope = float((dx * dy).sum()) / sxx
    intercept = float(ym) - slope * float(xm)
    resid = dy - slope * dx
    rss = float((resid * resid).sum())
    tss = float((dy * dy).sum())
    r2 = 1.0 - rss / tss if tss > 0.0 else _NAN
    stderr = math.sqrt(rss / (n - 2) / sxx) if n > 2 else _NAN
    return slope, intercept, r2, stderr


def _theil_sen(lx: Tensor, ly: Tensor, seed: int) -> float:
    """Median of pairwise slopes (pairs with distinct x)."""
    n = lx.numel()
    if n <= _THEIL_SEN_MAX_POINTS:
        i, j = torch.triu_indices(n, n, offset=1, device=lx.device)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        i = torch.randint(0, n, (_THEIL_SEN_SAMPLED_PAIRS,), generator=gen).to(lx.device)
        j = torch.randint(0, n, (_THEIL_SEN_SAMPLED_PAIRS,), generator=gen).to(lx.device)
    ddx = lx[j] - lx[i]
    keep = ddx != 0
    if not bool(keep.any()):
        return _NAN
    slopes = (ly[j] - ly[i])[keep] / ddx[keep]
    return float(torch.quantile(slopes, 0.5))  # the median, averaging the middle pair


def _fit_log_log(
    x: Tensor, y: Tensor, *, bootstrap: int, seed: int, sign: float, what: str,
    interval: Interval | str = Interval.STUDENTIZED, level: float = 0.95,
) -> PowerLawFit:
    """Shared body of :func:`fit_power_law` and :func:`fit_rank_decay` (float64 inputs)."""
    notes: list[str] = []
    if x.shape != y.shape:
        raise ValueError(f"{what}: x and y need the same length, got {x.numel()} and {y.numel()}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative int, got {bootstrap!r}")
    try:
        interval = Interval(interval)
    except ValueError:
        raise ValueError(f"interval must be one of {[i.value for i in Interval]}, got "
                         f"{interval!r}") from None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    finite = torch.isfinite(x) & torch.isfinite(y)
    if not bool(finite.all()):
        notes.append(f"{what}: dropped {int((~finite).sum())} non-finite point(s)")
    keep = finite & (x > 0) & (y > 0)
    dropped = int((finite & ~keep).sum())
    if dropped:
        notes.append(f"{what}: left {dropped} non-positive point(s) out of the log fit")
    lx, ly = x[keep].log(), y[keep].log()
    n = int(lx.numel())
    if n < 3:
        notes.append(f"{what}: fewer than 3 positive points ({n}), the exponent is undefined")
        return PowerLawFit(_NAN, _NAN, _NAN, n, warnings=tuple(notes), level=level)
    slope, intercept, r2, stderr = _ols(lx, ly)
    if not math.isfinite(slope):
        notes.append(f"{what}: all {n} abscissae are equal, the exponent is undefined")
        return PowerLawFit(_NAN, _NAN, _NAN, n, warnings=tuple(notes), level=level)
    if not math.isfinite(r2):
        notes.append(f"{what}: the ordinates are constant, R^2 is undefined")
    ci = (_NAN, _NAN)
    if interval is Interval.STUDENTIZED:
        lo, hi, _ = _studentized_interval(lx, ly, slope, level)
        ci = (min(sign * lo, sign * hi), max(sign * lo, sign * hi))
    elif bootstrap > 0:
        slopes = _bootstrap_slopes(lx, ly, bootstrap, seed)
        if bool(torch.isnan(slopes).all()):
            notes.append(f"{what}: every bootstrap resample was degenerate, no CI")
        else:
            probs = torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=slopes.dtype,
                                 device=slopes.device)
            q = torch.nanquantile(slopes, probs)
            lo, hi = sign * float(q[0]), sign * float(q[1])
            ci = (min(lo, hi), max(lo, hi))
    else:
        notes.append(f"{what}: bootstrap=0, no CI")
    ts = _theil_sen(lx, ly, seed)
    return PowerLawFit(
        exponent=sign * slope,
        intercept=intercept,
        r2=r2,
        n=n,
        ci=ci,
        theil_sen=sign * ts,
        stderr=stderr,
        warnings=tuple(notes),
        level=level,
    )


def fit_power_law(
    x: Tensor | Sequence[float],
    y: Tensor | Sequence[float],
    *,
    bootstrap: int = 2000,
    seed: int = 0,
    interval: Interval | str = Interval.STUDENTIZED,
    level: float = 0.95,
) -> PowerLawFit:
    r"""Fit :math:`y \approx c\, x^{\text{exponent}}` by OLS in natural logs.

    Points with ``x <= 0`` or ``y <= 0`` (or non-finite) are left out and counted in
    ``warnings``. Fewer than 3 remaining points give NaN with the reason in ``warnings``.

    Args:
        x: [n] abscissae (e.g. gradient singular values ``sigma_k``).
        y: [n] ordinates (e.g. directional curvatures ``h_k``).
        bootstrap: resamples of the ``(x, y)`` pairs when ``interval="bootstrap"`` (0: no CI).
        seed: seed of the bootstrap and of Theil-Sen's pair sample (deterministic results).
        interval: ``"studentized"`` (default) or ``"bootstrap"`` (module docstring).
        level: confidence level of ``ci``.

    Returns:
        A :class:`PowerLawFit`.

    Example:
        >>> fit = fit_power_law([1.0, 2.0, 4.0, 8.0], [3.0, 12.0, 48.0, 192.0])
        >>> round(fit.exponent, 12), round(fit.r2, 12)
        (2.0, 1.0)
    """
    return _fit_log_log(
        _as_f64(x, "x"), _as_f64(y, "y"), bootstrap=bootstrap, seed=seed, sign=1.0,
        what="power-law fit", interval=interval, level=level,
    )


def fit_rank_decay(
    values: Tensor | Sequence[float],
    *,
    bootstrap: int = 2000,
    seed: int = 0,
    interval: Interval | str = Interval.STUDENTIZED,
    level: float = 0.95,
) -> PowerLawFit:
    r"""Fit :math:`v_k \approx c\, k^{-\text{exponent}}` over ranks ``k = 1..n`` as given.

    The values are not sorted: rank ``k`` is the position in ``values`` (sort them first for a
    rank-ordered profile). Non-positive values are left out but keep their ranks for the others.
    ``exponent > 0`` means decay; ``ci`` and ``theil_sen`` use the same sign.

    Args:
        values: [n] e.g. singular values ``sigma_k`` (gives gamma) or curvatures sorted
            descending (gives s).
        bootstrap, seed, interval, level: as in :func:`fit_power_law`.

    Returns:
        A :class:`PowerLawFit` with ``exponent = -slope``.

    Example:
        >>> round(fit_rank_decay([1.0, 0.25, 1 / 9, 1 / 16]).exponent, 12)
        2.0
    """
    v = _as_f64(values, "values")
    k = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
    return _fit_log_log(k, v, bootstrap=bootstrap, seed=seed, sign=-1.0, what="rank-decay fit",
                        interval=interval, level=level)


# --------------------------------------------------------------------------- concentration


def participation_ratio(x: Tensor | Sequence[float]) -> float:
    r"""Participation ratio :math:`(\sum_k x_k)^2 / \sum_k x_k^2` of the positive entries.

    Non-positive and non-finite entries are left out (the ratio is taken on positive
    curvatures / eigenvalues). It lies in ``[1, #positive]``.

    Args:
        x: [n] e.g. directional curvatures ``h_k`` or Hessian eigenvalues.

    Returns:
        The ratio, or NaN (with a warning) when there is no positive entry.

    Example:
        >>> participation_ratio([1.0, 1.0, 1.0, -2.0])
        3.0
    """
    t = _as_f64(x, "x")
    t = t[torch.isfinite(t) & (t > 0)]
    if t.numel() == 0:
        warnings.warn("participation_ratio: no positive entry, returning NaN", stacklevel=2)
        return _NAN
    return _participation(t)


def _participation(t: Tensor) -> float:
    # Scale by the maximum first so tiny or huge values neither underflow nor overflow.
    t = t / t.max()
    return float(t.sum() ** 2 / (t * t).sum())


def _zeta_bound_reason(s: float) -> tuple[float, str]:
    """``(zeta(s)^2 / zeta(2s), "")`` or ``(NaN, reason)``."""
    if not math.isfinite(s):
        return _NAN, f"zeta bound undefined: exponent s={s!r} is not finite"
    if s <= 1.0:
        return _NAN, f"zeta bound undefined: needs s > 1, got s={s:.4g}"
    st = torch.tensor([s, 2.0 * s], dtype=torch.float64)
    z = torch.special.zeta(st, torch.ones_like(st))  # Hurwitz zeta at q = 1: Riemann zeta
    return float(z[0] ** 2 / z[1]), ""


def zeta_bound(s: float) -> float:
    r"""The limit :math:`\zeta(s)^2 / \zeta(2s)` of the participation ratio of ``k^-s``.

    For a pure power law ``x_k = k^-s`` with ``s > 1`` the truncated participation ratio of the
    first ``K`` terms increases with ``K`` toward this bound and never exceeds it.

    Args:
        s: decay exponent.

    Returns:
        The bound; NaN with a ``RuntimeWarning`` for ``s <= 1`` (the sums diverge).

    Example:
        >>> round(zeta_bound(2.0), 10)  # (pi^2/6)^2 / (pi^4/90) = 2.5
        2.5
    """
    value, reason = _zeta_bound_reason(float(s))
    if reason:
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return value
