r"""Lanczos with full reorthogonalization for extreme eigenvalues of a symmetric operator.

The operator is given only through ``matvec`` (e.g. a Hessian-vector product), so nothing here
knows about models. After ``j`` steps the Krylov basis ``Q_j`` and the tridiagonal
``T_j = Q_j^T A Q_j`` give Ritz pairs ``(theta_i, Q_j s_i)`` whose residual norms are
``|beta_{j+1} s_{j,i}|`` (Paige); a symmetric ``A`` has an eigenvalue within that distance of
``theta_i``, and within ``r_i^2 / gap_i`` when nothing else of the spectrum is within ``gap_i``
(Kato-Temple). Iteration stops when every wanted Ritz value's estimated error
``min(r_i, r_i^2 / gap_i)``, the gap estimated from the other Ritz values (see
:func:`error_bounds`), is below ``tol * |theta_i|``. Near convergence the error is the smaller
of the two by orders of magnitude, so a tolerance on it is a tolerance on what is reported.
Each new vector is orthogonalized against the whole basis
twice ("twice is enough"), so the Ritz values carry no spurious copies. When the Krylov space
becomes invariant, the iteration continues from a fresh random vector orthogonal to the basis,
which uncovers further copies of repeated eigenvalues; it stops when such a restart leaves the
wanted Ritz values unchanged. With ``max_basis`` the basis never holds more than that many
vectors: a full basis is compressed to the best Ritz vectors and the iteration goes on from the
residual direction (thick restart; K. Wu and H. Simon, "Thick-restart Lanczos method for large
symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22, 2000), which keeps the memory of a
38M-dimensional block at a few vectors. The projected matrix ``H = Q^T A Q`` is kept from the
Gram-Schmidt coefficients, so it is tridiagonal without restarts and arrow-shaped after one.

Used for ``s_lanczos``, the independent check on the Rayleigh-quotient exponent of "Spectral
Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of the Curvature Exponent"
(Calvo, 2026, arXiv:2606.02596): the decay of the top eigenvalues of a layer's Hessian block.

References: C. Lanczos (1950); C. C. Paige (1971); B. N. Parlett, *The Symmetric Eigenvalue
Problem* (1998), ch. 13.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from curvlens._options import parse_option
from curvlens._progress import progress_bar

__all__ = ["Which", "error_bounds", "lanczos", "lanczos_tridiagonal"]


class Which(str, Enum):
    """Which end of the spectrum to compute."""

    LARGEST = "largest"
    SMALLEST = "smallest"
    BOTH = "both"


def parse_which(which: Which | str) -> Which:
    """``which`` as a :class:`Which` (a string or the enum; ValueError names the choices)."""
    return parse_option(Which, which, "which")


def random_unit(
    dim: int, *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """A Gaussian random unit vector ``[dim]``, drawn on the generator's device and moved."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(dim, generator=generator, dtype=dtype, device=gen_device).to(device)
    return v / torch.linalg.vector_norm(v)


def _apply(matvec: Callable[[Tensor], Tensor], q: Tensor) -> Tensor:
    w = matvec(q)
    if not isinstance(w, Tensor) or w.shape != q.shape:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"matvec must map a [{q.shape[0]}] tensor to [{q.shape[0]}], got {got}")
    return w.to(q.dtype)


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Classical Gram-Schmidt against the rows of ``basis [j, dim]``, done twice."""
    for _ in range(2):
        w = w - basis.mT @ (basis @ w)
    return w


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    num_iter: int,
) -> tuple[Tensor, Tensor]:
    """``num_iter`` plain Lanczos steps from ``v0`` with full reorthogonalization.

    Used by stochastic Lanczos quadrature, where the start vector matters and no restart is
    wanted: the iteration stops early (shorter output) if the Krylov space becomes invariant.

    Args:
        matvec: ``[dim] -> [dim]``, a symmetric operator.
        v0: ``[dim]`` start vector (normalized here).
        num_iter: the maximum Krylov dimension.

    Returns:
        ``(alpha [j], beta [j - 1])``: diagonal and off-diagonal of ``T_j``, ``j <= num_iter``.
    """
    dim = v0.shape[0]
    num_iter = min(num_iter, dim)
    basis = torch.empty(num_iter, dim, dtype=v0.dtype, device=v0.device)
    alpha = torch.empty(num_iter, dtype=v0.dtype, device=v0.device)
    beta = torch.empty(num_iter, dtype=v0.dtype, device=v0.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    j = 0
    while True:
        w = _apply(matvec, basis[j])
        alpha[j] = basis[j] @ w
        w = _orthogonalize(w, basis[: j + 1])
        beta[j] = torch.linalg.vector_norm(w)
        j += 1
        scale = alpha[:j].abs().max().clamp_min(torch.finfo(v0.dtype).tiny)
        if j == num_iter or float(beta[j - 1]) <= 1e3 * torch.finfo(v0.dtype).eps * float(scale):
            return alpha[:j], beta[: j - 1]
        basis[j] = w / beta[j - 1]


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    *,
    which: Which | str = Which.LARGEST,
    num_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    return_vectors: bool = False,
    progress: bool = False,
    max_basis: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization.

    Args:
        matvec: ``[dim] -> [dim]``, a symmetric linear operator (e.g. a Hessian-vector product).
            It receives tensors of ``dtype`` on ``device``.
        dim: the operator's dimension.
        k: how many eigenvalues (at each end for ``which="both"``); ``1 <= k <= dim``.
        which: ``"largest"`` (algebraically), ``"smallest"``, or ``"both"``.
        num_iter: the maximum number of ``matvec`` calls (the Krylov dimension without
            restarts); default
            ``min(dim, max(30 * k, 100))``. A warning says so when it was not enough.
        tol: relative eigenvalue error: stop when each wanted Ritz value's estimated error
            ``min(r, r^2 / gap)`` (``r = ||A y - theta y||``, the gap to the rest of the
            spectrum estimated from the other Ritz values; :func:`error_bounds`) is at most
            ``tol * |theta|``; default ``100 * eps`` of ``dtype`` (working accuracy). ``r``
            bounds the distance to some eigenvalue; the squared form relies on the estimated
            gap, so an eigenvalue that no Ritz value has resolved yet (a close member of a
            cluster at the ``k``-th place) can be missed: the ``k``-th value then approximates
            its neighbour. Tighter ``tol`` makes that less likely.
        generator: seeds the random start vector (and restarts); same generator state, same
            result.
        v0: ``[dim]`` start vector instead of a random one.
        dtype: working precision of the basis and ``matvec`` inputs (``float32`` or ``float64``).
        device: where the basis lives.
        return_vectors: also return the Ritz vectors.
        progress: show a tqdm progress bar over the iterations.
        max_basis: keep at most this many basis vectors (memory ``max_basis * dim`` entries of
            ``dtype``); when the basis is full, a thick restart (Wu and Simon) keeps the wanted
            Ritz vectors and about half the free room nearest them, and continues from the
            residual direction. At least ``k + 2`` (``2 k + 2`` for ``"both"``). Default: no
            limit (the basis grows up to ``num_iter``).

    Like every single-vector Krylov method (ARPACK included), a repeated eigenvalue may show up
    once among converged Ritz values before all its copies do; the copies appear when the
    Krylov space is exhausted (small ``dim``) or, for the top of a Hessian, rarely matter.

    Returns:
        ``eigenvalues [k]`` in descending order (``[2 k]`` for ``"both"``: the ``k`` largest then
        the ``k`` smallest, all descending), and with ``return_vectors`` also the unit Ritz
        vectors ``[dim, k]`` (``[dim, 2 k]``) as columns in the same order.

    Raises:
        ValueError: bad ``k``, ``dim``, ``which``, ``num_iter``, ``v0`` or ``matvec`` output shape.
        TypeError: ``dtype`` is not a real floating type.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> lanczos(lambda v: A @ v, 50, 3).round(decimals=8)
        tensor([50., 49., 48.], dtype=torch.float64)
    """
    which = parse_which(which)
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    n_ends = 2 if which is Which.BOTH else 1
    if not (isinstance(k, int) and 1 <= k and n_ends * k <= dim):
        raise ValueError(
            f"k must be an int with 1 <= k{' * 2' if n_ends == 2 else ''} <= dim={dim}, got {k!r}"
        )
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex):
        raise TypeError(f"dtype must be a real floating dtype (float32/float64), got {dtype!r}")
    if num_iter is None:
        num_iter = min(dim, max(30 * k, 100))
    if not (isinstance(num_iter, int) and n_ends * k <= num_iter):
        raise ValueError(f"num_iter must be an int >= {n_ends * k}, got {num_iter!r}")
    if max_basis is None or max_basis >= dim:  # no restart: the Krylov space ends at dim
        num_iter = min(num_iter, dim)
    eps = torch.finfo(dtype).eps
    tol = 100 * eps if tol is None else float(tol)
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol!r}")

    if max_basis is not None and not (isinstance(max_basis, int) and max_basis >= n_ends * k + 2):
        raise ValueError(
            f"max_basis must be an int >= {n_ends * k + 2} (the wanted Ritz vectors plus two) "
            f"for k={k}, which={which.value!r}, got {max_basis!r}"
        )
    if v0 is None:
        q = random_unit(dim, generator=generator, dtype=dtype, device=device)
    else:
        if v0.shape != (dim,):
            raise ValueError(f"v0 must have shape [{dim}], got {tuple(v0.shape)}")
        q = v0.to(dtype=dtype, device=device)
        q = q / torch.linalg.vector_norm(q)

    cap = min(num_iter, dim) if max_basis is None else min(num_iter, dim, max_basis)
    # rows q_1..q_j; grown by doubling without a cap, since convergence usually comes long before
    # num_iter; with max_basis the whole (bounded) basis is allocated at once
    size = cap if max_basis is not None else min(cap, 2 * n_ends * k + 20)
    basis = torch.empty(size, dim, dtype=dtype, device=device)
    # the projected matrix H = Q^T A Q lives on the CPU: each step needs its eigenvalues anyway;
    # tridiagonal until a thick restart makes its kept block diagonal with one coupling row
    H = torch.zeros(cap, cap, dtype=torch.float64)
    basis[0] = q
    bar = _progress_bar(progress, num_iter)
    converged = False
    j = n_mv = restarts = 0
    theta = s = last_breakdown = None
    try:
        while n_mv < num_iter:
            w = _apply(matvec, basis[j])
            n_mv += 1
            coef = basis[: j + 1] @ w  # Gram-Schmidt twice; the coefficients are column j of H
            w = w - basis[: j + 1].mT @ coef
            again = basis[: j + 1] @ w
            w = w - basis[: j + 1].mT @ again
            col = (coef + again).to(device="cpu", dtype=torch.float64)
            H[: j + 1, j] = col
            H[j, : j + 1] = col
            beta = torch.linalg.vector_norm(w)
            beta_f = float(beta)
            j += 1
            if bar is not None:
                bar.update(1)
            theta, s = torch.linalg.eigh(H[:j, :j])  # ascending
            wanted = _wanted(j, k, which)
            scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
            breakdown = beta_f <= 1e3 * eps * float(scale)
            if breakdown:
                # The Krylov space is invariant: all Ritz values are eigenvalues, but copies of
                # repeated ones may lie outside it. Stop once a restart changes nothing wanted.
                if j >= n_ends * k and last_breakdown is not None and bool(
                    ((theta[wanted] - last_breakdown).abs() <= tol * scale).all()
                ):
                    converged = True
                    break
                last_breakdown = theta[wanted] if j >= n_ends * k else None
            elif j >= n_ends * k:
                last_breakdown = None
                err = error_bounds(theta, (beta_f * s[-1]).abs(), wanted)
                floor = 10 * eps * scale
                if bool((err <= torch.maximum(tol * theta[wanted].abs(), floor)).all()):
                    converged = True
                    break
            if n_mv == num_iter or (j == dim and restarts == 0 and not breakdown):
                break
            if j == cap:  # thick restart: keep the best Ritz vectors, continue from the residual
                keep = _kept(j, k, which, cap)
                _compress(basis, s[:, keep].to(basis.device, dtype), j)
                H.zero_()
                H[: keep.numel(), : keep.numel()] = torch.diag(theta[keep])
                j = keep.numel()
                restarts += 1
            elif j == basis.shape[0]:
                basis = torch.cat([basis, torch.empty_like(basis[: min(size, cap - j)])])
            if breakdown:  # invariant subspace: continue from a fresh orthogonal direction
                w = _orthogonalize(
                    random_unit(dim, generator=generator, dtype=dtype, device=device),
                    basis[:j],
                )
                basis[j] = w / torch.linalg.vector_norm(w)
            else:
                basis[j] = w / beta
    finally:
        if bar is not None:
            bar.close()
    if not converged and j < dim:
        warnings.warn(
            f"lanczos: the wanted {k} Ritz values did not reach tol={tol:g} within "
            f"num_iter={num_iter} iterations; raise num_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    idx = _wanted(j, k, which).flip(0)  # descending
    values = theta[idx].to(device=device, dtype=dtype)
    if not return_vectors:
        return values
    vectors = basis[:j].mT @ s[:, idx].to(device=device, dtype=dtype)  # [dim, k]
    return values, vectors


def error_bounds(theta: Tensor, resid: Tensor, idx: Tensor) -> Tensor:
    r"""Estimated errors ``min(r_i, r_i^2 / gap_i)`` of the Ritz values ``theta[idx]``.

    ``r_i = ||A y_i - theta_i y_i||``: a symmetric ``A`` has an eigenvalue within ``r_i`` of
    ``theta_i``, and when no other eigenvalue lies within ``gap_i`` of ``theta_i`` that
    eigenvalue is within ``r_i^2 / gap_i`` (Kato-Temple; Parlett, ch. 11). The gap is estimated
    from the other Ritz values: the distance from ``theta_i`` to the nearest interval
    ``[theta_l - r_l, theta_l + r_l]`` (each holds an eigenvalue). That is the standard
    practical estimate, not a bound: an eigenvalue no Ritz value has resolved yet (a close
    member of a cluster, or one the start vector barely touches) can lie closer. Where the
    estimated gap is not above ``r_i`` (or there is no other Ritz value), the estimate is ``r_i``.

    Args:
        theta: ``[j]`` Ritz values (any order).
        resid: ``[j]`` their residual norms.
        idx: ``[w]`` indices of the Ritz values to bound.

    Returns:
        ``[w]`` error estimates, in the order of ``idx``.
    """
    dist = (theta[idx, None] - theta[None, :]).abs() - resid[None, :]  # [w, j]
    dist[torch.arange(idx.numel()), idx] = torch.inf
    gap = dist.min(dim=1).values if theta.numel() > 1 else torch.zeros_like(resid[idx])
    r = resid[idx]
    return torch.where(gap > r, r**2 / gap, r)


def _kept(j: int, k: int, which: Which, cap: int) -> Tensor:
    """Indices (ascending) of the Ritz vectors a thick restart keeps: the wanted ones plus about
    half the free room nearest to them, so each restart cycle adds at least two new vectors."""
    n_ends = 2 if which is Which.BOTH else 1
    keep = min(cap - 2, n_ends * k + max(0, (cap - n_ends * k) // 2 - 1))
    if which is Which.LARGEST:
        return torch.arange(j - keep, j)
    if which is Which.SMALLEST:
        return torch.arange(0, keep)
    low = keep // 2
    return torch.cat([torch.arange(0, low), torch.arange(j - (keep - low), j)])


def _compress(basis: Tensor, S: Tensor, j: int, chunk: int = 1 << 16) -> None:
    """``basis[:l] = S^T basis[:j]`` in place (``S [j, l]``), a column block at a time, so the
    only extra memory is one ``[l, chunk]`` block."""
    kept = S.shape[1]
    for start in range(0, basis.shape[1], chunk):
        block = basis[:j, start : start + chunk]
        basis[:kept, start : start + chunk] = S.mT @ block


def _wanted(j: int, k: int, which: Which) -> Tensor:
    """Indices (ascending) into ascending Ritz values of the wanted ones."""
    k = min(k, j)
    top = torch.arange(j - k, j)
    if which is Which.LARGEST:
        return top
    bottom = torch.arange(0, k)
    if which is Which.SMALLEST:
        return bottom
    return torch.unique(torch.cat([bottom, top]))


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    return progress_bar(total=total, desc="lanczos", unit="matvec", leave=False)
