"""Truncated singular value decomposition of gradient matrices.

``gradient_svd`` returns the top-k singular triplets of ``G = U diag(S) V^T`` with singular values
descending and a deterministic sign convention: each column ``u_k`` has its largest-magnitude
entry positive (ties go to the first such entry) and ``v_k`` follows. Three paths give the same
numbers:

* ``"gram"`` (the default when the smaller side is at most :data:`GRAM_LIMIT`): the eigenpairs of
  the smaller Gram matrix ``G G^T`` (or ``G^T G``), formed and decomposed in float64, so
  ``sigma_k = sqrt(lambda_k)`` and the other side's vectors are ``G^T u_k / sigma_k``. A wide
  ``512 x 4608`` gradient costs one ``512 x 512`` eigendecomposition instead of an SVD of the
  whole matrix. Values with ``sigma_k / sigma_1`` near ``sqrt(eps)`` of float64 lose relative
  accuracy (the Gram squares the condition number), far below anything a log-log fit uses.
* ``"subspace"``: block subspace iteration with a Rayleigh-Ritz step for ``k << min(m, n)`` on
  large matrices, iterated until the top-k singular values have converged to the working
  precision (a randomized start, seeded).
* ``"dense"``: ``torch.linalg.svd``.

:func:`gram_singular_values` returns only the values (what the training-time lens records), with
the Gram formed in the input's precision when that is accurate enough for the requested window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlens._arrays import all_finite

__all__ = ["gradient_svd", "gram_singular_values", "fix_signs"]

#: matrices whose smaller side is at most this use the Gram path under ``method="auto"``
GRAM_LIMIT = 2048


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
        method: ``"auto"`` (the Gram path when the smaller side is at most
            :data:`GRAM_LIMIT`, else subspace iteration for ``k << min(m, n)`` or the dense SVD),
            ``"gram"``, ``"dense"`` or ``"subspace"``.
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
    if not all_finite(G):
        raise ValueError("gradient_svd got NaN or Inf entries; check the loss and the gradient")
    if method not in ("auto", "gram", "dense", "subspace"):
        raise ValueError(f"method must be 'auto', 'gram', 'dense' or 'subspace', got {method!r}")
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    if method == "auto":
        method = "gram" if r <= GRAM_LIMIT else ("dense" if 4 * k >= r else "subspace")
    if method == "gram":
        U, S, V = _gram_svd(work, int(k))
    elif method == "dense":
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


def _below_gram_resolution(evals: Tensor, r: int) -> bool:
    """Whether the smallest of the descending Gram eigenvalues ``evals`` is below what a float64
    Gram resolves (``sigma_k / sigma_1`` under about ``1e-6``): its square root would be
    rounding noise, so the caller takes the SVD instead."""
    return float(evals[-1]) <= _GRAM_RESOLUTION * r * float(evals[0])


#: a Gram eigenvalue below this times ``r * lambda_1`` is rounding noise (``1e4 * eps_64``)
_GRAM_RESOLUTION = 1e4 * torch.finfo(torch.float64).eps


def _gram_svd(G: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets from ``eigh`` of the smaller Gram matrix, in float64 (the dense SVD when
    the wanted values go below the Gram's resolution: rank-deficient gradients)."""
    transpose = G.shape[0] > G.shape[1]
    A = G.mT if transpose else G  # [r, c] with r <= c
    used = _used_columns(A)  # all-zero columns add nothing to the Gram, and zero rows to V
    A = (A if used is None else A[:, used]).to(torch.float64)
    evals, evecs = torch.linalg.eigh(A @ A.mT)  # ascending, [r], [r, r]
    if _below_gram_resolution(evals.flip(0)[:k], A.shape[0]):
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].mT
    S = evals.flip(0)[:k].clamp_min(0).sqrt()  # [k]
    Us = evecs.flip(1)[:, :k]  # [r, k]
    tiny = torch.finfo(torch.float64).tiny
    Vs = (A.mT @ Us) / S.clamp_min(tiny)  # [c, k]
    Vs = Vs / torch.linalg.vector_norm(Vs, dim=0).clamp_min(tiny)  # exact zero sigma: a unit-ish
    if used is not None:
        Vs = Vs.new_zeros(used.shape[0], k).index_copy_(0, used.nonzero().flatten(), Vs)
    U, V = (Vs, Us) if transpose else (Us, Vs)
    return U.to(G.dtype), S.to(G.dtype), V.to(G.dtype)


#: Gram matrices from this side on multiply only their upper block triangle (8 block rows)
_BLOCKED_GRAM_FROM = 256


def _gram(A: Tensor) -> Tensor:
    """``A A^T`` for ``A [r, c]``. From side :data:`_BLOCKED_GRAM_FROM` on, one product per
    block row computes that row's diagonal block and the blocks right of it (36 of 64 blocks,
    about 45% fewer multiply-adds than the full product), and the lower triangle is mirrored."""
    r = A.shape[0]
    if r < _BLOCKED_GRAM_FROM:
        return A @ A.mT
    gram = A.new_zeros(r, r)
    edges = [r * i // 8 for i in range(9)]
    for a, b in zip(edges[:-1], edges[1:]):
        gram[a:b, a:] = A[a:b] @ A[a:].mT
    return gram.triu() + gram.triu(1).mT


#: from this many rows on, all-zero columns are dropped before the Gram is formed
_SPARSE_FROM = 128


def _used_columns(A: Tensor) -> Tensor | None:
    """``[c]`` bool: the columns of ``A [r, c]`` that are not all zero; ``None`` when all are,
    or below :data:`_SPARSE_FROM` rows. All-zero columns add nothing to ``A A^T`` (one pass over
    ``A`` against the Gram's ``r`` passes). A convolution's gradient on 1 x 1 maps is zero in
    every column of a tap that only sees padding: eight ninths of a ResNet-18's last-stage
    512 x 4608 gradients at 32 x 32."""
    if A.shape[0] < _SPARSE_FROM:
        return None
    used = A.abs().sum(0) > 0  # a sum of non-negative values is 0 only when all are
    return None if bool(used.all()) else used


def _nonzero_columns(A: Tensor) -> Tensor:
    """``A [r, c]`` without its all-zero columns (see :func:`_used_columns`)."""
    used = _used_columns(A)
    return A if used is None else A[:, used]


def _refined(A: Tensor, gram: Tensor, k: int, subspace: bool) -> Tensor:
    """Top-``k`` eigenvalues of ``A A^T`` (descending, float64).

    With ``subspace``: Rayleigh-Ritz in float64 on the top ``k + 10`` eigenvectors of the
    low-precision ``gram``, whose error is quadratic in the subspace's (on power-law test
    spectra at most about the square of the Gram's estimate ``eps sigma_1^2 / sigma_k^2``,
    which the caller keeps below ``sqrt(rtol / 10)``); the full float64 Gram of a 512 x 4608
    gradient took 3x longer. Otherwise that Gram."""
    r = A.shape[0]
    if not subspace or r <= k + 10:
        A64 = A.to(torch.float64)
        return torch.linalg.eigvalsh(A64 @ A64.mT).flip(0)[:k].clamp_min(0)
    # the subspace from a working-precision eigh, made orthonormal again in float64
    Q = torch.linalg.qr(torch.linalg.eigh(gram.to(A.dtype))[1][:, -(k + 10):].double())[0]
    B = Q.mT @ A.to(torch.float64)  # [p, c]
    return torch.linalg.eigvalsh(B @ B.mT).flip(0)[:k].clamp_min(0)


def gram_singular_values(G: Tensor, k: int | None = None, *, rtol: float = 1e-5) -> Tensor:
    r"""Top-``k`` singular values of ``G [m, n]`` from its smaller Gram matrix, descending.

    ``sigma_k = sqrt(lambda_k(G G^T))`` (or ``G^T G``, whichever is smaller). The Gram matrix is
    first formed and decomposed in the input's precision; their rounding error moves
    ``sigma_k`` by about ``eps * (sigma_1 / sigma_k)^2`` relative, so when that estimate exceeds
    ``rtol`` for the smallest wanted value the values are refined in float64: by Rayleigh-Ritz
    on the Gram's top ``k + 10`` eigenvectors while that estimate is small, else from the
    Gram formed again in float64. Costs
    ``min(m, n)^2 max(m, n)`` flops plus one small symmetric eigendecomposition, instead of a
    full SVD. A wanted value below about ``1e-6 sigma_1`` (a rank-deficient gradient, e.g. a
    classifier head's) is beyond any Gram's resolution: ``torch.linalg.svdvals`` is used then.

    Args:
        G: [m, n] matrix; half precision is computed in float32.
        k: number of values (default ``min(m, n)``); clipped to ``min(m, n)``.
        rtol: wanted relative accuracy of the returned values (see above).

    Returns:
        [k] singular values, descending, in the working dtype (float32 or float64).

    Raises:
        ValueError: ``G`` is not a non-empty matrix.

    Example:
        >>> G = torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
        >>> gram_singular_values(G).tolist()
        [3.0, 2.0]
    """
    if not isinstance(G, Tensor) or G.dim() != 2 or G.numel() == 0:
        raise ValueError(
            f"gram_singular_values needs a non-empty 2-D tensor, got {getattr(G, 'shape', G)!r}"
        )
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    A = work if work.shape[0] <= work.shape[1] else work.mT  # [r, c], r <= c
    k = min(A.shape[0], A.shape[0] if k is None else int(k))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    A = _nonzero_columns(A)
    gram = _gram(A)
    # decomposed in the Gram's precision: its rounding error is of the size the Gram's own
    # (``eps * lambda_1``), which the refinement below accounts for
    evals = torch.linalg.eigvalsh(gram).flip(0)[:k].clamp_min(0).to(torch.float64)
    if A.dtype != torch.float64 and float(evals[0]) > 0:
        eps = torch.finfo(A.dtype).eps
        smallest = float(evals[-1])
        estimate = eps * float(evals[0]) / smallest if smallest > 0 else float("inf")
        if estimate > rtol:
            evals = _refined(A, gram, k, estimate * estimate <= rtol / 10)
    if float(evals[0]) > 0 and _below_gram_resolution(evals, A.shape[0]):
        return torch.linalg.svdvals(work)[:k]  # rank-deficient: the Gram cannot resolve it
    return evals.sqrt().to(work.dtype)
