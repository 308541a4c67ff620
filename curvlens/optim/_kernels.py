r"""The spectral transform ``U diag(T(sigma)) V^T`` of a matrix, computed without an SVD.

The main paper ("Spectral Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of
the Curvature Exponent", Calvo, 2026, arXiv:2606.02596) measures, per layer, ``h_k ~ sigma_k^alpha``
for the directional curvature along the gradient's singular directions ``u_k v_k^T``. A damped
Newton step in that basis divides each singular value by its curvature:

.. math::
    T(\sigma; \alpha) = \frac{\sigma}{\sigma^\alpha + d},
    \qquad \mathrm{update}(M) = U \operatorname{diag}(T(\sigma)) V^\top
    \quad\text{for}\quad M = U \operatorname{diag}(\sigma) V^\top .

Damping modes:

* ``"absolute"``: ``d = damping``, in the units of ``sigma^alpha``.
* ``"relative"``: scale-free. ``T`` is applied to ``y = sigma / sigma_1`` (``sigma_1`` the largest
  singular value), ``T(y) = y / (y^alpha + delta)``: the update does not change when ``M`` is
  multiplied by a constant (like Muon's ``U V^T``, which it equals for ``alpha = 1, delta -> 0``).

Bound: for ``alpha >= 1`` and ``d > 0`` (or ``alpha = 1``) every singular value of the update is at
most :func:`update_bound` ``= sup_{s >= 0} s / (s^alpha + d)``, for any finite ``M``: the kernels
work on ``M / max|M|`` with rescaled damping, so gradients from ``1e-30`` to ``1e30`` neither
underflow nor overflow the Gram matrix, and a final Frobenius cap ``bound * sqrt(min(m, n))``
removes rounding excursions.

Kernels (``M: [m, n]`` or ``[B, m, n]``, computed in float32 for bf16/fp16 inputs, float64 kept):

* :func:`spectral_update_svd`: the reference, an explicit SVD (float64 in the tests).
* :func:`spectral_update_cholesky`: ``alpha = 2``: one Cholesky factorization of the damped smaller
  Gram matrix ``X X^T + d I`` (``k = min(m, n)``): ``~4 m n k + k^3`` flops.
* :func:`spectral_update_eigh`: any ``alpha``: ``eigh`` of the smaller Gram matrix.
* :func:`spectral_update` picks Cholesky for ``alpha = 2`` and ``eigh`` otherwise. On one CPU
  thread Cholesky beats torch.optim.Muon's five bf16 Newton-Schulz iterations (``~30 m n k``
  flops) at every size measured in ``benchmarks/bench_optim_step.py`` (0.59x-0.80x); ``eigh`` does
  on 768 x 3072 (0.88x) but not on square matrices (1.30x at 768, 1.51x at 4096).

Accuracy against the SVD formula in float64 (relative Frobenius error; tested for alpha 1, 1.25,
1.5, 2, 2.5, 3, wide, tall, square and 12:1 matrices with gradient-like power-law spectra, batches
of matrices twelve decades apart in scale, relative ``delta = 0.01`` and absolute ``d = 0.1``):
float64 inputs ``1e-9``; float32 ``2e-3``; bf16 and fp16 parameters (float32 maths, the result
rounded to the parameter's dtype) ``1e-2``. Measured on 768 x 768, 768 x 3072 and 4096 x 4096
gradients (``benchmarks/bench_optim_step.py --accuracy-only``): ``5e-6``, ``2e-5`` and ``6e-5``
for alpha 2, ``5e-5``, ``5e-6`` and ``7e-5`` for alpha 1.5 (float32). A Gram matrix in float32
resolves singular values only down to ``~sqrt(eps) sigma_1``; the damping keeps that from mattering
unless ``d`` is far below ``sigma_1^alpha`` (absolute ``d = 1e-3`` on an ill-conditioned matrix: up
to ``7e-2``).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

__all__ = [
    "DampingMode",
    "spectral_transform",
    "update_bound",
    "spectral_update_svd",
    "spectral_update_cholesky",
    "spectral_update_eigh",
    "spectral_update",
    "scale_to_rms",
]

_EIGVALSH_MAX_K = 256  # exact top eigenvalue up to this size, a Krylov estimate above
_KRYLOV_DIM = 32


class DampingMode(str, Enum):
    """How the damping in ``T(sigma) = sigma / (sigma^alpha + d)`` is set."""

    ABSOLUTE = "absolute"  # d = damping
    RELATIVE = "relative"  # T applied to sigma / sigma_1 with d = damping (scale-free)


def _damping_mode(damping_mode: DampingMode | str) -> DampingMode:
    try:
        return DampingMode(damping_mode)
    except ValueError:
        raise ValueError(
            f"damping_mode must be one of {[m.value for m in DampingMode]}, got {damping_mode!r}"
        ) from None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise (float64 references stay exact)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spectral_transform(sigma: Tensor, *, alpha: float, damping: float | Tensor) -> Tensor:
    r"""``T(sigma) = sigma / (sigma^alpha + d)``, elementwise.

    Args:
        sigma: singular values ``[...]``, non-negative.
        alpha: curvature exponent (``h_k ~ sigma_k^alpha``).
        damping: ``d >= 0``; a tensor broadcasts against ``sigma``.

    Example:
        >>> import torch
        >>> spectral_transform(torch.tensor([0.0, 1.0, 2.0]), alpha=2.0, damping=1.0)
        tensor([0.0000, 0.5000, 0.4000])
    """
    return sigma / (sigma.pow(alpha) + damping)


def update_bound(alpha: float, damping: float) -> float:
    r"""``sup_{s >= 0} s / (s^alpha + d)``: the largest singular value an update can have.

    ``alpha = 1``: ``1`` (approached as ``s -> inf``). ``alpha > 1, d > 0``: attained at
    ``s* = (d / (alpha - 1))^{1/alpha}``, ``(alpha - 1) s* / (alpha d)``. Infinite for ``alpha < 1``
    or ``alpha > 1`` with ``d = 0``. In relative mode ``s`` is ``sigma / sigma_1``, ``d = delta``.

    Example:
        >>> update_bound(2.0, 0.01)  # 1 / (2 sqrt(d))
        5.0
        >>> update_bound(1.0, 0.01)
        1.0
    """
    if alpha == 1.0:
        return 1.0
    if alpha < 1.0 or damping <= 0:
        return math.inf
    s = (damping / (alpha - 1.0)) ** (1.0 / alpha)
    return (alpha - 1.0) * s / (alpha * damping)


def spectral_update_svd(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""Reference: ``U diag(T(sigma)) V^T`` from an explicit thin SVD of ``M``.

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        alpha: curvature exponent.
        damping: ``d`` (absolute) or ``delta`` (relative: ``T(sigma / sigma_1)``).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    X = M.to(_compute_dtype(M.dtype))
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # U: [..., m, k], S: [..., k]
    if mode is DampingMode.RELATIVE:
        top = S[..., :1]
        S = torch.where(top > 0, S / torch.where(top > 0, top, 1.0), 0.0)
    T = spectral_transform(S, alpha=alpha, damping=damping)
    T = torch.where(S > 0, T, 0.0)  # T(0) = 0, also for d = 0
    return ((U * T.unsqueeze(-2)) @ Vh).to(M.dtype)


def _gram(X: Tensor) -> tuple[Tensor, bool]:
    """The smaller Gram matrix ``[..., k, k]`` and whether it is ``X^T X`` (tall ``X``)."""
    tall = X.shape[-2] > X.shape[-1]
    return (X.mT @ X if tall else X @ X.mT), tall


def _top_eigenvalue(S: Tensor) -> Tensor:
    """Largest eigenvalue of symmetric PSD ``S [B, k, k]`` -> ``[B]``.

    Exact (``eigvalsh``) for ``k <= 256``; above, the largest Ritz value of a
    ``32``-dimensional Krylov space (fully reorthogonalized, Rayleigh-Ritz), which is never above
    the true value and within ``1e-4`` of it on the spectra tested (``O(k^2)`` per vector instead
    of ``eigvalsh``'s ``O(k^3)``).
    """
    k = S.shape[-1]
    if k <= _EIGVALSH_MAX_K:
        return torch.linalg.eigvalsh(S)[..., -1]
    gen = torch.Generator(device=S.device).manual_seed(0)
    q = torch.randn(S.shape[0], k, 1, generator=gen, device=S.device, dtype=S.dtype)
    Q = q / q.norm(dim=-2, keepdim=True)  # [B, k, j]
    for _ in range(_KRYLOV_DIM - 1):
        w = S @ Q[..., -1:]
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - Q @ (Q.mT @ w)
        norm = w.norm(dim=-2, keepdim=True)
        w = w / norm.clamp_min(torch.finfo(S.dtype).tiny)  # a zero w adds a zero column
        Q = torch.cat([Q, w], dim=-1)
    T = Q.mT @ (S @ Q)  # [B, j, j]: Rayleigh-Ritz
    return torch.linalg.eigvalsh((T + T.mT) / 2)[..., -1]


def _prepare(M: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``X = M / s`` with ``s = max|M|`` per matrix (``1`` for a zero matrix), ``s [B]``, the
    Gram matrix of ``X`` and whether it is ``X^T X``: entries of ``X`` are at most 1, so the Gram
    matrix neither underflows nor overflows whatever the scale of ``M``."""
    X = M.to(_compute_dtype(M.dtype))
    s = X.abs().amax(dim=(-2, -1))  # [B]
    s = torch.where(s > 0, s, 1.0)
    X = X / s[:, None, None]
    S, tall = _gram(X)
    return X, s, S, tall


def _factors(
    s: Tensor, lam1: Tensor, *, alpha: float, damping: float, mode: DampingMode, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``T(sigma) = c x f(x^2)``, ``sigma = s x``, ``f(lambda) = 1 / (r lambda^{alpha/2} + e)``.

    Absolute: ``d' = d / s^alpha``, ``c0 = s^{1-alpha}``. Relative: ``d' = delta x_1^alpha``,
    ``c0 = x_1^{alpha-1}`` with ``x_1 = sqrt(lam1) = sigma_1 / s``. Then ``r = 1 / max(1, d')``,
    ``e = min(d', 1)``, ``c = c0 / max(1, d')``: computed in float64, so that a huge ``d'``
    (tiny gradients) becomes the limit ``T(sigma) = sigma / d`` instead of an overflow.

    Returns:
        ``r, e, c``, each ``[B, 1]`` in ``dtype``.
    """
    s64 = s.double()
    if mode is DampingMode.ABSOLUTE:
        d = damping / s64.pow(alpha)
        c0 = s64.pow(1.0 - alpha)
    else:
        x1 = lam1.double().clamp_min(0).sqrt()
        x1 = torch.where(x1 > 0, x1, 1.0)
        d = damping * x1.pow(alpha)
        c0 = x1.pow(alpha - 1.0)
    big = d.clamp_min(1.0)
    return tuple((v / big)[:, None].to(dtype) for v in (torch.ones_like(d), d, c0))


def spectral_update_cholesky(
    M: Tensor,
    *,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""``alpha = 2``: ``(M M^T + d I)^{-1} M`` (or ``M (M^T M + d I)^{-1}`` for tall ``M``).

    One Cholesky factorization of the damped smaller ``[k, k]`` Gram matrix, ``k = min(m, n)``
    (of ``M / max|M|``, see the module docstring). Relative damping needs ``sigma_1``: exact for
    ``k <= 256``, a Krylov estimate above. Where the factorization fails (``d = 0`` with a singular
    Gram matrix) the matrices are redone by :func:`spectral_update_eigh` (a pseudo-inverse there).

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        damping: ``d`` (absolute) or ``delta`` (relative).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``U diag(sigma / (sigma^2 + d)) V^T``, ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    batch = M.unsqueeze(0) if M.dim() == 2 else M
    X, s, S, tall = _prepare(batch)
    top = _top_eigenvalue(S) if mode is DampingMode.RELATIVE else s
    r, e, c = (v[..., None] for v in _factors(s, top, alpha=2.0, damping=damping, mode=mode,
                                              dtype=X.dtype))  # [B, 1, 1]
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(r * S + e * eye)
    # The inverse from the factor (k^3) and one matmul beat cholesky_solve's triangular solves
    # with max(m, n) >> k right-hand sides (~5x on CPU for 64 x 512).
    failed = info.ne(0)  # [B]: factorization failed (redone below); invert I there
    inv = torch.cholesky_inverse(torch.where(failed[:, None, None], eye, L)) * c  # [B, k, k]
    out = X @ inv if tall else inv @ X
    if failed.any():  # one host sync: cholesky_ex reports failures per matrix without raising
        out[failed] = spectral_update_eigh(batch[failed], alpha=2.0, damping=damping,
                                           damping_mode=mode).to(out.dtype)
    return out.reshape(M.shape).to(M.dtype)


def spectral_update_eigh(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""Any ``alpha``: ``Q diag(f(lambda)) Q^T M`` by ``eigh`` of the smaller Gram matrix.

    With ``S = M M^T = Q diag(lambda) Q^T`` (``lambda = sigma^2``) and
    ``f(lambda) = 1 / (lambda^{alpha/2} + d)`` this is ``U diag(sigma / (sigma^alpha + d)) V^T``
    (for tall ``M`` the same on the right with ``M^T M``). Eigenvalues below
    ``k * eps * lambda_max`` are rounding noise of zero singular values: for ``d = 0`` their factor
    is zero (a pseudo-inverse).

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        alpha: curvature exponent.
        damping: ``d`` (absolute) or ``delta`` (relative).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    batch = M.unsqueeze(0) if M.dim() == 2 else M
    X, s, S, tall = _prepare(batch)
    lam, Q = torch.linalg.eigh(S)  # lam: [B, k] ascending, Q: [B, k, k]
    k = lam.shape[-1]
    floor = lam[..., -1:].clamp_min(0) * (k * torch.finfo(lam.dtype).eps)  # [B, 1]
    zero = lam <= floor  # rounding noise of a zero singular value
    lam = lam.clamp_min(0)
    r, e, c = _factors(s, lam[..., -1], alpha=alpha, damping=damping, mode=mode, dtype=X.dtype)
    denom = r * lam.pow(alpha / 2) + e
    f = torch.where(zero & (e == 0), torch.zeros_like(lam), 1.0 / denom)  # [B, k]
    P = (Q * (c * f).unsqueeze(-2)) @ Q.mT  # [B, k, k]: k^3, then one [k, k] x [k, max(m, n)]
    out = X @ P if tall else P @ X
    return out.reshape(M.shape).to(M.dtype)


def spectral_update(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    """Cholesky for ``alpha == 2``, ``eigh`` otherwise, then the Frobenius cap of the bound.

    Example:
        >>> import torch
        >>> M = torch.randn(4, 6, dtype=torch.float64) * 1e-20  # tiny gradients stay bounded
        >>> out = spectral_update(M, alpha=2.0, damping=0.01, damping_mode="relative")
        >>> bool(torch.linalg.matrix_norm(out, 2) <= update_bound(2.0, 0.01) * (1 + 1e-9))
        True
    """
    if float(alpha) == 2.0:
        out = spectral_update_cholesky(M, damping=damping, damping_mode=damping_mode)
    else:
        out = spectral_update_eigh(M, alpha=alpha, damping=damping, damping_mode=damping_mode)
    bound = update_bound(float(alpha), damping)
    if math.isfinite(bound):
        k = min(M.shape[-2:])
        norm = torch.linalg.matrix_norm(out.to(_compute_dtype(out.dtype)), keepdim=True)
        out = out * (bound * math.sqrt(k) / norm.clamp_min(1e-30)).clamp(max=1.0).to(out.dtype)
    return out


def scale_to_rms(update: Tensor, *, target: float, eps: float = 1e-12) -> Tensor:
    r"""Rescale each matrix so that its root-mean-square entry is ``target``.

    This is the exact version of Moonlight's ``0.2 * sqrt(max(m, n))`` factor ("Muon is Scalable
    for LLM Training", Liu et al., 2025, arXiv:2502.16982): that factor gives RMS 0.2 only for an
    orthogonal full-rank update, while ``T(sigma)`` is not orthogonal in general, so we measure
    the RMS. With ``target = 0.2`` (AdamW's typical update RMS) AdamW learning rates transfer.
    A zero update stays zero; no update ends above RMS ``target``.

    Args:
        update: ``[m, n]`` or ``[B, m, n]``.
        target: the RMS to reach.
        eps: guards a zero update.
    """
    rms = update.to(_compute_dtype(update.dtype)).pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    return update * (target / rms.clamp_min(eps)).to(update.dtype)
