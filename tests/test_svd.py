"""gradient_svd against torch.linalg.svd, on both its dense and its iterative path."""

from __future__ import annotations

import pytest
import torch

from curvlens.linalg.svd import gradient_svd, gram_singular_values


def _decaying(m: int, n: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -decay
    return U @ torch.diag(s) @ V.T


def _assert_matches_reference(G, U, S, V, k):
    Ur, Sr, Vhr = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(S, Sr[:k], rtol=1e-9, atol=1e-12)
    # same subspaces: |<u_k, u_ref_k>| = 1 for distinct singular values
    torch.testing.assert_close((U * Ur[:, :k]).sum(0).abs(), torch.ones(k, dtype=G.dtype),
                               rtol=0, atol=1e-8)
    torch.testing.assert_close((V * Vhr[:k].T).sum(0).abs(), torch.ones(k, dtype=G.dtype),
                               rtol=0, atol=1e-8)
    torch.testing.assert_close(U.T @ G @ V, torch.diag(S), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("m", "n", "k", "method"), [
    (7, 5, None, "auto"), (5, 9, 3, "auto"), (40, 30, 30, "dense"),
    (700, 300, 8, "auto"), (300, 700, 8, "subspace"), (120, 90, 5, "subspace"),
    (40, 300, 12, "gram"), (300, 40, 40, "gram"),
])
def test_matches_torch_linalg_svd(m, n, k, method):
    G = _decaying(m, n, seed=m + n)
    U, S, V = gradient_svd(G, k, method=method)
    kk = min(m, n) if k is None else k
    assert U.shape == (m, kk) and S.shape == (kk,) and V.shape == (n, kk)
    assert torch.all(S[:-1] >= S[1:])
    _assert_matches_reference(G, U, S, V, kk)


def test_signs_are_deterministic_and_paths_agree():
    G = _decaying(600, 200, seed=3)
    U1, S1, V1 = gradient_svd(G, 6, method="dense")
    U2, S2, V2 = gradient_svd(G, 6, method="subspace")
    U3, _, V3 = gradient_svd(-G, 6, method="dense")
    torch.testing.assert_close(U1, U2, rtol=0, atol=1e-8)
    torch.testing.assert_close(V1, V2, rtol=0, atol=1e-8)
    torch.testing.assert_close(U1, U3, rtol=0, atol=1e-12)  # the sign flip moves to V
    torch.testing.assert_close(V1, -V3, rtol=0, atol=1e-12)
    idx = U1.abs().argmax(0)
    assert torch.all(U1[idx, torch.arange(6)] > 0)


def test_half_precision_is_computed_in_float32():
    G = _decaying(6, 4, seed=0).to(torch.bfloat16)
    U, S, V = gradient_svd(G, 2)
    assert S.dtype == torch.float32
    ref = torch.linalg.svdvals(G.float())[:2]
    torch.testing.assert_close(S, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("G", "k", "match"), [
    (torch.ones(3), None, "2-D tensor"),
    (torch.ones(0, 3), None, "empty matrix"),
    (torch.ones(3, 2), 3, r"k must be in \[1, 2\]"),
    (torch.tensor([[1.0, float("nan")]]), None, "NaN or Inf"),
])
def test_bad_input_raises(G, k, match):
    with pytest.raises(ValueError, match=match):
        gradient_svd(G, k)


def test_gram_path_agrees_with_dense_in_float32():
    G = _decaying(64, 576, seed=5, decay=1.2)
    U1, S1, V1 = gradient_svd(G.float(), 10, method="gram")
    U2, S2, V2 = gradient_svd(G.float(), 10, method="dense")
    assert S1.dtype == torch.float32 and U1.shape == (64, 10) and V1.shape == (576, 10)
    torch.testing.assert_close(S1.double(), torch.linalg.svdvals(G)[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(U1, U2, rtol=0, atol=1e-4)
    torch.testing.assert_close(V1, V2, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("m", "n", "decay", "dtype", "rtol"), [
    (64, 576, 1.0, torch.float64, 1e-12),
    (576, 64, 1.0, torch.float64, 1e-12),
    (128, 1152, 0.8, torch.float32, 1e-5),
    (96, 900, 2.0, torch.float32, 1e-5),  # sigma_20 / sigma_1 = 1/400: needs the float64 Gram
])
def test_gram_singular_values_match_svdvals(m, n, decay, dtype, rtol):
    G = _decaying(m, n, seed=m, decay=decay).to(dtype)
    ref = torch.linalg.svdvals(G.double())[:20]
    got = gram_singular_values(G, 20)
    assert got.dtype == dtype and got.shape == (20,)
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=0)


def test_gram_singular_values_edge_cases():
    assert gram_singular_values(torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]
    G = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.bfloat16)  # rank one
    S = gram_singular_values(G)
    assert S.dtype == torch.float32
    torch.testing.assert_close(S, torch.tensor([5.0, 0.0]), rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        gram_singular_values(torch.ones(0, 3))


def test_rank_deficient_gradient_keeps_round_off_values_tiny():
    """A 10-class head's gradient has rank 9: the 10th value must stay at round-off (as in the
    SVD), not at the Gram's sqrt(eps) noise, or the numerical-rank window would keep it."""
    g = torch.Generator().manual_seed(4)
    G = torch.randn(10, 9, generator=g, dtype=torch.float64) @ torch.randn(
        9, 700, generator=g, dtype=torch.float64)
    S = gradient_svd(G, 10, method="gram")[1]
    assert float(S[-1]) < 1e-13 * float(S[0])
    torch.testing.assert_close(S[:9], torch.linalg.svdvals(G)[:9], rtol=1e-12, atol=0)
    S2 = gram_singular_values(G, 10)
    assert float(S2[-1]) < 1e-13 * float(S2[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_singular_values_skip_zero_columns_exactly(dtype):
    """Columns of a conv gradient whose taps only see padding are exactly zero; dropping them
    leaves the values unchanged, and columns of tiny (not zero) entries are kept."""
    G = _decaying(160, 900, seed=7, decay=0.7)
    G[:, 200:] = 0.0  # 700 zero columns
    G[:, 899] = 1e-30  # tiny but not zero: part of the Gram
    got = gram_singular_values(G.to(dtype), 10)
    torch.testing.assert_close(got.double(), torch.linalg.svdvals(G)[:10],
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    tiny = torch.zeros(160, 900, dtype=torch.float64)
    tiny[:, 0], tiny[:3, 1] = 1e-150, 2e-150  # a gradient of tiny scale keeps its columns
    torch.testing.assert_close(gram_singular_values(tiny, 2), torch.linalg.svdvals(tiny)[:2],
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize(("m", "n"), [(160, 900), (900, 160)])
def test_gradient_svd_skips_zero_columns_exactly(m, n):
    """All-zero columns of the smaller side's matrix (a conv gradient's padding-only taps)
    are left out of the Gram: the same triplets as the full SVD, zeros in V on those rows."""
    G = _decaying(m, n, seed=11, decay=0.7)
    zero = torch.zeros(max(m, n), dtype=torch.bool)
    zero[200:] = True
    if m < n:
        G[:, zero] = 0.0
    else:
        G[zero] = 0.0
    U, S, V = gradient_svd(G, 10)
    _assert_matches_reference(G, U, S, V, 10)
    assert torch.all((V if m < n else U)[zero] == 0)
