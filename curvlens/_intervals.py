r"""Confidence intervals of a log-log OLS slope (see :mod:`curvlens.fit` for the choice).

* ``studentized`` (default): the OLS t-interval with the variance inflated, and the degrees of
  freedom reduced, by the lag-1 autocorrelation of the residuals;
* ``bootstrap``: the percentile interval over resampled ``(x_k, y_k)`` pairs.

:func:`student_t_quantile` needs no SciPy.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from curvlens.trust import TrustPolicy

__all__ = ["Interval", "check_interval_options", "student_t_quantile"]

_NAN = float("nan")


class Interval(str, Enum):
    """How the confidence interval of an exponent is computed (module docstring)."""

    STUDENTIZED = "studentized"  # OLS t-interval with an autocorrelation-corrected size
    BOOTSTRAP = "bootstrap"  # percentile interval over resampled (x_k, y_k) pairs


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


def check_interval_options(interval: Interval | str, level: float, trust: TrustPolicy | None = None
                           ) -> Interval:
    """``interval`` as an :class:`Interval`, after checking it, ``level`` and ``trust`` (a
    :class:`~curvlens.trust.TrustPolicy` or ``None``) once, before any matrix is measured."""
    try:
        interval = Interval(interval)
    except ValueError:
        raise ValueError(f"interval must be one of {[i.value for i in Interval]}, got "
                         f"{interval!r}") from None
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if trust is not None and not isinstance(trust, TrustPolicy):
        raise ValueError(f"trust must be a curvlens.trust.TrustPolicy or None, got "
                         f"{type(trust).__name__}")
    return interval
