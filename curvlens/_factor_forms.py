r"""Forms of a Kronecker factor side and the readers that accept every form.

A factor ``C [n, n]`` is a dense tensor, an exact :class:`DiagonalFactor` (an Embedding's one-hot
side) or an approximate :class:`SketchedFactor` (``Q diag(lambda) Q^T + diag(r)``, from the
streaming Nystrom sketch of :mod:`curvlens._factor_store`). :func:`factor_quad`,
:func:`factor_top_eigenvalues` and :func:`factor_dense` read any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlens.linalg.block_krylov import block_top_eigenvalues

__all__ = [
    "DiagonalFactor",
    "SketchedFactor",
    "Factor",
    "factor_quad",
    "factor_top_eigenvalues",
    "factor_dense",
    "factor_dim",
    "nystrom",
]


@dataclass(frozen=True)
class DiagonalFactor:
    """An exactly diagonal factor ``diag(d)``.

    Attributes:
        diag: [n] the diagonal.
    """

    diag: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.diag.shape[0], self.diag.shape[0])

    @property
    def approximation(self) -> str:
        return ""


@dataclass(frozen=True)
class SketchedFactor:
    """A factor approximated by ``Q diag(eigvals) Q^T + diag(residual)``.

    Attributes:
        eigvecs: [n, r] orthonormal columns ``Q``.
        eigvals: [r] non-negative, descending.
        residual: [n] non-negative diagonal of what the low-rank part misses.
        approximation: a sentence naming the method, for reports.
    """

    eigvecs: Tensor
    eigvals: Tensor
    residual: Tensor
    approximation: str

    @property
    def shape(self) -> tuple[int, int]:
        return (self.eigvecs.shape[0], self.eigvecs.shape[0])


Factor = Tensor | DiagonalFactor | SketchedFactor


#: dense factors up to this size are eigendecomposed; larger ones by block Krylov for the top
#: ``k``
EIGH_UP_TO = 1024


def factor_dim(C: Factor) -> int:
    """The side length ``n`` of an ``[n, n]`` factor in any form."""
    return int(C.shape[0])


def factor_quad(C: Factor, U: Tensor) -> Tensor:
    """``u_k^T C u_k`` for every column of ``U [n, k]``, in ``U``'s dtype: ``[k]``."""
    if isinstance(C, DiagonalFactor):
        return (U.square() * C.diag.to(U)[:, None]).sum(0)
    if isinstance(C, SketchedFactor):
        proj = C.eigvecs.to(U).mT @ U  # [r, k]
        return (proj.square() * C.eigvals.to(U)[:, None]).sum(0) + (
            U.square() * C.residual.to(U)[:, None]).sum(0)
    return torch.einsum("nk,nl,lk->k", U, C.to(U), U)


def factor_dense(C: Factor) -> Tensor:
    """The ``[n, n]`` matrix (the approximation for a sketch); only for sizes that fit."""
    if isinstance(C, DiagonalFactor):
        return torch.diag(C.diag)
    if isinstance(C, SketchedFactor):
        return (C.eigvecs * C.eigvals) @ C.eigvecs.mT + torch.diag(C.residual)
    return C


def factor_top_eigenvalues(C: Factor, k: int) -> Tensor:
    """The ``k`` largest eigenvalues of a factor, descending, float64 ``[k]`` (NaN-padded when
    a sketch holds fewer than ``k``).

    Dense factors up to :data:`EIGH_UP_TO` use ``eigvalsh``, larger ones block Krylov
    iteration in float64 (top ``k`` only, each within ``1e-10`` relative of an eigenvalue;
    :func:`curvlens.linalg.block_krylov.block_top_eigenvalues`); a sketch gives the
    Rayleigh-Ritz values of its approximation on its own subspace.
    """
    if isinstance(C, DiagonalFactor):
        return C.diag.to(torch.float64).sort(descending=True).values[:k]
    if isinstance(C, SketchedFactor):
        Q = C.eigvecs.to(torch.float64)
        M = torch.diag(C.eigvals.to(torch.float64)) + Q.mT @ (C.residual.to(Q)[:, None] * Q)
        vals = torch.linalg.eigvalsh((M + M.mT) / 2).flip(0)[:k]
        return torch.cat([vals, vals.new_full((k - vals.numel(),), float("nan"))])
    C = C.to(torch.float64)
    n = C.shape[0]
    if n <= EIGH_UP_TO or 4 * k >= n:
        return torch.linalg.eigvalsh((C + C.mT) / 2).flip(0)[:k]
    # no symmetrized copy (on a 4608-sided factor it cost as much as the whole solve): the
    # factor is symmetric up to rounding, whose skew part moves no eigenvalue to first order
    gen = torch.Generator(device="cpu").manual_seed(0)
    return block_top_eigenvalues(C, k, tol=1e-10, generator=gen)


def nystrom(Y: Tensor, omega: Tensor, diag: Tensor, dtype: torch.dtype) -> SketchedFactor:
    """Eigenpairs of ``Y (Omega^T Y)^+ Y^T`` by the stabilized formula of Tropp et al. (2017)."""
    Y64, O64 = Y.to(torch.float64), omega.to(torch.float64)
    nu = torch.finfo(torch.float64).eps * Y.shape[0] ** 0.5 * float(torch.linalg.vector_norm(Y64))
    Ynu = Y64 + nu * O64
    B = O64.mT @ Ynu
    B = (B + B.mT) / 2
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:  # numerically rank-deficient: shift until positive definite
        evals = torch.linalg.eigvalsh(B)
        L = torch.linalg.cholesky(B + (abs(float(evals[0])) + nu) * torch.eye(B.shape[0]).to(B))
    E = torch.linalg.solve_triangular(L, Ynu.mT, upper=False).mT  # [d, l] = Ynu L^-T
    Q, S, _ = torch.linalg.svd(E, full_matrices=False)
    lam = (S.square() - nu).clamp_min(0)
    residual = (diag.to(torch.float64) - (Q.square() * lam).sum(1)).clamp_min(0)
    note = (f"Nystrom sketch of rank {lam.numel()} plus a residual diagonal (single pass, "
            "Tropp et al. 2017, arXiv:1706.05736)")
    return SketchedFactor(Q.to(dtype), lam.to(dtype), residual.to(dtype), note)
