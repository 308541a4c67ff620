"""Free decompression: characteristics and algebraic curves on Marchenko-Pastur and Wishart."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curvlens.spectra.free_decompression import (
    SpectralCurve,
    decompress_characteristics,
    fit_spectral_curve,
    free_decompress,
    marchenko_pastur_stieltjes,
    select_curve_degrees,
    stieltjes,
    submatrix_eigenvalues,
)


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance between two equal-weight samples (quantile coupling)."""
    q = (np.arange(2000) + 0.5) / 2000
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def _mp_curve(ratio: float) -> SpectralCurve:
    """gamma z m^2 + (z - 1 + gamma) m + 1 = 0 as coefficients a[j, k] of z^j m^k."""
    a = np.array([[1.0, ratio - 1.0, 0.0], [0.0, 1.0, ratio]])
    return SpectralCurve(a / np.linalg.norm(a), 0.0, 1.0)


def test_characteristics_map_marchenko_pastur_to_marchenko_pastur():
    gs, t = 0.125, math.log(4)  # n_s / N = 1/8 -> n / N = 1/2
    z = np.linspace(-1, 4, 60) + 1.5j
    mt = decompress_characteristics(lambda w: marchenko_pastur_stieltjes(w, gs), z, t)
    g = gs * math.exp(t)
    assert np.max(np.abs(g * z * mt**2 + (z - 1 + g) * mt + 1)) < 1e-12
    np.testing.assert_allclose(mt, marchenko_pastur_stieltjes(z, g), rtol=0, atol=1e-12)
    z0 = z + (1 - math.exp(-t)) / mt  # the characteristics' feet stay in the upper half-plane
    assert np.all(z0.imag > 0)


def test_pushed_curve_of_marchenko_pastur_is_marchenko_pastur():
    gs, t = 0.2, math.log(3)
    pushed = _mp_curve(gs).push(t)
    z = np.linspace(-0.5, 4, 50) + 0.05j
    m = marchenko_pastur_stieltjes(z, gs * 3)
    # P_t vanishes on the new MP branch and equals its curve once the factor m is removed
    assert np.max(np.abs(pushed(z, m))) < 1e-12
    exact = _mp_curve(gs * 3).coeffs
    np.testing.assert_allclose(pushed.coeffs, exact, atol=1e-12)
    # branch tracking picks the physical root: density of MP(0.6) on the real axis
    x = np.linspace(0.05, 3.5, 200)
    dens = pushed.density(x, eta=1e-10)
    g = 0.6
    lo, hi = (1 - math.sqrt(g)) ** 2, (1 + math.sqrt(g)) ** 2
    ref = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * g * x)
    np.testing.assert_allclose(dens, ref, atol=1e-6)


def test_fit_recovers_exact_curve_from_many_eigenvalues():
    # quantiles of MP(0.25) stand in for a noise-free spectrum
    g = 0.25
    lo, hi = (1 - math.sqrt(g)) ** 2, (1 + math.sqrt(g)) ** 2
    x = np.linspace(lo, hi, 200001)
    cdf = np.cumsum(np.sqrt((hi - x) * (x - lo)) / (2 * math.pi * g * x))
    eigs = np.interp((np.arange(4000) + 0.5) / 4000, cdf / cdf[-1], x)
    curve = fit_spectral_curve(eigs, 1, 2)
    z = np.linspace(0, 3, 30) + 1.0j
    m_emp = stieltjes(eigs, z)
    assert np.max(np.abs(curve(z, m_emp))) < 1e-4
    assert select_curve_degrees(eigs) == (1, 2)


def _wishart(n: int, big_n: int, seed: int, root: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, big_n))
    if root is not None:
        x = root @ x
    return x @ x.T / big_n


@pytest.mark.parametrize("degrees", [
    pytest.param((1, 2), id="mp-degrees"),
    pytest.param((None, None), id="auto-degrees", marks=pytest.mark.slow),
])
def test_wishart_small_decompression_beats_baseline(degrees):
    s = _wishart(600, 1200, seed=1)
    true = np.linalg.eigvalsh(s)
    sub = submatrix_eigenvalues(torch.from_numpy(s), 150,
                                generator=torch.Generator().manual_seed(0)).numpy()
    out = free_decompress(sub, 600, deg_z=degrees[0], deg_m=degrees[1])
    assert out.mass == pytest.approx(1.0, abs=0.01)
    pred = out.eigenvalues()
    assert pred.shape == (600,) and np.all(np.diff(pred) >= 0)
    assert _w1(pred, true) <= 0.05 * _w1(sub, true)


@pytest.mark.slow
def test_wishart_2000_from_500_submatrix():
    """W1(prediction, true eigenvalues) <= 0.02 * W1(submatrix eigenvalues, true eigenvalues)."""
    s = _wishart(2000, 4000, seed=0)
    true = np.linalg.eigvalsh(s)
    idx = np.random.default_rng(1).permutation(2000)[:500]
    sub = np.linalg.eigvalsh(s[np.ix_(idx, idx)])
    pred = free_decompress(sub, 2000).eigenvalues()
    assert _w1(pred, true) <= 0.02 * _w1(sub, true)


def _two_atom_curve(ratio: float) -> SpectralCurve:
    """Silverstein's equation for population eigenvalues {1, 4} (half each), ratio n / N:
    m (A - z)(4A - z) - (4A - z)/2 - (A - z)/2 = 0 with A = 1 - g - g z m."""
    g = ratio
    amat = np.array([[1 - g, 0.0], [0.0, -g]])  # a[j, k] z^j m^k
    z = np.array([[0.0], [1.0]])
    one_m = np.array([[0.0, 1.0]])
    t1, t4 = _add(amat, -z), _add(4 * amat, -z)
    poly = _add(_conv2(one_m, _conv2(t1, t4)), -0.5 * _add(t4, t1))
    return SpectralCurve(poly / np.linalg.norm(poly), 0.0, 1.0)


def _conv2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1))
    for (i, j), v in np.ndenumerate(a):
        out[i : i + b.shape[0], j : j + b.shape[1]] += v * b
    return out


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])))
    out[: a.shape[0], : a.shape[1]] += a
    out[: b.shape[0], : b.shape[1]] += b
    return out


@pytest.mark.slow
def test_two_bulk_branch_tracking():
    """Population {1, 4}, Haar rotated; the 250 x 250 submatrix has one bulk, the full 1000 x
    1000 sample covariance two. The exact curve, pulled back to the submatrix size, describes the
    submatrix; pushed forward again, branch tracking must find two bulks."""
    n, big_n, ns = 1000, 10000, 250
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    root = q @ np.diag(np.r_[np.ones(n // 2), 2 * np.ones(n // 2)]) @ q.T
    s = _wishart(n, big_n, seed=1, root=root)
    true = np.linalg.eigvalsh(s)
    idx = rng.permutation(n)[:ns]
    sub = np.linalg.eigvalsh(s[np.ix_(idx, idx)])
    t = math.log(n / ns)
    full_curve = _two_atom_curve(n / big_n)
    sub_curve = full_curve.push(-t)
    x = np.linspace(0.0, 7.0, 3000)

    def quantiles(dens, k):
        cdf = np.cumsum(dens)
        return np.interp((np.arange(k) + 0.5) / k, cdf / cdf[-1], x)

    def bulks(dens):
        on = dens > 1e-3 * dens.max()
        return int(np.sum(np.diff(on.astype(int)) == 1) + on[0])

    d_sub = sub_curve.density(x)
    assert bulks(d_sub) == 1 and _w1(quantiles(d_sub, ns), sub) < 0.03
    d_full = sub_curve.push(t).density(x)
    assert bulks(d_full) == 2
    assert np.trapezoid(d_full, x) == pytest.approx(1.0, abs=2e-3)
    assert _w1(quantiles(d_full, n), true) <= 0.02 * _w1(sub, true)


def test_bad_input():
    with pytest.raises(ValueError, match="n >= n_s"):
        free_decompress(np.arange(10.0), 5)
    with pytest.raises(ValueError, match="at least 4"):
        fit_spectral_curve([1.0, 2.0], 1, 2)
    with pytest.raises(ValueError, match="square"):
        submatrix_eigenvalues(torch.ones(3, 4), 2)


def test_submatrix_eigenvalues_match_direct():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T
    got = submatrix_eigenvalues(a, 10, generator=torch.Generator().manual_seed(5))
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(5))[:10]
    torch.testing.assert_close(got, torch.linalg.eigvalsh(a[idx][:, idx]))


def test_cli_decompress(tmp_path, capsys):
    import argparse

    from curvlens.spectra._cli import add_parser

    x = np.random.default_rng(0).standard_normal((200, 800))
    np.save(tmp_path / "e.npy", np.linalg.eigvalsh(x @ x.T / 800))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["spectra", "decompress", str(tmp_path / "e.npy"), "--n", "400",
                              "--deg-z", "1", "--deg-m", "2", "--out", str(tmp_path / "d.npz")])
    assert args.func(args) == 0
    saved = np.load(tmp_path / "d.npz")
    lo = (1 - math.sqrt(0.5)) ** 2
    assert saved["eigenvalues"].shape == (400,)
    assert saved["eigenvalues"][0] == pytest.approx(lo, abs=0.03)  # MP(1/2) lower edge
    assert "mass=1.00" in capsys.readouterr().out
