r"""Algebraic spectral curves: fit, push (free decompression) and physical-branch tracking.

Ameli, van der Heide, Hodgkinson & Mahoney, "Free Decompression with Algebraic Spectral Curves"
(2026, arXiv:2605.03634). A spectral law
whose Stieltjes transform :math:`m(z) = \int \rho(x)/(x - z)\,dx` satisfies
:math:`P(z, m) = \sum_{jk} a_{jk} z^j m^k = 0` keeps an algebraic curve under free
decompression by :math:`e^t`: :math:`P_t(z, m) = m^{L} P(z + (1 - e^{-t})/m, e^t m)`,
:math:`L = \deg_z P`. :func:`fit_spectral_curve` fits :math:`P` to an empirical Stieltjes
transform (least-squares null vector under moment constraints), :meth:`SpectralCurve.push`
applies the map exactly, :meth:`SpectralCurve.stieltjes` tracks the physical root from the far
field (:math:`m \approx -1/z`) down to the real axis. Coordinates are standardized,
:math:`u = (z - c)/s`, :math:`w = s\,m`. The end-to-end method and what it achieves are in
:mod:`curvlens.spectra.free_decompression`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

__all__ = ["SpectralCurve", "fit_spectral_curve"]


def _np(x: Tensor | np.ndarray | list) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).ravel()



@dataclass(frozen=True)
class SpectralCurve:
    r"""A polynomial :math:`P(u, w) = \sum_{jk} a_{jk} u^j w^k` with :math:`u = (z - c)/s`,
    :math:`w = s\,m`, whose physical root is the Stieltjes transform of a spectral law.

    Attributes:
        coeffs: ``[deg_z + 1, deg_m + 1]`` real :math:`a_{jk}` (unit Frobenius norm).
        center, scale: the standardization ``c``, ``s``.
    """

    coeffs: np.ndarray
    center: float
    scale: float

    def __call__(self, z: np.ndarray, m: np.ndarray) -> np.ndarray:
        """:math:`P` at ``(z, m)`` in the original coordinates."""
        u = (np.asarray(z, dtype=complex) - self.center) / self.scale
        w = self.scale * np.asarray(m, dtype=complex)
        return np.polynomial.polynomial.polyval2d(u, w, self.coeffs)

    def push(self, t: float) -> SpectralCurve:
        r"""The curve after decompression by :math:`e^t`: :math:`w^L P(u + \tau/w, e^t w)`.

        :math:`\tau = 1 - e^{-t}`, :math:`L = \deg_u P`. In standardized coordinates
        :math:`z + \tau/m` is :math:`u + \tau/w`, so the map has the same form.
        """
        a = self.coeffs
        dz, dm = a.shape[0] - 1, a.shape[1] - 1
        out = (_push_matrix(dz, dm, t) @ a.ravel()).reshape(dz + 1, dm + dz + 1)
        out = out / np.linalg.norm(out)
        while out.shape[1] > 2 and np.all(np.abs(out[:, 0]) < 1e-14):
            out = out[:, 1:]  # divide out a factor m (it never vanishes on the physical branch)
        return SpectralCurve(out / np.linalg.norm(out), self.center, self.scale)

    def stieltjes(self, x: np.ndarray, eta: float = 1e-6, *, y_max: float = 30.0,
                  steps: int = 120) -> np.ndarray:
        r"""Physical branch :math:`m(x + i\eta s)` at real ``x`` by continuation from far field.

        Args:
            x: ``[G]`` real points (original coordinates).
            eta: final height in standardized units.
            y_max, steps: the starting height (standardized) and geometric steps down to ``eta``.
        """
        u = (_np(x) - self.center) / self.scale
        return _track(self.coeffs, u + 1j * eta, y_max, steps) / self.scale

    def density(self, x: np.ndarray, eta: float = 1e-6) -> np.ndarray:
        """:math:`\\rho(x) = \\max(\\mathrm{Im}\\, m(x + i0), 0)/\\pi` on the physical branch."""
        return np.clip(self.stieltjes(x, eta).imag, 0, None) / math.pi


def _push_matrix(deg_z: int, deg_m: int, t: float) -> np.ndarray:
    r"""The linear map ``vec(a) -> vec(out)`` of :meth:`SpectralCurve.push` (unnormalized).

    ``[(deg_z + 1)(deg_m + deg_z + 1), (deg_z + 1)(deg_m + 1)]``, row-major ``vec``:
    :math:`u^j w^k \mapsto w^{L} (u + \tau/w)^j (e^t w)^k
    = \sum_i \binom{j}{i} \tau^{j-i} e^{tk} u^i w^{L - j + i + k}`.
    """
    tau = 1.0 - math.exp(-t)
    cols = deg_m + deg_z + 1
    out = np.zeros(((deg_z + 1) * cols, (deg_z + 1) * (deg_m + 1)))
    for j in range(deg_z + 1):
        for k in range(deg_m + 1):
            for i in range(j + 1):
                out[i * cols + deg_z - (j - i) + k, j * (deg_m + 1) + k] += (
                    math.exp(t * k) * math.comb(j, i) * tau ** (j - i)
                )
    return out


def _track(coeffs: np.ndarray, u: np.ndarray, y_max: float = 30.0, steps: int = 120) -> np.ndarray:
    """Physical root at complex ``u`` (``Im u > 0``) by descent from ``Re u + i y_max``."""
    u = np.asarray(u, dtype=complex)
    heights = np.geomspace(np.full(u.shape, y_max), u.imag, steps)  # [steps, G]
    w = -1.0 / (u.real + 1j * heights[0])
    rows = np.arange(u.size)
    for y in heights:
        roots = _roots_in_w(coeffs, u.real + 1j * y)  # [G, D]
        w = roots[rows, np.argmin(np.abs(roots - w[:, None]), axis=1)]
    return w


def _roots_in_w(coeffs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """All roots in ``w`` of ``P(u_g, w)`` for each ``u_g`` (batched companion matrices)."""
    c = np.stack([np.polynomial.polynomial.polyval(u, coeffs[:, k])
                  for k in range(coeffs.shape[1])], axis=1)  # [G, D+1], c[:, k] of w^k
    # trim leading coefficients that vanish identically
    deg = coeffs.shape[1] - 1
    while deg > 0 and np.all(coeffs[:, deg] == 0):
        deg -= 1
    c = c[:, : deg + 1]
    lead = c[:, -1:]
    comp = np.zeros((u.size, deg, deg), dtype=complex)
    comp[:, 1:, :-1] = np.eye(deg - 1)
    comp[:, :, -1] = -c[:, :-1] / lead
    return np.linalg.eigvals(comp)


def fit_spectral_curve(
    eigenvalues: Tensor | np.ndarray,
    deg_z: int = 2,
    deg_m: int = 3,
    *,
    distances: tuple[float, ...] = (0.15, 0.3, 0.6, 1.2),
    points: int = 200,
    moment_constraints: int | None = None,
    t: float = 0.0,
) -> SpectralCurve:
    r"""Fit :math:`P(z, m) = 0` to the empirical Stieltjes transform of ``eigenvalues``.

    The transform is sampled on upper half-ellipses around the standardized support at the given
    ``distances`` (in units of the standardized half-width), each row ``[u^j w^k]`` is normalized,
    real and imaginary parts are stacked and the coefficients are the right singular vector of the
    smallest singular value (a real least-squares null vector).

    With ``t > 0`` the curve of the *decompressed* law is fitted directly ("target-size fit"):
    the unknowns are the coefficients of :math:`Q` (degrees ``deg_z``, ``deg_m``) and the data
    must lie on its pull-back :math:`w^L Q(u - (e^t - 1)/w, e^{-t} w)` (``Q.push(-t)``, linear
    in :math:`Q`'s coefficients). The returned
    curve is :math:`Q`, already at the larger size. Use it when the degrees of the large-size
    curve are known (a population with two atoms: ``(2, 3)``, Marchenko-Pastur: ``(1, 2)``);
    its pull-back has degrees ``(deg_z, deg_m + deg_z)``, so the fit has fewer unknowns than a
    fit of the submatrix curve followed by :meth:`SpectralCurve.push`.

    The design's columns are deliberately *not* rescaled. The moment constraints are rank
    deficient (e.g. 7 rows of rank 5 for the target-size fit of degrees (2, 3)), so the
    orthonormal basis of their null space is rotated arbitrarily by round-off; the unit-norm
    least-squares null vector in that basis does not depend on the rotation, but a column
    scaling does, and with a nearly degenerate smallest singular value (noisy eigenvalues) it
    changed the fitted curve completely under a 1e-14 perturbation of the input (pushed mass
    0.72 instead of 1.0 depending on the BLAS thread count). Without it the target-size fit of
    the two-bulk case is unchanged under relative perturbations of the eigenvalues up to 1e-6.

    Args:
        eigenvalues: ``[n_s]`` measured spectrum.
        deg_z, deg_m: degrees of the polynomial in ``z`` and ``m`` (Marchenko-Pastur: 1, 2).
        distances, points: the sampling ellipses and points per ellipse.
        moment_constraints: number of leading Laurent coefficients of
            :math:`P(z, m(z))` at :math:`z \to \infty` forced to vanish, with :math:`m`'s
            expansion :math:`-\sum_k \mu_k z^{-k-1}` from the spectrum's exact moments
            (default the sum of the degrees of the polynomial the data lie on; 0 disables).
            This removes spurious near-null directions of the least-squares problem at higher
            degrees.
        t: ``ln(n / n_s)`` for a target-size fit; 0 fits the submatrix's own curve.
    """
    lam = _np(eigenvalues)
    finite = int(np.isfinite(lam).sum())
    if lam.size < 4 or finite < lam.size:
        raise ValueError(f"need at least 4 eigenvalues, all finite, to fit a curve; got "
                         f"{lam.size}, of which {finite} finite")
    if deg_z < 1 or deg_m < 1:
        raise ValueError(f"deg_z and deg_m must be >= 1, got {deg_z!r}, {deg_m!r}")
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"t = ln(n / n_s) must be finite and >= 0, got {t!r}")
    # the data lie on P = pull @ vec(Q), of degrees (dz_p, dm_p)
    dz_p, dm_p = (deg_z, deg_m + deg_z) if t > 0 else (deg_z, deg_m)
    terms = (deg_z + 1) * (deg_m + 1)
    pull = _push_matrix(deg_z, deg_m, -t) if t > 0 else np.eye(terms)
    if moment_constraints is None:
        moment_constraints = dz_p + dm_p
    c = float(lam.mean())
    s = float(lam.std()) or 1.0
    u_eig = (lam - c) / s
    lo, hi = u_eig.min(), u_eig.max()
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo) + 1e-12
    theta = np.linspace(0, np.pi, points + 2)[1:-1]
    us = np.concatenate([mid + (half + d * half) * np.cos(theta)
                         + 1j * (d * half + 0.5 * d * half) * np.sin(theta) for d in distances])
    ws = np.mean(1.0 / (u_eig[:, None] - us[None, :]), axis=0)
    jj, kk = np.meshgrid(np.arange(dz_p + 1), np.arange(dm_p + 1), indexing="ij")
    rows = us[:, None] ** jj.ravel()[None] * ws[:, None] ** kk.ravel()[None]  # [P, terms_p]
    rows = rows @ pull if t > 0 else rows  # [P, terms]
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    design = np.concatenate([rows.real, rows.imag])
    basis = np.eye(terms)
    moment_constraints = min(int(moment_constraints), terms - 2)
    if moment_constraints > 0:
        cons = _moment_constraints(u_eig, dz_p, dm_p, moment_constraints) @ pull
        _, sv, vh = np.linalg.svd(cons)
        rank = int(np.sum(sv > sv[0] * 1e-10)) if sv.size else 0
        basis = vh[rank:].T  # [terms, free]
    # no column scaling: ``basis`` is any orthonormal basis of the constraints' null space (its
    # rotation is arbitrary, set by round-off when the constraints are rank deficient), and the
    # unit-norm null vector of ``design @ basis`` does not depend on that rotation, whereas
    # scaling its columns would (see the Notes in the docstring)
    _, _, vh = np.linalg.svd(design @ basis, full_matrices=False)
    coeffs = (basis @ vh[-1]).reshape(deg_z + 1, deg_m + 1)
    return SpectralCurve(coeffs / np.linalg.norm(coeffs), c, s)


def _moment_constraints(u: np.ndarray, deg_z: int, deg_m: int, count: int) -> np.ndarray:
    """Rows ``[count, terms]``: Laurent coefficients of ``P(u, w(u))`` at ``u^deg_z, u^(deg_z-1),
    ...`` with ``w(u) = -sum_k mu_k u^(-k-1)`` (``mu_k`` the moments of ``u``)."""
    order = count + deg_m + 1
    mu = np.array([np.mean(u**k) for k in range(order)])  # series S(1/u) = sum mu_k u^-k
    powers = [np.zeros(order) for _ in range(deg_m + 1)]
    powers[0][0] = 1.0
    for k in range(1, deg_m + 1):
        powers[k] = -np.convolve(powers[k - 1], mu)[:order]  # (-S)^k
    rows = np.zeros((count, (deg_z + 1) * (deg_m + 1)))
    for j in range(deg_z + 1):
        for k in range(deg_m + 1):
            # u^j w^k = u^(j-k) (-S)^k: coefficient of u^(deg_z - r) comes from S-index
            # i with j - k - i = deg_z - r, i.e. i = r - (deg_z - j) - k
            for r in range(count):
                i = r - (deg_z - j) - k
                if 0 <= i < order:
                    rows[r, j * (deg_m + 1) + k] = powers[k][i]
    return rows
