r"""Top eigenvalues of a dense symmetric matrix by block Krylov iteration.

For a dense ``A [n, n]`` too large for ``eigvalsh`` (its ``O(n^3)`` costs seconds from
``n ~ 2000`` on one CPU thread), the top ``k`` eigenvalues come from the Krylov space of a block
of ``b`` random vectors, ``span{Q_0, A Q_0, A^2 Q_0, ...}``, with full reorthogonalization and a
Rayleigh-Ritz step: ``H = Q^T A Q``, whose top eigenvalues are the Ritz values ``theta_i`` with
Ritz vectors ``y_i = Q s_i``. Iteration stops when every wanted Ritz pair's residual
``||A y_i - theta_i y_i||`` (computed explicitly) is at most ``tol * |theta_i|``, or below the
rounding level ``10 eps ||A||`` of the products; a symmetric ``A`` has an eigenvalue within the
residual of each ``theta_i`` (a residual rule; :mod:`curvlens.linalg.lanczos` stops on the
estimated error ``min(r, r^2 / gap)`` instead).

A single-vector Lanczos run on a dense matrix reads the whole matrix once per vector; a block
reads it once per ``b`` vectors, so on a ``4608``-sided float64 matrix (170 MB) a product with
16 vectors costs about three with one. A block also finds every copy of an eigenvalue repeated
up to ``b`` times. When the space becomes invariant (a block loses rank), the lost columns are
replaced by random directions orthogonal to the basis.

References: G. H. Golub and R. Underwood, "The block Lanczos method for computing eigenvalues"
(1977); C. Musco and C. Musco, "Randomized block Krylov methods for stronger and faster
approximate singular value decomposition", NeurIPS 2015.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_top_eigenvalues"]


def block_top_eigenvalues(A: Tensor, k: int, *, tol: float, block: int | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """The ``k`` largest eigenvalues of a symmetric ``A [n, n]``, descending, in ``A``'s dtype.

    Args:
        A: [n, n] symmetric (only ``A @ X`` is used; a skew part of rounding size moves no
            eigenvalue to first order).
        k: how many, ``1 <= k <= n``.
        tol: stop when each wanted Ritz pair's residual is at most ``tol * |theta_i|``
            (or ``10 eps ||A||``); each ``theta_i`` is then within that of an eigenvalue, and
            usually within its square over the spectral gap.
        block: vectors per block (default ``max(k + 6, 16)``, at most ``n``).
        generator: seeds the random start block (CPU); default seed 0.

    Returns:
        [k] Ritz values, descending.

    Raises:
        ValueError: ``A`` not square, or ``k`` out of range.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
        >>> block_top_eigenvalues(A, 3, tol=1e-10).round(decimals=8)
        tensor([300., 299., 298.], dtype=torch.float64)
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
    n = A.shape[0]
    if not (isinstance(k, int) and 1 <= k <= n):
        raise ValueError(f"k must be an int with 1 <= k <= n={n}, got {k!r}")
    b = min(n, block or max(k + 6, 16))
    gen = generator or torch.Generator(device="cpu").manual_seed(0)
    eps = torch.finfo(A.dtype).eps
    cap = min(n, 8 * b)  # grown by doubling
    Q = A.new_empty(n, cap)  # orthonormal basis columns
    H = A.new_zeros(cap, cap)  # Q^T A Q from the Gram-Schmidt coefficients
    Q[:, :b] = torch.linalg.qr(_randn(n, b, gen, A))[0]
    start, j = 0, b  # the newest block is Q[:, start:j]
    while True:
        W = A @ Q[:, start:j]  # [n, c]
        coef = Q[:, :j].mT @ W  # Gram-Schmidt twice; the coefficients are H's new columns
        W = W - Q[:, :j] @ coef
        again = Q[:, :j].mT @ W
        W = W - Q[:, :j] @ again
        cols = coef + again
        H[:j, start:j] = cols
        H[start:j, :j] = cols.mT
        theta, S = torch.linalg.eigh(H[:j, :j])  # ascending
        scale = float(theta.abs().max())  # about ||A||
        theta, S = theta[-k:].flip(0), S[:, -k:].flip(1)  # wanted, descending
        nxt, R = torch.linalg.qr(W)  # W = A Q_new - Q (Q^T A Q_new): what the basis misses
        # A y_i - theta_i y_i = W S[start:j, i] for the Ritz vector y_i = Q S[:, i]
        resid = torch.linalg.vector_norm(R @ S[start:j], dim=0)  # [k]
        if j == n or bool((resid <= (tol * theta.abs()).clamp_min(10 * eps * scale)).all()):
            return theta
        c = min(b, n - j)
        lost = R.diagonal().abs()[:c] <= 1e3 * eps * scale  # the space is invariant there
        nxt = nxt[:, :c]
        if bool(lost.any()):  # continue from random directions orthogonal to the basis
            fresh = _randn(n, int(lost.sum()), gen, A)
            done = torch.cat([Q[:, :j], nxt[:, ~lost]], 1)
            for _ in range(2):
                fresh = fresh - done @ (done.mT @ fresh)
            nxt = torch.cat([nxt[:, ~lost], torch.linalg.qr(fresh)[0]], 1)
        if j + c > Q.shape[1]:
            grow = min(n, 2 * Q.shape[1])
            Q = torch.cat([Q, Q.new_empty(n, grow - Q.shape[1])], 1)
            H = torch.nn.functional.pad(H, (0, grow - H.shape[1], 0, grow - H.shape[0]))
        Q[:, j:j + c] = nxt
        start, j = j, j + c


def _randn(n: int, c: int, gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(n, c, generator=gen, dtype=like.dtype).to(like.device)
