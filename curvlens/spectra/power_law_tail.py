r"""Power-law tails of a sample: the Clauset-Shalizi-Newman fit and the Hill estimator.

Model-agnostic statistics on positive samples (an ESD, any heavy-tailed data), used by
:mod:`curvlens.spectra.weight_tails` for the tail exponent of a layer's weight spectrum.

Fits (Clauset, Shalizi & Newman 2009, continuous case), for the tail :math:`x_i \ge x_{min}`:

.. math::
    \hat\alpha = 1 + n \Big/ \sum_{i=1}^{n} \ln(x_i / x_{min}), \qquad
    \mathrm{se}(\hat\alpha) = (\hat\alpha - 1) / \sqrt{n},

with :math:`x_{min}` the candidate (each distinct sample value leaving at least ``min_tail``
points) minimizing the two-sided Kolmogorov-Smirnov distance between the tail's empirical CDF and
the fitted :math:`1 - (x / x_{min})^{1 - \alpha}`.

Hill estimator, with the order statistics :math:`X_{(1)} \ge X_{(2)} \ge \dots` (descending):
:math:`H_k = \frac1k \sum_{i=1}^{k} \ln(X_{(i)} / X_{(k+1)})`, an estimate of
:math:`1 / (\alpha - 1)`. Since the CSN tail at :math:`x_{min} = X_{(k)}` holds the :math:`k`
points :math:`X_{(1)}, \dots, X_{(k)}`, of which the last contributes :math:`\ln 1 = 0`,

.. math:: \hat\alpha_{CSN}(x_{min} = X_{(k)}) = 1 + \frac{k}{k-1} \frac{1}{H_{k-1}}

exactly (for distinct values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

__all__ = ["PowerLawTail", "fit_powerlaw_tail", "hill_estimator"]


@dataclass(frozen=True)
class PowerLawTail:
    """A continuous power-law fit :math:`p(x) \\propto x^{-\\alpha}` for :math:`x \\ge x_{min}`.

    Attributes:
        alpha: the CSN maximum-likelihood exponent.
        sigma: its standard error ``(alpha - 1) / sqrt(n_tail)``.
        xmin: the lower cutoff.
        n_tail: number of samples ``>= xmin``.
        ks_distance: two-sided Kolmogorov-Smirnov distance of the tail to the fit.
        n_total: number of positive finite samples.
    """

    alpha: float
    sigma: float
    xmin: float
    n_tail: int
    ks_distance: float
    n_total: int


def _positive_sorted(x: Tensor | np.ndarray | Iterable[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise ValueError("samples contain NaN or Inf; a power-law fit is undefined")
    return np.sort(a[a > 0])


def _ks_distance(tail: np.ndarray, xmin: float, alpha: float) -> float:
    """Two-sided KS distance of a sorted ascending tail to the power law (xmin, alpha)."""
    n = tail.size
    cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
    i = np.arange(1, n + 1) / n
    return float(max(np.max(i - cdf), np.max(cdf - (i - 1.0 / n))))


def fit_powerlaw_tail(
    x: Tensor | np.ndarray | Iterable[float],
    *,
    xmin: float | None = None,
    min_tail: int = 10,
    max_candidates: int | None = None,
) -> PowerLawTail:
    r"""Clauset-Shalizi-Newman power-law tail fit with KS-chosen :math:`x_{min}`.

    Args:
        x: samples (e.g. an ESD); nonpositive values are dropped.
        xmin: fix the cutoff instead of choosing it (the tail is ``x >= xmin``).
        min_tail: candidates for :math:`x_{min}` leave at least this many points in the tail.
        max_candidates: if set, try only this many candidates, evenly spaced in rank (for very
            long samples); by default every distinct value is tried (``O(n^2)`` work).

    Returns:
        A :class:`PowerLawTail`.

    Raises:
        ValueError: fewer than ``min_tail`` (at least 2) positive samples above the cutoff, or
            a tail of identical values.

    Example:
        >>> import numpy as np
        >>> x = (1 - np.random.default_rng(0).random(20000)) ** (-1 / 1.5)   # alpha = 2.5
        >>> round(fit_powerlaw_tail(x, xmin=1.0).alpha, 1)
        2.5
    """
    a = _positive_sorted(x)
    min_tail = max(int(min_tail), 2)
    if xmin is not None:
        tail = a[a >= xmin]
        if tail.size < 2:
            raise ValueError(f"only {tail.size} samples >= xmin={xmin!r}; need at least 2")
        s = float(np.sum(np.log(tail / xmin)))
        if s <= 0:
            raise ValueError(f"all samples >= xmin={xmin!r} equal xmin; alpha is undefined")
        alpha = 1.0 + tail.size / s
        return PowerLawTail(alpha, (alpha - 1) / math.sqrt(tail.size), float(xmin), tail.size,
                            _ks_distance(tail, float(xmin), alpha), a.size)
    n = a.size
    if n < min_tail:
        raise ValueError(f"{n} positive samples, fewer than min_tail={min_tail}; cannot fit a tail")
    logs = np.log(a)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[j] = sum_{i >= j} log a_i
    # Candidates: the first index of each distinct value, leaving >= min_tail points.
    first = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    cand = first[first <= n - min_tail]
    if cand.size == 0:
        raise ValueError(f"no candidate xmin leaves min_tail={min_tail} points in the tail")
    if max_candidates is not None and cand.size > max_candidates:
        cand = cand[np.unique(np.linspace(0, cand.size - 1, int(max_candidates)).astype(int))]
    best: PowerLawTail | None = None
    for j in cand:
        k = n - j
        s = suffix[j] - k * logs[j]
        if s <= 0:
            continue
        alpha = 1.0 + k / s
        d = _ks_distance(a[j:], a[j], alpha)
        if best is None or d < best.ks_distance:
            best = PowerLawTail(alpha, (alpha - 1) / math.sqrt(k), float(a[j]), int(k), d, n)
    if best is None:
        raise ValueError("every candidate tail consists of identical values; alpha is undefined")
    return best


def hill_estimator(x: Tensor | np.ndarray | Iterable[float], k: int) -> float:
    r"""Hill's tail-index estimate :math:`H_k = \frac1k\sum_{i=1}^k \ln(X_{(i)}/X_{(k+1)})`.

    :math:`X_{(1)} \ge X_{(2)} \ge \dots` are the positive samples in descending order, so the
    threshold is the ``(k+1)``-th largest. :math:`H_k` estimates :math:`1 / (\alpha - 1)` for a
    density :math:`\propto x^{-\alpha}`; the exponent estimate is ``1 + 1 / H_k``.

    Args:
        x: samples; nonpositive values are dropped.
        k: number of upper order statistics, ``1 <= k < n``.

    Example:
        >>> round(hill_estimator([8.0, 4.0, 2.0, 1.0], k=2), 12)   # (ln 4 + ln 2) / 2
        1.03972077084
    """
    a = _positive_sorted(x)[::-1]
    if not 1 <= k < a.size:
        raise ValueError(f"hill_estimator needs 1 <= k < n = {a.size}, got k={k!r}")
    return float(np.mean(np.log(a[:k])) - np.log(a[k]))
