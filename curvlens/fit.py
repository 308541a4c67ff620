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
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from curvlens._arrays import _as_f64
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


class Interval(str, Enum):
    """How the confidence interval of an exponent is computed (module docstring)."""

    STUDENTIZED = "studentized"  # OLS t-interval with an autocorrelation-corrected size
    BOOTSTRAP = "bootstrap"  # percentile interval over resampled (x_k, y_k) pairs


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


def _bootstrap_slopes(lx: Tensor, ly: Tensor, bootstrap: int, seed: int) -> Tensor:
    """[bootstrap] OLS slopes over pairs resampled with replacement (NaN if degenerate)."""
    n = lx.numel()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (bootstrap, n), generator=gen).to(lx.device)  # [R, n]
    xb, yb = lx[idx], ly[idx]  # [R, n]
    dx = xb - xb.mean(dim=1, keepdim=True)
    dy = yb - yb.mean(dim=1, keepdim=True)
    sxx = (dx * dx).sum(dim=1)
    slopes = (dx * dy).sum(dim=1) / sxx
    # A resample whose x values are (numerically) all equal has no slope.
    degenerate = sxx <= 1e-12 * (lx - lx.mean()).square().sum()
    return torch.where(degenerate, torch.full_like(slopes, _NAN), slopes)


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


def student_t_quantile(p: float, df: float) -> float:
    r"""The ``p``-quantile of Student's t distribution with ``df > 0`` (real) degrees of freedom.

    Bisection on the CDF, the density integrated by Simpson's rule in float64 after the
    substitution ``t = sqrt(df) tan(u)`` (relative error below 1e-8 for ``df >= 1``); no SciPy
    needed.

    Args:
        p: probability in ``(0, 1)``.
        df: degrees of freedom (need not be an integer).

    Returns:
        ``t`` with ``P(T <= t) = p``.

    Example:
        >>> round(student_t_quantile(0.975, 10.0), 4)
        2.2281
    """
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"student_t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    weights = np.ones(2001)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0

    def cdf(t: float) -> float:  # P(T <= t), t >= 0; x = sqrt(df) tan(u) makes it smooth
        top = math.atan(t / math.sqrt(df))
        f = np.cos(np.linspace(0.0, top, 2001)) ** (df - 1)
        return 0.5 + math.exp(log_c) * math.sqrt(df) * float(weights @ f) * top / 6000

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    # Safeguarded Newton: keep a bracket [lo, hi] and bisect whenever a step leaves it.
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2.0 * hi
    t = 0.5 * (lo + hi)
    for _ in range(100):
        err = cdf(t) - p
        if abs(err) < 1e-15:
            break
        lo, hi = (t, hi) if err < 0 else (lo, t)
        step = t - err / pdf(t)
        t = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-13 * max(1.0, t):
            break
    return t


def _studentized_interval(lx: Tensor, ly: Tensor, slope: float, level: float
                          ) -> tuple[float, float, float]:
    """``(low, high, f)``: the OLS t-interval of the slope with the lag-1 autocorrelation
    correction of the module docstring (``f`` is the variance inflation)."""
    n = lx.numel()
    dx, dy = lx - lx.mean(), ly - ly.mean()
    sxx = float((dx * dx).sum())
    resid = dy - slope * dx
    rss = float((resid * resid).sum())
    if n < 3 or sxx <= 0.0:
        return _NAN, _NAN, _NAN
    rho = float((resid[1:] * resid[:-1]).sum()) / rss if rss > 0 else 0.0
    rho = min(max(rho + (1.0 + 3.0 * rho) / n, 0.0), 0.95)
    f = (1.0 + rho) / (1.0 - rho)
    se = math.sqrt(rss / (n - 2) / sxx * f)
    df = max(n / f - 2.0, 1.0)
    half = student_t_quantile(0.5 + level / 2, df) * se
    return slope - half, slope + half, f


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
