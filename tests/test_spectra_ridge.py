"""Ridge deterministic equivalents vs Monte Carlo; linearized deep feature covariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvlens.spectra.ridge import (
    deep_linearized_covariance,
    feature_learning_curve,
    gaussian_activation_covariance,
    gaussian_moments,
    linearized_layer_covariance,
    ridge_fit,
    ridge_kappa,
    ridge_learning_curve,
    ridge_test_error,
)


def _teacher(p: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    eig = torch.arange(1, p + 1, dtype=torch.float64) ** -1.2
    q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    omega = q @ torch.diag(eig) @ q.T
    root = q @ torch.diag(eig.sqrt())  # phi = root @ z
    theta = torch.randn(p, generator=g, dtype=torch.float64)
    return g, omega, root, theta


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_gaussian_teacher_student_matches_monte_carlo(lam):
    """Fresh-sample test MSE (noise included) of (1/n) sum (y - w.phi)^2 + lam |w|^2 ridge."""
    g, omega, root, theta = _teacher()
    sig2, trials = 0.1, 150
    psi, y2 = omega @ theta, float(theta @ omega @ theta) + sig2
    ns = [40, 160, 320]  # p = 80; finite-size bias grows near the interpolation peak n = p
    curve = ridge_learning_curve(omega, psi, y2, ns, lam)
    for n, theory in zip(ns, curve.test_error):
        errs = torch.empty(trials, dtype=torch.float64)
        for t in range(trials):
            phi = torch.randn(n, 80, generator=g, dtype=torch.float64) @ root.T
            y = phi @ theta + math.sqrt(sig2) * torch.randn(n, generator=g, dtype=torch.float64)
            delta = ridge_fit(phi, y, lam) - theta
            errs[t] = delta @ omega @ delta + sig2  # exact expectation over a test point
        se = float(errs.std() / math.sqrt(trials))
        assert abs(float(errs.mean()) - theory) <= 2 * se, (n, lam)
        assert theory == pytest.approx(ridge_test_error(omega, psi, y2, n, lam), rel=1e-12)


def test_kappa_fixed_point_and_closed_form_error():
    _, omega, _, theta = _teacher(p=30, seed=1)
    w = torch.linalg.eigvalsh(omega)
    for n, lam in [(10, 0.01), (60, 0.5), (20, 0.0)]:
        k = ridge_kappa(omega, n, lam)
        assert k == pytest.approx(lam + k / n * float((w / (w + k)).sum()), rel=1e-12)
        # linear-teacher form: (sigma^2 + kappa^2 theta' Omega (Omega + kappa)^-2 theta) / (1-df2/n)
        a = torch.linalg.solve(omega + k * torch.eye(30, dtype=torch.float64), theta)
        df2 = float((w**2 / (w + k) ** 2).sum())
        ref = (0.3 + k**2 * float(a @ omega @ a)) / (1 - df2 / n)
        got = ridge_test_error(omega, omega @ theta, float(theta @ omega @ theta) + 0.3, n, lam)
        assert got == pytest.approx(ref, rel=1e-10)
    assert ridge_kappa(omega, 100, 0.0) == 0.0  # n > p ridgeless
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        ridge_kappa(omega, 10, -1.0)


def test_ridge_fit_normal_equations_both_gram_sides():
    g = torch.Generator().manual_seed(2)
    for n, p in [(40, 10), (10, 40)]:
        phi = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        w = ridge_fit(phi, y, 0.3)
        grad = -2 * phi.T @ (y - phi @ w) / n + 2 * 0.3 * w  # gradient of the objective
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)


def test_gaussian_moments_against_closed_forms():
    r = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    mu1, v = gaussian_moments(lambda t: t**3, r)
    torch.testing.assert_close(mu1, 3 * r**2, rtol=1e-12, atol=0)  # E[xi (r xi)^3]/r = 3 r^2
    torch.testing.assert_close(v, 15 * r**6, rtol=1e-12, atol=0)
    mu1, v = gaussian_moments(torch.erf, r)  # E[erf'(r xi)] = 2/sqrt(pi)/sqrt(1+2r^2)
    torch.testing.assert_close(mu1, 2 / math.sqrt(math.pi) / torch.sqrt(1 + 2 * r**2),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(v, 2 / math.pi * torch.asin(2 * r**2 / (1 + 2 * r**2)),
                               rtol=1e-10, atol=0)


def _hermite_series(c: torch.Tensor, act, kmax: int = 25) -> torch.Tensor:
    """sum_k a_k^i a_k^j rho^k / k!, a_k^i = E[act(r_i xi) He_k(xi)] (Mehler)."""
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    r = np.sqrt(np.diag(c.numpy()))
    vals = act(torch.from_numpy(r[:, None] * x[None])).numpy()
    he = np.stack([np.polynomial.hermite_e.hermeval(x, np.eye(kmax + 1)[k])
                   for k in range(kmax + 1)])  # [K, nodes]
    a = vals @ (he * w).T  # [d, K]
    rho = c.numpy() / np.outer(r, r)
    out = sum(np.outer(a[:, k], a[:, k]) * rho**k / math.factorial(k) for k in range(kmax + 1))
    return torch.from_numpy(out)


def test_tanh_layer_linearization_vs_exact_quadrature():
    g = torch.Generator().manual_seed(3)
    p0, p1 = 200, 30
    w = torch.randn(p1, p0, generator=g, dtype=torch.float64)
    omega0 = torch.eye(p0, dtype=torch.float64)
    lin, c = linearized_layer_covariance(w, omega0, torch.tanh, per_neuron=True)
    exact = gaussian_activation_covariance(c, torch.tanh)
    off = ~torch.eye(p1, dtype=torch.bool)
    torch.testing.assert_close(exact[off], _hermite_series(c, torch.tanh)[off], rtol=0, atol=1e-12)
    _, v = gaussian_moments(torch.tanh, torch.diagonal(c).sqrt())
    torch.testing.assert_close(torch.diagonal(exact), v, rtol=1e-9, atol=0)  # 101 vs 201 nodes
    # per-neuron: the diagonal is exact; off the diagonal only the odd k >= 3 terms are missed
    torch.testing.assert_close(torch.diagonal(lin), v, rtol=1e-12, atol=0)
    rho = (c / torch.sqrt(torch.outer(torch.diagonal(c), torch.diagonal(c))))[off]
    err = (lin - exact)[off].abs()
    assert torch.all(err <= rho.abs() ** 3)  # O(C_ij^3), tanh'' bounded
    rel = torch.linalg.norm(lin - exact) / torch.linalg.norm(exact)
    assert rel < 2e-3
    glob, _ = linearized_layer_covariance(w, omega0, torch.tanh)  # shared r: a few % worse
    assert torch.linalg.norm(glob - exact) / torch.linalg.norm(exact) < 0.05


def test_deep_chain_and_identity_activation_is_exact():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(20, 15, generator=g, dtype=torch.float64),
          torch.randn(10, 20, generator=g, dtype=torch.float64)]
    om0 = torch.eye(15, dtype=torch.float64)
    got = deep_linearized_covariance(ws, lambda t: t, om0, scale=1.0)
    torch.testing.assert_close(got, ws[1] @ ws[0] @ ws[0].T @ ws[1].T, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="do not chain"):
        linearized_layer_covariance(ws[1], om0, torch.tanh)


def test_feature_learning_curve_uses_layer_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    x = torch.randn(3000, 6, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(3000, dtype=torch.float64)
    curve = feature_learning_curve(net, "1", x, y, [50, 200, 1000], 1e-3)
    phi = torch.tanh(net[0](x)).detach()
    ref = ridge_learning_curve(phi.T @ phi / 3000, phi.T @ y / 3000, float((y**2).mean()),
                               [50, 200, 1000], 1e-3)
    np.testing.assert_allclose(curve.test_error, ref.test_error, rtol=1e-10)
    assert np.all(np.diff(curve.test_error) < 0)
    # Monte-Carlo ridge on the same features lands near the prediction at n = 1000
    errs = []
    for t in range(20):
        idx = torch.randperm(3000, generator=torch.Generator().manual_seed(t))
        w = ridge_fit(phi[idx[:1000]], y[idx[:1000]], 1e-3)
        errs.append(float(((y[idx[1000:]] - phi[idx[1000:]] @ w) ** 2).mean()))
    assert np.mean(errs) == pytest.approx(curve.test_error[2], rel=0.15)
    with pytest.raises(ValueError, match="not a module"):
        feature_learning_curve(net, "9", x, y, [10], 0.1)
