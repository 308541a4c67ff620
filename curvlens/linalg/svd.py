"""Truncated singular value decomposition of gradient matrices.

``gradient_svd`` returns the top-k singular triplets of ``G = U diag(S) V^T`` with singular values
descending and a deterministic sign convention: each column ``u_k`` has its largest-magnitude
entry positive (ties go to the first such entry) and ``v_k`` follows. Small matrices go to
``torch.linalg.svd``; large ones with ``k << min(m, n)`` use block subspace iteration with a
Rayleigh-Ritz step, iterated until the top-k singular values have converged to the working
precision, so both paths give the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gradient_svd", "fix_signs"]

#: matrices whose smaller side is at most this go to the dense SVD
DENSE_LIMIT = 512


def fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so each ``U[:, k]`` has its largest-|entry| positive.

    Args:
        U: [m, k] left singular vectors.
        V: [n, k] right singular vectors.

    Returns:
        ``(U, V)`` with the same subspaces and ``U diag(S) V^T`` unchanged.
    """
    idx = U.abs().argmax(dim=0)  # [k]
    signs = torch.sign(U.gather(0, idx[None, :]))[0]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def gradient_svd(
    G: Tensor,
    k: int | None = None,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int = 200,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Top-``k`` singular triplets of a matrix, descending, with deterministic signs.

    Args:
        G: [m, n] matrix (a gradient in a layer's matrix view). Any float dtype; half
            precision is computed in float32.
        k: number of triplets (default: ``min(m, n)``). Must satisfy ``1 <= k <= min(m, n)``.
        method: ``"auto"`` (dense for small matrices or large ``k``, else subspace iteration),
            ``"dense"`` or ``"subspace"``.
        tol: relative convergence tolerance of the iterative path on the singular values
            (default: ``100 * eps`` of the working dtype).
        max_iter: iteration cap of the iterative path.
        generator: random start of the iterative path (default: a generator seeded with 0).

    Returns:
        ``(U [m, k], S [k], V [n, k])`` with ``G ~= U diag(S) V^T`` on the top-k subspace.

    Raises:
        ValueError: ``G`` is not a matrix, is empty, holds NaN/Inf, or ``k`` is out of range.

    Example:
        >>> G = torch.tensor([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
        >>> U, S, V = gradient_svd(G, 1)
        >>> S.tolist(), U[:, 0].tolist(), V[:, 0].tolist()
        ([3.0], [1.0, 0.0, 0.0], [1.0, 0.0])
    """
    if not isinstance(G, Tensor) or G.dim() != 2:
        raise ValueError(f"gradient_svd needs a 2-D tensor, got {getattr(G, 'shape', type(G))}")
    m, n = G.shape
    r = min(m, n)
    if r == 0:
        raise ValueError(f"gradient_svd got an empty matrix of shape {tuple(G.shape)}")
    if k is None:
        k = r
    if not (1 <= int(k) <= r):
        raise ValueError(f"k must be in [1, {r}] for a {m}x{n} matrix, got {k!r}")
    if not torch.isfinite(G).all():
        raise ValueError("gradient_svd got NaN or Inf entries; check the loss and the gradient")
    if method not in ("auto", "dense", "subspace"):
        raise ValueError(f"method must be 'auto', 'dense' or 'subspace', got {method!r}")
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    if method == "dense" or (method == "auto" and (r <= DENSE_LIMIT or 4 * k >= r)):
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].mT
    else:
        U, S, V = _subspace_svd(work, int(k), tol, max_iter, generator)
    U, V = fix_signs(U, V)
    return U, S, V


def _subspace_svd(
    G: Tensor, k: int, tol: float | None, max_iter: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Block subspace iteration on ``G^T G`` with Rayleigh-Ritz, to converged top-k values."""
    transpose = G.shape[0] < G.shape[1]
    A = G.mT if transpose else G  # [m, n] with m >= n
    n = A.shape[1]
    b = min(n, k + max(10, k // 2))  # block size with oversampling
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    Q = torch.randn(n, b, generator=generator, dtype=A.dtype).to(A.device)
    Q, _ = torch.linalg.qr(Q)
    eps = torch.finfo(A.dtype).eps
    tol = 100 * eps if tol is None else tol
    prev = None
    for _ in range(max_iter):
        Y, _ = torch.linalg.qr(A @ Q)  # [m, b]
        Q, _ = torch.linalg.qr(A.mT @ Y)  # [n, b]
        S_small = torch.linalg.svdvals(A @ Q)[:k]
        if prev is not None and torch.all((S_small - prev).abs() <= tol * S_small[0]):
            break
        prev = S_small
    Ub, S, Vh = torch.linalg.svd(A @ Q, full_matrices=False)  # Rayleigh-Ritz
    U, S, V = Ub[:, :k], S[:k], (Q @ Vh.mT)[:, :k]
    return (V, S, U) if transpose else (U, S, V)
