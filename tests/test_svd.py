"""gradient_svd against torch.linalg.svd, on both its dense and its iterative path."""

from __future__ import annotations

import pytest
import torch

from curvlens.linalg.svd import gradient_svd


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
