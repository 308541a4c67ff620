r"""Spectra of monomial random-feature covariances.

Data :math:`x \sim N(0, H)` in :math:`\mathbb{R}^v`, a sketch :math:`W` ``[v, d]`` and the
entrywise monomial :math:`f(y) = y^p` give the features :math:`f(W^T x)`. "Power-Law
Spectrum of the Random Feature Model" (Paquette, Xiao & Zhu, 2026, arXiv:2603.14578) proves that if
:math:`\lambda_j(H) \asymp j^{-\alpha}` then the population covariance
:math:`K = \mathbb{E}_x[\frac1d f(W^T x) f(W^T x)^T]` has
:math:`\lambda_j(K) \asymp (\log^{p-1}(j+1) / j)^{\alpha}` for :math:`j \lesssim d/\log^{p+1} d`:
the exponent is inherited, up to a log correction.

Exact covariance. With :math:`y = W^T x \sim N(0, C)`, :math:`C = W^T H W`, :math:`D =
\mathrm{diag}(C)`, the Hermite expansion :math:`u^p = \sum_m c_{p,m} He_{p-2m}(u)`,
:math:`c_{p,m} = p! / (m! (p-2m)! 2^m)`, and Mehler's formula give

.. math::
    K = \frac1d \sum_{m=0}^{\lfloor p/2 \rfloor} c_{p,m}^2 (p-2m)!\, D^m C^{\circ(p-2m)} D^m

(:math:`\circ` = entrywise power): for p = 2, :math:`C_{ii}C_{jj} + 2C_{ij}^2`; for p = 3,
:math:`9C_{ii}C_{jj}C_{ij} + 6C_{ij}^3`. The centred covariance (features minus their mean)
drops the :math:`m = p/2` term (the product of the means, even p only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "hermite_monomial_coefficient",
    "feature_gram",
    "random_feature_covariance",
    "random_feature_spectrum",
    "rf_theory_curve",
    "RFSlopes",
    "rf_slopes",
]


def hermite_monomial_coefficient(p: int, m: int) -> int:
    r"""The coefficient :math:`c_{p,m} = p! / (m! (p-2m)! 2^m)` of :math:`He_{p-2m}` in :math:`u^p`.

    Example:
        >>> [hermite_monomial_coefficient(4, m) for m in range(3)]
        [1, 6, 3]
    """
    if p < 0 or not 0 <= 2 * m <= p:
        raise ValueError(f"need 0 <= 2m <= p, got p={p!r}, m={m!r}")
    return math.factorial(p) // (math.factorial(m) * math.factorial(p - 2 * m) * 2**m)


def _check_p(p: int) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"the monomial degree p must be an integer >= 1, got {p!r}")
    return p


def feature_gram(c: Tensor, p: int, *, centered: bool = False) -> Tensor:
    r"""``E[y^p (y^p)^T]`` for :math:`y \sim N(0, C)` (entrywise powers), without the ``1/d``.

    Args:
        c: ``[d, d]`` symmetric positive semi-definite covariance ``C``.
        p: monomial degree, ``>= 1``.
        centered: subtract the outer product of the means ``E[y^p]`` (drops ``m = p/2``).

    Returns:
        ``[d, d]`` in ``c``'s dtype.

    Example:
        >>> import torch
        >>> c = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> feature_gram(c, 2)    # C_ii C_jj + 2 C_ij^2
        tensor([[12.0000,  2.5000],
                [ 2.5000,  3.0000]], dtype=torch.float64)
    """
    p = _check_p(p)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"C must be a square [d, d] matrix, got shape {tuple(c.shape)}")
    diag = torch.diagonal(c)
    outer = diag[:, None] * diag[None, :]  # [d, d] D_ii D_jj
    out = torch.zeros_like(c)
    for m in range(p // 2 + 1):
        if centered and 2 * m == p:
            continue
        coef = hermite_monomial_coefficient(p, m) ** 2 * math.factorial(p - 2 * m)
        out = out + coef * outer**m * c ** (p - 2 * m)
    return out


def random_feature_covariance(
    w: Tensor, h: Tensor, p: int, *, centered: bool = False
) -> Tensor:
    r"""Population covariance :math:`K = \mathbb{E}[\frac1d f(W^Tx) f(W^Tx)^T]`, :math:`f = y^p`.

    Args:
        w: ``[v, d]`` sketch matrix.
        h: ``[v, v]`` data covariance, or ``[v]`` its diagonal.
        p: monomial degree.
        centered: centred covariance (drops the squared means; only matters for even p).

    Returns:
        ``[d, d]`` ``K``.

    Example:
        >>> import torch
        >>> w = torch.eye(2, dtype=torch.float64)
        >>> random_feature_covariance(w, torch.tensor([1.0, 4.0], dtype=torch.float64), 1)
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
    """
    if w.dim() != 2:
        raise ValueError(f"W must be [v, d], got shape {tuple(w.shape)}")
    if h.dim() == 1:
        c = w.T @ (h[:, None] * w)  # [d, d]
    elif h.dim() == 2:
        c = w.T @ h @ w
    else:
        raise ValueError(f"H must be [v, v] or its diagonal [v], got shape {tuple(h.shape)}")
    if h.shape[0] != w.shape[0]:
        raise ValueError(f"H is for v={h.shape[0]} inputs but W has v={w.shape[0]} rows")
    c = 0.5 * (c + c.T)
    return feature_gram(c, p, centered=centered) / w.shape[1]


def random_feature_spectrum(
    w: Tensor, h: Tensor, p: int, *, centered: bool = False
) -> Tensor:
    """Eigenvalues ``[d]`` of :func:`random_feature_covariance`, descending."""
    k = random_feature_covariance(w, h, p, centered=centered)
    return torch.linalg.eigvalsh(k).flip(0)


def rf_theory_curve(j: Tensor, p: int, alpha: float) -> Tensor:
    r"""The random-feature rate :math:`(\log^{p-1}(j+1) / j)^{\alpha}` (up to a constant), j >= 1.

    Example:
        >>> import torch
        >>> rf_theory_curve(torch.tensor([1.0, 4.0]), 1, 2.0)
        tensor([1.0000, 0.0625])
    """
    _check_p(p)
    j = torch.as_tensor(j)
    return (torch.log(j + 1) ** (p - 1) / j) ** alpha


@dataclass(frozen=True)
class RFSlopes:
    """Measured decay of a random-feature spectrum over ranks ``j_min..j_max``.

    Attributes:
        raw_slope: OLS slope of ``log lambda_j`` on ``log j`` (``-alpha`` for p = 1).
        corrected_slope: OLS slope of ``log lambda_j`` on ``log(j / log^{p-1}(j+1))``, which
            is ``-alpha`` when the spectrum follows :func:`rf_theory_curve`.
        alpha_raw, alpha_corrected: the negated slopes, i.e. exponent estimates.
        j_min, j_max: the window (1-based ranks, inclusive).
    """

    raw_slope: float
    corrected_slope: float
    j_min: int
    j_max: int

    @property
    def alpha_raw(self) -> float:
        return -self.raw_slope

    @property
    def alpha_corrected(self) -> float:
        return -self.corrected_slope


def _ols_slope(x: Tensor, y: Tensor) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def rf_slopes(
    eigenvalues: Tensor, p: int, *, j_min: int = 2, j_max: int | None = None
) -> RFSlopes:
    r"""Raw and log-corrected power-law slopes of a spectrum, for the inherited exponent.

    Args:
        eigenvalues: ``[d]`` spectrum (sorted descending here).
        p: monomial degree of the features (the log power is ``p - 1``).
        j_min, j_max: rank window, 1-based inclusive. ``j_min = 2`` skips the top eigenvalue
            (for even p it carries the squared feature mean, a rank-one spike); ``j_max``
            defaults to ``d // 3``. The theorem's head ``j <~ d / log^{p+1} d`` holds only a
            handful of ranks at practical ``d``; with ``v = 12 d`` Gaussian sketches the
            spectrum follows the theory curve's slope over ``[2, d/3]`` (see the tests).

    Raises:
        ValueError: fewer than 3 positive eigenvalues in the window.

    Example:
        >>> import torch
        >>> j = torch.arange(1, 201, dtype=torch.float64)
        >>> round(rf_slopes(rf_theory_curve(j, 2, 1.5), 2, j_min=1, j_max=200).corrected_slope, 6)
        -1.5
    """
    p = _check_p(p)
    lam = torch.sort(torch.as_tensor(eigenvalues, dtype=torch.float64), descending=True).values
    d = lam.numel()
    j_max = max(d // 3, j_min + 2) if j_max is None else int(j_max)
    if not 1 <= j_min < j_max <= d:
        raise ValueError(f"need 1 <= j_min < j_max <= d={d}, got j_min={j_min!r}, j_max={j_max!r}")
    j = torch.arange(j_min, j_max + 1, dtype=torch.float64)
    y = lam[j_min - 1 : j_max]
    keep = y > 0
    if int(keep.sum()) < 3:
        raise ValueError(f"fewer than 3 positive eigenvalues in ranks {j_min}..{j_max}")
    j, y = j[keep], y[keep].log()
    x_raw = j.log()
    x_cor = x_raw - (p - 1) * torch.log(torch.log(j + 1))
    return RFSlopes(_ols_slope(x_raw, y), _ols_slope(x_cor, y), j_min, j_max)
