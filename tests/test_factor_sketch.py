"""Factor storage: exact diagonal sides, streaming sketches against dense factors, readers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlens._budget import MemoryBudgetError
from curvlens._factor_forms import (
    DiagonalFactor,
    SketchedFactor,
    factor_dense,
    factor_quad,
    factor_top_eigenvalues,
)
from curvlens._factor_store import FactorSide
from curvlens.alignment import alignment_budget
from curvlens.kronecker import kronecker_curvature, kronecker_factors

DT = torch.float64


def _rows(n_rows: int, dim: int, decay: float, seed: int) -> torch.Tensor:
    """Rows whose covariance has eigenvalues ~ k^-decay in a random basis."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    scale = torch.arange(1, dim + 1, dtype=DT) ** (-decay / 2)
    return (torch.randn(n_rows, dim, generator=g, dtype=DT) * scale) @ Q.T


def _side(dim, **kw):
    opts = dict(dtype=DT, device=torch.device("cpu"), budget=10**9, layer="fc")
    return FactorSide(dim, **{**opts, **kw})


@pytest.mark.parametrize(("decay", "l_rank"), [(2.0, 64), (1.5, 128)])
def test_sketch_matches_dense_factor_within_stated_error(decay, l_rank):
    dim = 400
    side, batches = _side(dim, sketch_above=100, sketch_rank=l_rank), []
    for b in range(4):  # streamed in four batches
        batches.append(_rows(300, dim, decay, seed=b))
        side.add(batches[-1])
    assert side.state == "sketch" and side.dense is None
    A = torch.cat(batches)
    C = A.T @ A / A.shape[0]
    S = side.finish(A.shape[0])
    assert isinstance(S, SketchedFactor) and "Nystrom" in S.approximation
    exact = torch.linalg.eigvalsh(C).flip(0)
    low = (S.eigvecs * S.eigvals) @ S.eigvecs.T
    # the Nystrom part never exceeds C (PSD order) and the residual diagonal completes diag(C)
    assert float(torch.linalg.eigvalsh(C - low)[0]) > -1e-9 * float(exact[0])
    torch.testing.assert_close(torch.diag(factor_dense(S)), torch.diag(C), rtol=1e-10, atol=0)
    # trace-norm error within (1 + r/(l - r - 1)) of the best rank-r error, r = l/2
    r = l_rank // 2
    err = float(torch.linalg.eigvalsh(C - low).clamp_min(0).sum())
    assert err <= (1 + r / (l_rank - r - 1)) * float(exact[r:].sum())
    top = factor_top_eigenvalues(S, 10)
    # the stated accuracy: a few percent on the top eigenvalues while the eigenvalues past
    # rank l sum to under half the largest one (here 0.15 and 0.48)
    assert float(exact[l_rank:].sum()) < 0.5 * float(exact[0])
    torch.testing.assert_close(top, exact[:10], rtol=0.05, atol=0)
    U = torch.linalg.eigh(C).eigenvectors.flip(1)[:, :10]  # the top directions
    torch.testing.assert_close(factor_quad(S, U), exact[:10], rtol=0.05, atol=0)


def test_diagonal_side_is_exact_and_widens_on_a_dense_row():
    side = _side(50)
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 3, 7, 0]), 50).to(DT) * 2.0
    side.add(onehot)
    assert side.state == "diag"
    torch.testing.assert_close(factor_dense(side.finish(4)), onehot.T @ onehot / 4)
    dense = _rows(5, 50, 1.0, seed=0)
    side.add(dense)
    assert side.state == "dense"
    ref = (onehot.T @ onehot + dense.T @ dense) / 9
    torch.testing.assert_close(side.finish(9), ref, rtol=1e-12, atol=1e-14)
    big = _side(3000)  # past the size handed out densely: a DiagonalFactor
    big.add(torch.nn.functional.one_hot(torch.tensor([5, 5, 2999]), 3000).to(DT))
    F = big.finish(3)
    assert isinstance(F, DiagonalFactor) and F.diag.shape == (3000,)
    assert F.diag[5] == 2 / 3 and F.diag[2999] == 1 / 3 and float(F.diag.sum()) == 1.0


def test_embedding_one_hot_side_is_a_vector_and_readers_agree():
    torch.manual_seed(0)
    vocab, dim = 2000, 6
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten(), nn.Linear(3 * dim, 4)).double()
    idx = torch.randint(0, vocab, (16, 3))
    y = torch.randint(0, 4, (16,))
    f = kronecker_factors(model, nn.CrossEntropyLoss(), idx, y, layers=["0"])["0"]
    assert isinstance(f.C_delta, DiagonalFactor)  # [vocab] instead of [vocab, vocab]
    counts = torch.bincount(idx.reshape(-1), minlength=vocab).to(DT)
    torch.testing.assert_close(f.C_delta.diag, counts / idx.numel())
    assert f.approximations == []
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(vocab, 4, generator=g, dtype=DT))[0]
    V = torch.linalg.qr(torch.randn(dim, 4, generator=g, dtype=DT))[0]
    dense = factor_dense(f.C_delta)
    ref = torch.einsum("mk,ml,lk->k", U, dense, U) * torch.einsum("nk,nl,lk->k", V, f.C_A, V)
    torch.testing.assert_close(kronecker_curvature(f, U, V), ref, rtol=1e-12, atol=0)
    top = factor_top_eigenvalues(f.C_delta, 4)
    torch.testing.assert_close(top, torch.linalg.eigvalsh(dense).flip(0)[:4])


def test_large_linear_side_is_sketched_and_the_budget_still_adds_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = _rows(256, 300, 1.5, seed=3)
    y = torch.randint(0, 3, (256,))
    budget = 300 * 300 * 8 - 1  # a dense 300 x 300 side does not fit; its sketch does
    f = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, layers=["0"],
                          memory_budget=budget)["0"]
    assert isinstance(f.C_A, SketchedFactor) and isinstance(f.C_delta, torch.Tensor)
    assert f.approximations and f.approximations[0].startswith("C_A: Nystrom")
    dense = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, layers=["0"])["0"]
    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=DT))[0]
    V = torch.linalg.eigh(dense.C_A).eigenvectors.flip(1)[:, :5]
    torch.testing.assert_close(kronecker_curvature(f, U, V), kronecker_curvature(dense, U, V),
                               rtol=1e-2, atol=0)
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.5, 1.0], dtype=DT)
    h = sigma**2
    b = alignment_budget(sigma, h, C_A=f.C_A, C_delta=f.C_delta, U=U, V=V)
    assert abs(b.total - b.alpha) < 1e-10  # the identity holds whatever the factor form


def test_sketch_that_does_not_fit_is_refused_with_the_layer_name():
    side = _side(5000, budget=1000, layer="lm_head")
    side.add(torch.nn.functional.one_hot(torch.tensor([1]), 5000).to(DT))  # diagonal: fine
    with pytest.raises(MemoryBudgetError, match=r"layer 'lm_head': a rank-128 sketch of a "
                                                r"5000-dimensional factor side"):
        side.add(torch.ones(2, 5000, dtype=DT))


@pytest.mark.parametrize("dim", [601, 2051])  # 4 x 4 and 8 x 8 blocks of uneven sizes
def test_blocked_dense_sum_equals_the_full_outer_product(dim):
    side = _side(dim)  # summed in upper-triangular blocks
    parts = [_rows(40, dim, 1.0, seed=s) for s in range(3)]
    for rows in parts:
        side.add(rows)
    A = torch.cat(parts)
    torch.testing.assert_close(side.finish(120), A.T @ A / 120, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_dense_factor_top_eigenvalues_match_eigvalsh(dtype):
    """Above the size that is eigendecomposed, a dense factor's top eigenvalues come from
    block Krylov iteration in float64: within 1e-10 of eigvalsh on the same (exact) matrix."""
    dim = 1100
    rows = _rows(300, dim, 1.2, seed=4)  # rank 300: a bulk of zeros below the top
    C = (rows.T @ rows / 300).to(dtype)
    want = torch.linalg.eigvalsh(C.double()).flip(0)[:10]
    got = factor_top_eigenvalues(C, 10)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
