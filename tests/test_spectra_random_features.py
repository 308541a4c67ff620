"""Monomial random-feature covariances: exact formula vs Wick / quadrature / Monte Carlo."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from curvlens.spectra.random_features import (
    feature_gram,
    hermite_monomial_coefficient,
    random_feature_covariance,
    random_feature_spectrum,
    rf_slopes,
    rf_theory_curve,
)


def _random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _pairings(items: list[int]):
    """All perfect matchings of a list (Wick/Isserlis)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for k in range(len(rest)):
        for tail in _pairings(rest[:k] + rest[k + 1 :]):
            yield [(first, rest[k])] + tail


def _wick_moment(c: np.ndarray, i: int, j: int, p: int) -> float:
    """E[y_i^p y_j^p] by summing C over all (2p-1)!! pairings of p i's and p j's."""
    return sum(math.prod(c[a, b] for a, b in pairing) for pairing in _pairings([i] * p + [j] * p))


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_feature_gram_equals_wick_enumeration(p):
    c = _random_cov(3, seed=p)
    wick = np.array([[_wick_moment(c.numpy(), i, j, p) for j in range(3)] for i in range(3)])
    torch.testing.assert_close(feature_gram(c, p), torch.from_numpy(wick), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("centered", [False, True])
def test_feature_gram_equals_gauss_hermite(p, centered):
    c = _random_cov(3, seed=10 + p)
    nodes, weights = np.polynomial.hermite_e.hermegauss(p + 2)  # exact for degree <= 2p + 3
    weights = weights / weights.sum()
    ref = np.zeros((3, 3))
    cn = c.numpy()
    for i, j in itertools.product(range(3), repeat=2):
        sub = cn[np.ix_([i, j], [i, j])]
        chol = np.linalg.cholesky(sub + 1e-300 * np.eye(2)) if i != j else None
        if i == j:
            y = math.sqrt(cn[i, i]) * nodes
            ref[i, j] = np.sum(weights * y ** (2 * p))
        else:
            z1, z2 = np.meshgrid(nodes, nodes, indexing="ij")
            w2 = np.outer(weights, weights)
            yi = chol[0, 0] * z1
            yj = chol[1, 0] * z1 + chol[1, 1] * z2
            ref[i, j] = np.sum(w2 * yi**p * yj**p)
        if centered:
            mi = np.sum(weights * (math.sqrt(cn[i, i]) * nodes) ** p)
            mj = np.sum(weights * (math.sqrt(cn[j, j]) * nodes) ** p)
            ref[i, j] -= mi * mj
    got = feature_gram(c, p, centered=centered)
    torch.testing.assert_close(got, torch.from_numpy(ref), rtol=1e-12, atol=1e-12)


def test_closed_forms_p2_p3():
    c = _random_cov(4, seed=3)
    dd = torch.diagonal(c)
    outer = dd[:, None] * dd[None, :]
    torch.testing.assert_close(feature_gram(c, 2), outer + 2 * c**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(feature_gram(c, 3), 9 * outer * c + 6 * c**3, rtol=1e-14, atol=0)
    torch.testing.assert_close(feature_gram(c, 2, centered=True), 2 * c**2, rtol=1e-14, atol=0)
    assert [hermite_monomial_coefficient(3, m) for m in range(2)] == [1, 3]


@pytest.mark.parametrize("p,centered", [(1, False), (2, False), (2, True), (3, False)])
def test_monte_carlo_within_five_standard_errors(p, centered):
    g = torch.Generator().manual_seed(7)
    v, d, n = 6, 4, 200_000
    h = torch.linspace(1.5, 0.3, v, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(v)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * h.sqrt()
    f = (x @ w) ** p  # [n, d]
    if centered:
        mean = torch.diagonal(w.T @ torch.diag(h) @ w) ** (p // 2) * (
            hermite_monomial_coefficient(p, p // 2) if p % 2 == 0 else 0
        )
        f = f - mean
    prods = f[:, :, None] * f[:, None, :] / d  # [n, d, d]
    est, se = prods.mean(0), prods.std(0) / math.sqrt(n)
    exact = random_feature_covariance(w, h, p, centered=centered)
    assert torch.all((est - exact).abs() <= 5 * se)


def test_full_and_diagonal_h_agree_and_spectrum_sorted():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 5, generator=g, dtype=torch.float64)
    h = torch.rand(10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(random_feature_covariance(w, h, 3),
                               random_feature_covariance(w, torch.diag(h), 3), rtol=1e-13, atol=0)
    lam = random_feature_spectrum(w, h, 2)
    ref = torch.linalg.eigvalsh(random_feature_covariance(w, h, 2)).flip(0)
    torch.testing.assert_close(lam, ref)
    assert torch.all(lam[:-1] >= lam[1:])


def _power_law_sketch(v: int, d: int, alpha: float, seed: int):
    h = torch.arange(1, v + 1, dtype=torch.float64) ** (-alpha)
    w = torch.randn(v, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w, h


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_p1_inherits_exponent(alpha):
    w, h = _power_law_sketch(3000, 300, alpha, seed=0)
    s = rf_slopes(random_feature_spectrum(w, h, 1), 1)
    assert s.raw_slope == pytest.approx(-alpha, abs=0.1)
    assert s.raw_slope == s.corrected_slope  # no log correction for p = 1


def test_slopes_on_exact_theory_curve():
    j = torch.arange(1, 501, dtype=torch.float64)
    for p in (1, 2):  # (p = 3's curve rises up to j = 4, and rf_slopes sorts its input)
        s = rf_slopes(rf_theory_curve(j, p, 1.7), p, j_min=1, j_max=500)
        assert s.corrected_slope == pytest.approx(-1.7, abs=1e-12)
        assert s.alpha_corrected == pytest.approx(1.7, abs=1e-12)
    with pytest.raises(ValueError, match="j_min"):
        rf_slopes(j, 2, j_min=5, j_max=3)
    with pytest.raises(ValueError, match="degree p"):
        feature_gram(torch.eye(2), 0)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_p2_log_correction_recovers_exponent(alpha):
    """Paquette, Xiao & Zhu (arXiv:2603.14578): p = 2 spectra decay as (log(j+1)/j)^alpha;
    the raw slope misses alpha."""
    w, h = _power_law_sketch(12000, 1000, alpha, seed=0)
    s = rf_slopes(random_feature_spectrum(w, h, 2), 2, j_min=2, j_max=300)
    assert abs(s.corrected_slope + alpha) <= 0.15 * alpha
    assert abs(s.raw_slope + alpha) > 0.15 * alpha
