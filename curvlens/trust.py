r"""When to trust a layer's exponents: noise floor, number of points, goodness of fit.

An exponent is a slope through ``K`` points. It is worth quoting only when those points carry
signal. :func:`trust_flags` marks, per exponent (``alpha``, ``gamma``, ``s_rayleigh``,
``s_lanczos``), the reasons not to trust it:

* ``"undefined"``: the fit has no value (fewer than 3 usable points, zero gradient, ...);
* ``"noise_floor"``: fewer than ``max(min_points, floor_fraction * W)`` of the ``W`` singular
  values of the fit window lie above the half-batch noise floor ``2 ||(G_1 - G_2)/2||_2`` (the
  gradient's two half-batch estimates differ by that much, so smaller singular values and their
  directions are mostly sampling noise). It applies to the exponents built on the gradient's
  directions (``alpha``, ``gamma``, ``s_rayleigh``), not to the Hessian block's own eigenvalues;
* ``"few_points"``: fewer than ``min_points`` points in the fit;
* ``"poor_fit"``: :math:`R^2` of the log-log fit below ``min_r2``;
* ``"curvature_noise"``: the ``h_k`` of two disjoint halves of the samples differ too much:
  the median over the window of ``|h1_k - h2_k| / |h1_k + h2_k|`` exceeds
  ``max_curvature_noise`` (default 0.1). It applies to the exponents built on ``h_k``
  (``alpha``, ``s_rayleigh``). For independent halves this ratio is about 0.67 times the
  relative standard error of ``h_k`` (the median of a folded normal), so 0.1 means about 15%;
  a log-log slope through ``K = 10`` points spread over a decade of ``sigma`` then moves by
  about 0.07, an order of magnitude below the differences between layer types that the
  exponents are read for (0.84, 1.2-1.4, 2).

The floor falls as :math:`1/\sqrt{N}` with the number ``N`` of samples of the fixed data, so
``N (\text{floor} / \sigma_K)^2`` samples would lift ``K`` singular values above it
(:func:`samples_needed`; a lower bound, since the measured tail ``sigma_K`` still contains noise).

:func:`alignment_score` measures how much of the top eigenspace of the Hessian block the
gradient's rank-one directions ``u_k v_k^T`` capture; it tells which of the two ``s`` a layer is
closer to. The quantities are those of "Spectral Asymptotics of
Neural Network Loss Landscapes: An Exact Decomposition of the Curvature Exponent" (Calvo, 2026,
arXiv:2606.02596).

**The two s.** ``s_rayleigh`` is the decay of the curvatures ``h_k`` along the gradient's own
directions ``u_k v_k^T``, sorted. Since ``h_k ~ sigma_k^alpha`` and ``sigma_k ~ k^-gamma``, it is
close to ``alpha * gamma`` almost by construction: its transfer error tests the power-law shape
of the fits more than a property of the network. ``s_lanczos`` is the decay of the top
eigenvalues of the Hessian block itself, measured without the gradient. The top of the block is
not spanned by the gradient's rank-one directions in general: it holds roughly the products of
the two Kronecker factors' spectra, and a sorted product of two power laws decays like the slower
one, so ``s_lanczos`` is usually smaller. Both are refitted over one common rank window
(``s_rayleigh_common``, ``s_lanczos_common``, ``s_gap``), and ``alignment_score`` says how much of
the block's top eigenspace the gradient's directions capture: near 1, the two ``s`` describe the
same directions and should agree; near chance (``K / (m n)``), a large gap only says that the
gradient explores directions other than the sharpest ones, and ``alpha * gamma`` predicts the
Rayleigh ``s``, not the block's spectrum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EXPONENTS", "TrustPolicy", "alignment_score", "samples_needed", "trust_flags"]

_NAN = float("nan")

#: The exponents that carry trust flags, in report order.
EXPONENTS = ("alpha", "gamma", "s_rayleigh", "s_lanczos")
#: Exponents built on the gradient's singular directions (the noise floor applies to them).
_ON_GRADIENT = ("alpha", "gamma", "s_rayleigh")
#: Exponents built on the curvatures ``h_k`` (the curvature noise applies to them).
_ON_CURVATURE = ("alpha", "s_rayleigh")


@dataclass(frozen=True, kw_only=True)
class TrustPolicy:
    """Thresholds of :func:`trust_flags`.

    Attributes:
        min_points: fewest points a fit may rest on (default 5).
        min_r2: lowest acceptable :math:`R^2` of the log-log fit (default 0.8).
        floor_fraction: fraction of the window that must lie above the noise floor (default
            0.5, i.e. at least ``K/2`` singular values).
        max_curvature_noise: largest acceptable ``curvature_noise`` (default 0.1, see the
            module docstring).
    """

    min_points: int = 5
    min_r2: float = 0.8
    floor_fraction: float = 0.5
    max_curvature_noise: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.min_points, int) or self.min_points < 3:
            raise ValueError(f"TrustPolicy.min_points must be an int >= 3, got "
                             f"{self.min_points!r}")
        if not 0.0 <= self.min_r2 <= 1.0:
            raise ValueError(f"TrustPolicy.min_r2 must be in [0, 1], got {self.min_r2!r}")
        if not 0.0 <= self.floor_fraction <= 1.0:
            raise ValueError(f"TrustPolicy.floor_fraction must be in [0, 1], got "
                             f"{self.floor_fraction!r}")
        if not self.max_curvature_noise > 0:
            raise ValueError(f"TrustPolicy.max_curvature_noise must be > 0, got "
                             f"{self.max_curvature_noise!r}")


def trust_flags(fits: dict[str, tuple[float, float, int]], *, window: int,
                k_above_floor: int | None, policy: TrustPolicy = TrustPolicy(),
                curvature_noise: float | None = None) -> dict[str, str]:
    """Reasons not to trust each exponent: ``{exponent: "code,code"}``, ``""`` when trusted.

    Args:
        fits: ``{exponent: (value, r2, n_points)}`` for the names in :data:`EXPONENTS`.
        window: number ``W`` of singular values in the fit window.
        k_above_floor: how many of them lie above the noise floor (``None``: not measured,
            the floor test is skipped).
        policy: the thresholds.
        curvature_noise: the layer's relative curvature noise (``None`` or NaN: not measured,
            the test is skipped).

    Returns:
        ``{exponent: flags}`` with comma-separated codes among ``undefined``, ``noise_floor``,
        ``few_points``, ``poor_fit``, ``curvature_noise`` (module docstring).

    Example:
        >>> trust_flags({"alpha": (2.0, 0.95, 20)}, window=20, k_above_floor=3)
        {'alpha': 'noise_floor'}
    """
    need = max(policy.min_points, math.ceil(policy.floor_fraction * window))
    out: dict[str, str] = {}
    for name, (value, r2, n) in fits.items():
        codes = []
        if not math.isfinite(value):
            codes.append("undefined")
        if name in _ON_GRADIENT and k_above_floor is not None and k_above_floor < need:
            codes.append("noise_floor")
        if math.isfinite(value) and n < policy.min_points:
            codes.append("few_points")
        if math.isfinite(value) and not (math.isfinite(r2) and r2 >= policy.min_r2):
            codes.append("poor_fit")
        if (name in _ON_CURVATURE and curvature_noise is not None
                and curvature_noise > policy.max_curvature_noise):
            codes.append("curvature_noise")
        out[name] = ",".join(codes)
    return out


def samples_needed(sigma: Tensor, noise_floor: float, n_samples: int, k: int) -> float:
    r"""Samples the fixed data would need for ``k`` singular values above the noise floor.

    The floor scales as :math:`1/\sqrt{N}`, so ``sigma_k > floor * sqrt(N / N')`` needs
    ``N' > N (floor / sigma_k)^2``.

    Args:
        sigma: [K] measured singular values, descending.
        noise_floor: the floor measured on ``n_samples`` samples.
        n_samples: samples in the fixed data.
        k: how many singular values should clear the floor.

    Returns:
        The number of samples (at least 1), or NaN if ``sigma_k`` is zero or unknown.

    Example:
        >>> samples_needed(torch.tensor([4.0, 2.0, 1.0]), 2.0, 100, 3)
        400.0
    """
    if not 1 <= k <= sigma.numel() or not math.isfinite(noise_floor) or n_samples < 1:
        return _NAN
    s_k = float(sigma[k - 1])
    if s_k <= 0.0:
        return _NAN
    return max(1.0, float(math.ceil(n_samples * (noise_floor / s_k) ** 2)))


def alignment_score(U: Tensor, V: Tensor, ritz: Tensor) -> float:
    r"""Share of the top eigenspace of ``H_WW`` that the directions ``u_k v_k^T`` capture.

    With ``Q_1..Q_r`` the orthonormal top eigenvectors (as ``[m, n]`` matrices) and
    ``D_k = u_k v_k^T`` (orthonormal in the Frobenius inner product),

    .. math:: A = \frac{1}{r} \sum_{i=1}^{r} \sum_{k=1}^{K} \langle D_k, Q_i \rangle_F^2
        = \frac{1}{r} \sum_{i, k} (u_k^T Q_i v_k)^2 \in [0, 1].

    ``A = 1`` when the top eigenspace lies in the span of the ``D_k``; random directions give
    about ``K / (m n)``.

    Args:
        U: [m, K] and V: [n, K] the gradient's singular vectors.
        ritz: [r, m, n] orthonormal eigenvectors of the Hessian block.

    Returns:
        The score ``A``.

    Example:
        >>> U, V = torch.eye(3)[:, :2], torch.eye(2)
        >>> Q = torch.zeros(1, 3, 2); Q[0, 1, 1] = 1.0
        >>> alignment_score(U, V, Q)
        1.0
    """
    if U.shape[1] != V.shape[1] or ritz.shape[1:] != (U.shape[0], V.shape[0]):
        raise ValueError(f"alignment_score: U {tuple(U.shape)}, V {tuple(V.shape)} and Ritz "
                         f"vectors {tuple(ritz.shape)} do not fit ([m, K], [n, K], [r, m, n])")
    dt = torch.float64
    # (Q_i V)[m, K] against U, one Ritz vector at a time: no [r, m, n] float64 copy
    U64, V64 = U.detach().to(dt), V.detach().to(dt)
    proj = torch.stack([((q.detach().to(dt) @ V64) * U64).sum(0) for q in ritz])  # [r, K]
    return float(proj.square().sum() / ritz.shape[0])
