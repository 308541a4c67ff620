r"""The alpha budget: how Kronecker-factor alignment decides the curvature exponent.

Definition 1 and the Spectral Alignment Decomposition of "Spectral Asymptotics of Neural Network
Loss Landscapes: An Exact Decomposition of the Curvature Exponent" (Calvo, 2026,
arXiv:2606.02596). With the gradient ``G = U diag(sigma) V^T`` and the Kronecker factors
``C_delta [m, m]``, ``C_A [n, n]`` (eigenvalues ``lambda_delta``, ``lambda_A`` descending):

.. math::
    \rho^\delta_k = \frac{u_k^T C_\delta u_k}{\lambda^\delta_k}, \quad
    \rho^A_k = \frac{v_k^T C_A v_k}{\lambda^A_k}, \quad
    \Phi_k = \rho^\delta_k \rho^A_k, \quad \Lambda_k = \lambda^\delta_k \lambda^A_k, \quad
    h^{\otimes}_k = (u_k^T C_\delta u_k)(v_k^T C_A v_k), \quad \chi_k = h_k / h^{\otimes}_k,

so that :math:`h_k = \chi_k \Phi_k \Lambda_k` exactly. OLS slopes are linear in the ordinate, so
with :math:`b(x)` the slope of :math:`\log x_k` on :math:`\log \sigma_k` over one window,

.. math::
    \alpha = b(\chi) + b(\rho^\delta) + b(\rho^A) + b(\lambda^\delta) + b(\lambda^A),
    \qquad \beta = b(\Lambda), \quad \varphi = b(\Phi),

to machine precision. The window is the ``k`` with ``h_k > 0`` where every factor is positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlens._arrays import all_finite
from curvlens._factor_forms import (
    DiagonalFactor,
    Factor,
    SketchedFactor,
    factor_dim,
    factor_quad,
    factor_top_eigenvalues,
)

__all__ = ["AlignmentBudget", "alignment_budget", "log_slope"]

_NAN = float("nan")


@dataclass(frozen=True)
class AlignmentBudget:
    """Per-direction alignment quantities and their slopes on ``log sigma``.

    Attributes:
        h_kron: [K] ``(u_k^T C_delta u_k)(v_k^T C_A v_k)``.
        chi, rho_delta, rho_A, lambda_delta, lambda_A: [K] per-direction values (module docstring).
        window: [K] bool, the ``k`` the slopes use.
        b_chi, b_rho_delta, b_rho_A, b_lambda_delta, b_lambda_A: slopes of their logs on
            ``log sigma``; they sum to ``alpha`` over ``window``.
        beta: ``b(Lambda)``; phi: ``b(Phi)``.
        alpha: ``b(h)`` over the same window (equals the budget's sum).
        warnings: why a slope is NaN or the window is smaller than ``h_k > 0``.
    """

    h_kron: Tensor
    chi: Tensor
    rho_delta: Tensor
    rho_A: Tensor
    lambda_delta: Tensor
    lambda_A: Tensor
    window: Tensor
    b_chi: float
    b_rho_delta: float
    b_rho_A: float
    b_lambda_delta: float
    b_lambda_A: float
    beta: float
    phi: float
    alpha: float
    warnings: tuple[str, ...] = field(default=())

    @property
    def total(self) -> float:
        """``b(chi) + b(rho_delta) + b(rho_A) + b(lambda_delta) + b(lambda_A)``."""
        return (self.b_chi + self.b_rho_delta + self.b_rho_A + self.b_lambda_delta
                + self.b_lambda_A)


def log_slope(sigma: Tensor, values: Tensor, window: Tensor) -> float:
    """OLS slope of ``log values`` on ``log sigma`` over ``window`` (NaN below 3 points).

    Args:
        sigma: [K] positive abscissae.
        values: [K] ordinates, positive on ``window``.
        window: [K] bool mask.
    """
    if int(window.sum()) < 3:
        return _NAN
    x = sigma[window].to(torch.float64).log()
    y = values[window].to(torch.float64).log()
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    if sxx <= 0.0:
        return _NAN
    return float((dx * (y - y.mean())).sum()) / sxx


def _checked(C: Factor, name: str) -> Factor:
    """``C`` with its values checked finite, a dense one in float64 (once, for both readers)."""
    values = C.diag if isinstance(C, DiagonalFactor) else (
        C.eigvals if isinstance(C, SketchedFactor) else C)
    if not all_finite(values):
        raise ValueError(f"{name} holds NaN or Inf; recompute the Kronecker factors")
    return C.to(torch.float64) if isinstance(C, Tensor) else C


def alignment_budget(
    sigma: Tensor,
    h: Tensor,
    *,
    C_A: Factor,
    C_delta: Factor,
    U: Tensor,
    V: Tensor,
    window: Tensor | None = None,
) -> AlignmentBudget:
    """The alignment decomposition of one layer's curvature exponent.

    Args:
        sigma: [K] gradient singular values, descending.
        h: [K] directional curvatures ``h_k = vec(D_k)^T H vec(D_k)``.
        C_A: [n, n] column-side Kronecker factor: a tensor, or the diagonal or sketched form
            of :mod:`curvlens._factor_forms` (a sketch's eigenvalues are its Rayleigh-Ritz
            values; only the top ``K`` eigenvalues are computed).
        C_delta: [m, m] row-side Kronecker factor, in the same forms.
        U: [m, K] left singular vectors of the gradient (more columns are ignored).
        V: [n, K] right singular vectors.
        window: [K] bool, the candidate ``k`` (default: all); ``h_k > 0`` and positive factors
            are required on top.

    Returns:
        An :class:`AlignmentBudget` (tensors in float64 on the inputs' device).

    Raises:
        ValueError: shapes that do not fit together, non-finite factors.

    Example:
        >>> C_d, C_a = torch.diag(torch.tensor([4.0, 2.0, 1.0])), torch.eye(3)
        >>> I = torch.eye(3)
        >>> sigma, h = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([4.0, 2.0, 1.0])
        >>> b = alignment_budget(sigma, h, C_A=C_a, C_delta=C_d, U=I, V=I)
        >>> abs(b.total - b.alpha) < 1e-12, b.b_rho_delta == 0.0, round(b.b_chi, 12)
        (True, True, 0.0)
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    h = torch.as_tensor(h, dtype=torch.float64).reshape(-1)
    K = sigma.numel()
    if h.numel() != K:
        raise ValueError(f"sigma and h need the same length, got {K} and {h.numel()}")
    for C, what in ((C_delta, "C_delta"), (C_A, "C_A")):
        if len(C.shape) != 2 or C.shape[0] != C.shape[1]:
            raise ValueError(f"{what} must be a square matrix, got shape {tuple(C.shape)}")
    m, n = factor_dim(C_delta), factor_dim(C_A)
    if U.dim() != 2 or U.shape[0] != m or U.shape[1] < K:
        raise ValueError(
            f"U must be [m={m}, >= K={K}] to match C_delta [{m}, {m}], got {tuple(U.shape)}"
        )
    if V.dim() != 2 or V.shape[0] != n or V.shape[1] < K:
        raise ValueError(
            f"V must be [n={n}, >= K={K}] to match C_A [{n}, {n}], got {tuple(V.shape)}"
        )
    if K > min(m, n):
        raise ValueError(f"K={K} directions exceed the factor sizes m={m}, n={n}")
    C_delta, C_A = _checked(C_delta, "C_delta"), _checked(C_A, "C_A")
    lam_d = factor_top_eigenvalues(C_delta, K).to(sigma.device)
    lam_a = factor_top_eigenvalues(C_A, K).to(sigma.device)
    U64, V64 = U[:, :K].to(torch.float64), V[:, :K].to(torch.float64)
    q_d = factor_quad(C_delta, U64).to(sigma.device)
    q_a = factor_quad(C_A, V64).to(sigma.device)
    h_kron = q_d * q_a
    with torch.no_grad():
        rho_d, rho_a = q_d / lam_d, q_a / lam_a
        chi = h / h_kron
    base = torch.ones(K, dtype=torch.bool, device=sigma.device) if window is None else window
    base = base & (h > 0) & (sigma > 0)
    positive = (q_d > 0) & (q_a > 0) & (lam_d > 0) & (lam_a > 0)
    win = base & positive
    notes: list[str] = []
    lost = torch.nonzero(base & ~positive).flatten().add(1).tolist()
    if lost:
        notes.append(
            f"alignment budget: k={lost} left out (a Kronecker factor eigenvalue or quadratic form "
            "is <= 0 there), so the budget sums to alpha over the smaller window"
        )
    if int(win.sum()) < 3:
        notes.append(
            f"alignment budget undefined: fewer than 3 directions ({int(win.sum())}) with h_k > 0 "
            "and positive Kronecker factors"
        )

    def b(x: Tensor) -> float:
        return log_slope(sigma, x, win)

    return AlignmentBudget(
        h_kron=h_kron, chi=chi, rho_delta=rho_d, rho_A=rho_a, lambda_delta=lam_d,
        lambda_A=lam_a, window=win,
        b_chi=b(chi), b_rho_delta=b(rho_d), b_rho_A=b(rho_a), b_lambda_delta=b(lam_d),
        b_lambda_A=b(lam_a), beta=b(lam_d * lam_a), phi=b(rho_d * rho_a), alpha=b(h),
        warnings=tuple(notes),
    )

