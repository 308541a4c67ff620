r"""Heavy tails of weight spectra (empirical spectral densities, ESDs) of trained layers.

Martin & Mahoney's heavy-tailed self-regularization (as implemented in WeightWatcher) reads a
layer's quality from the tail of the ESD of its weight matrix; seed 002 (scaling laws of quadratic
and diagonal networks) derives when such power-law tails emerge and how they track
generalization. This module measures them.

ESD and normalization:
    The ESD of ``W`` ``[m, n]`` (conv: ``weight.flatten(1)``, i.e. ``[out, in/groups*prod(k)]``,
    one matrix per layer, *not* WeightWatcher's per-kernel-position slices) is the set of the
    ``min(m, n)`` squared singular values. ``normalization="raw"`` keeps
    :math:`\lambda_i = \sigma_i^2`; ``normalization="ww"`` uses WeightWatcher's
    :math:`\lambda_i = \sigma_i^2 / N` with :math:`N = \max(m, n)`, the eigenvalues of
    :math:`W^T W / N`. The tail exponent ``alpha``, the stable rank and the spectral entropy do not
    depend on the choice; norms, ``alpha_weighted`` and the Marchenko-Pastur edge do.

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

WeightWatcher's layer metrics (logs are base 10, as there): ``alpha_weighted = alpha *
log10(lambda_max)``, ``log_spectral_norm = log10(lambda_max)``, ``log_frobenius_norm =
log10(sum lambda) = log10 ||W||_F^2``, ``stable_rank = sum lambda / lambda_max``,
``spectral_entropy = -sum p ln p / ln r`` with :math:`p = \lambda / \sum\lambda` over the
:math:`r` nonzero eigenvalues (1 for a flat spectrum, 0 for rank one).

Marchenko-Pastur bulk: for i.i.d. entries of variance :math:`s^2` the raw ESD has its bulk edge at
:math:`\lambda_+ = s^2 (\sqrt m + \sqrt n)^2` (divide by :math:`N` for ``"ww"``); by default
:math:`s^2 = \|W\|_F^2 / (mn)` (the mean square entry, which heavy tails and spikes inflate; pass
``mp_variance`` to override). At finite size the top bulk eigenvalue fluctuates around the edge
on the Tracy-Widom scale :math:`\tau = s^2 (\sqrt m + \sqrt n)(m^{-1/2} + n^{-1/2})^{1/3}`
(Johnstone 2001), so ``n_spikes`` counts eigenvalues above :math:`\lambda_+ + 2\tau` (about the
99% Tracy-Widom quantile: a pure-noise matrix shows a spurious spike ~1% of the time).

The main paper's corollary checked in reports: ``alpha_weight < s`` for each layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn

from curvlens._options import parse_option
from curvlens.layers import find_layers

__all__ = [
    "Normalization",
    "PowerLawTail",
    "WeightTailStats",
    "esd",
    "fit_powerlaw_tail",
    "hill_estimator",
    "weight_tail_stats",
    "model_weight_tails",
    "format_weight_tails",
]


class Normalization(str, Enum):
    """How the ESD is scaled: raw squared singular values, or WeightWatcher's ``/ max(m, n)``."""

    RAW = "raw"
    WW = "ww"


def _normalization(value: Normalization | str) -> Normalization:
    return parse_option(Normalization, value, "normalization")


def _as_matrix(weight: Tensor | np.ndarray, name: str = "weight") -> Tensor:
    w = torch.as_tensor(weight)
    if w.dim() < 2:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}; an ESD needs a matrix (conv weights are "
            "viewed as weight.flatten(1))"
        )
    if not torch.is_floating_point(w):
        raise TypeError(f"{name} must be a floating tensor, got dtype {w.dtype}")
    w = w.detach().flatten(1).to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or Inf entries; its ESD is undefined")
    return w


def esd(weight: Tensor | np.ndarray, normalization: Normalization | str = "raw") -> Tensor:
    """Empirical spectral density of a weight matrix: its squared singular values.

    Args:
        weight: ``[m, n]`` or a conv weight ``[out, in/groups, *kernel]`` (viewed as
            ``flatten(1)``).
        normalization: ``"raw"`` (squared singular values) or ``"ww"`` (divided by
            ``max(m, n)``).

    Returns:
        ``[min(m, n)]`` float64 eigenvalues, descending.

    Example:
        >>> import torch
        >>> esd(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([9., 1.], dtype=torch.float64)
    """
    norm = _normalization(normalization)
    w = _as_matrix(weight)
    lam = torch.linalg.svdvals(w) ** 2
    if norm is Normalization.WW:
        lam = lam / max(w.shape)
    return lam


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


@dataclass(frozen=True)
class WeightTailStats:
    """Tail and norm metrics of one weight matrix's ESD (see the module docstring).

    ``alpha`` etc. are NaN (with a message in ``warnings``) when the ESD is too short to fit.
    """

    shape: tuple[int, int]
    normalization: str
    n_eigs: int
    lambda_max: float
    alpha: float
    alpha_sigma: float
    xmin: float
    n_tail: int
    ks_distance: float
    alpha_hill: float
    alpha_weighted: float
    log_spectral_norm: float
    log_frobenius_norm: float
    stable_rank: float
    spectral_entropy: float
    mp_variance: float
    mp_edge: float
    tw_scale: float
    n_spikes: int
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """A JSON-friendly dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["warnings"] = list(self.warnings)
        return d


def weight_tail_stats(
    weight: Tensor | np.ndarray,
    *,
    normalization: Normalization | str = "raw",
    xmin: float | None = None,
    min_tail: int = 10,
    mp_variance: float | None = None,
    name: str = "weight",
) -> WeightTailStats:
    """All ESD tail and norm metrics of one weight matrix.

    Args:
        weight: ``[m, n]`` or a conv weight (viewed as ``flatten(1)``).
        normalization: ``"raw"`` or ``"ww"`` (see the module docstring).
        xmin: fix the power-law cutoff (default: chosen by minimal KS distance).
        min_tail: smallest tail the CSN fit may choose.
        mp_variance: entry variance for the Marchenko-Pastur edge (default: mean square entry).
        name: used in messages.

    Returns:
        A :class:`WeightTailStats`; ``alpha_hill`` is Hill's ``1 + 1/H_k`` on the same tail
        (``k = n_tail - 1``, threshold ``xmin``).

    Example:
        >>> import torch
        >>> s = weight_tail_stats(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)))
        >>> s.shape, s.n_eigs, s.n_spikes
        ((300, 200), 200, 0)
    """
    norm = _normalization(normalization)
    w = _as_matrix(weight, name)
    m, n = w.shape
    lam_all = esd(w, norm)
    lam_max = float(lam_all[0])
    tol = lam_max * max(m, n) * torch.finfo(torch.float64).eps
    lam = lam_all[lam_all > tol].numpy()
    total = float(lam.sum())
    msgs: list[str] = []
    if lam.size == 0:
        raise ValueError(f"{name} is zero; its ESD is empty")
    p = lam / total
    entropy = float(-(p * np.log(p)).sum() / math.log(lam.size)) if lam.size > 1 else 0.0
    scale = 1.0 if norm is Normalization.RAW else 1.0 / max(m, n)
    s2 = float(mp_variance) if mp_variance is not None else float((w**2).mean())
    edge = s2 * (math.sqrt(m) + math.sqrt(n)) ** 2 * scale
    tw = s2 * (math.sqrt(m) + math.sqrt(n)) * (m**-0.5 + n**-0.5) ** (1 / 3) * scale
    nan = float("nan")
    alpha = sigma = x0 = ks = hill = nan
    k_tail = 0
    try:
        fit = fit_powerlaw_tail(lam, xmin=xmin, min_tail=min_tail)
        alpha, sigma, x0, k_tail, ks = fit.alpha, fit.sigma, fit.xmin, fit.n_tail, fit.ks_distance
        if k_tail >= 2:
            hill = 1.0 + 1.0 / hill_estimator(lam, k_tail - 1)
    except ValueError as err:
        msgs.append(f"{name}: power-law fit undefined ({err})")
    for msg in msgs:
        warnings.warn(msg, stacklevel=2)
    return WeightTailStats(
        shape=(int(m), int(n)),
        normalization=norm.value,
        n_eigs=int(lam_all.numel()),
        lambda_max=lam_max,
        alpha=alpha,
        alpha_sigma=sigma,
        xmin=x0,
        n_tail=int(k_tail),
        ks_distance=ks,
        alpha_hill=hill,
        alpha_weighted=alpha * math.log10(lam_max),
        log_spectral_norm=math.log10(lam_max),
        log_frobenius_norm=math.log10(total),
        stable_rank=total / lam_max,
        spectral_entropy=entropy,
        mp_variance=s2,
        mp_edge=edge,
        tw_scale=tw,
        n_spikes=int((lam_all > edge + 2 * tw).sum()),
        warnings=tuple(msgs),
    )


def model_weight_tails(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    normalization: Normalization | str = "raw",
    min_tail: int = 10,
    on_unsupported: str = "skip",
) -> dict[str, WeightTailStats]:
    """:func:`weight_tail_stats` for every supported layer of ``model`` (module order).

    Args:
        model: any model; layers are found with :func:`curvlens.layers.find_layers`.
        layers: restrict to these qualified names.
        normalization, min_tail: as in :func:`weight_tail_stats`.
        on_unsupported: passed to ``find_layers`` (default ``"skip"``: weights only).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> list(model_weight_tails(net, min_tail=5))
        ['0', '2']
    """
    found = find_layers(model, layers, on_unsupported=on_unsupported)
    return {
        name: weight_tail_stats(info.matrix(), normalization=normalization, min_tail=min_tail,
                                name=name)
        for name, info in found.items()
    }


def format_weight_tails(results: dict[str, WeightTailStats]) -> str:
    """A plain-text table of per-layer weight-tail metrics."""
    head = (f"{'layer':<24} {'shape':>12} {'alpha':>7} {'+-':>6} {'n_tail':>6} {'hill':>7} "
            f"{'a_w':>7} {'log|W|2':>8} {'logF':>7} {'srank':>7} {'entropy':>7} {'spikes':>6}")
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        shape = f"{s.shape[0]}x{s.shape[1]}"
        lines.append(
            f"{name:<24} {shape:>12} {s.alpha:7.3f} {s.alpha_sigma:6.3f} {s.n_tail:6d} "
            f"{s.alpha_hill:7.3f} {s.alpha_weighted:7.3f} {s.log_spectral_norm:8.3f} "
            f"{s.log_frobenius_norm:7.3f} {s.stable_rank:7.2f} {s.spectral_entropy:7.3f} "
            f"{s.n_spikes:6d}"
        )
    return "\n".join(lines)
