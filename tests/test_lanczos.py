"""Lanczos, block Krylov, Hutchinson and SLQ kernels against ``torch.linalg`` on explicit
matrices."""

from __future__ import annotations

import math

import pytest
import torch

from curvlens.linalg.block_krylov import block_top_eigenvalues
from curvlens.linalg.lanczos import error_bounds, lanczos, lanczos_tridiagonal, random_unit
from curvlens.linalg.slq import gaussian_density, slq_quadrature, spectral_density
from curvlens.linalg.trace import hutchinson_trace, random_probes

DT = torch.float64


def _sym(spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(spectrum) Q^T`` with a seeded Haar-like rotation ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = spectrum.shape[0]
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return (Q * spectrum) @ Q.T


EIGENVALUE_CASES = {
    "power_law": lambda: torch.arange(1, 201, dtype=DT) ** -1.5,
    "indefinite": lambda: torch.linspace(-3, 5, 150, dtype=DT) ** 3,
    "low_rank": lambda: torch.cat([torch.tensor([9.0, 4.0, 1.0], dtype=DT), torch.zeros(97)]),
    "repeated_top": lambda: torch.cat([torch.full((3,), 2.0, dtype=DT),
                                       torch.linspace(-1, 1, 27, dtype=DT)]),
}


# (spectrum, which): the smallest end of "power_law" is a tight cluster near 0 (hard for any
# Krylov method), so it is asked for the largest only.
# "repeated_top" has a 3-fold top eigenvalue (see the test below), so its smallest end only.
LANCZOS_CASES = [("power_law", "largest"), ("low_rank", "largest"),
                 ("repeated_top", "smallest")] + [
    (name, which) for name in ("indefinite", "low_rank") for which in ("smallest", "both")
]


@pytest.mark.parametrize("name,which", LANCZOS_CASES)
def test_lanczos_matches_eigvalsh(name, which):
    spectrum = EIGENVALUE_CASES[name]()
    A = _sym(spectrum, seed=1)
    exact = torch.linalg.eigvalsh(A)  # ascending
    k = 3
    values, vectors = lanczos(lambda v: A @ v, A.shape[0], k, which=which,
                              generator=torch.Generator().manual_seed(2), return_vectors=True)
    top, bottom = exact.flip(0)[:k], exact[:k].flip(0)
    expected = {"largest": top, "smallest": bottom, "both": torch.cat([top, bottom])}[which]
    scale = exact.abs().max()
    torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-10 * scale)
    assert torch.all(values[:-1] >= values[1:])
    torch.testing.assert_close(A @ vectors, vectors * values, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(len(values), dtype=DT),
                               rtol=0, atol=1e-8)


# k = 10 wanted values (5 at each end for "both"); n = 300-400
ERROR_CASES = {
    "power_law": (lambda: torch.arange(1, 401, dtype=DT) ** -1.2, ("largest",)),
    # a cluster at places 10-12, 0.4% apart, above a bulk
    "clustered": (lambda: torch.cat([torch.linspace(10, 6, 9, dtype=DT),
                                     torch.tensor([5.0, 4.98, 4.96], dtype=DT),
                                     4.5 * torch.rand(288, generator=torch.Generator()
                                                      .manual_seed(0), dtype=DT)]),
                  ("largest",)),
    "negative": (lambda: torch.linspace(-3, 2, 300, dtype=DT) ** 3,
                 ("largest", "smallest", "both")),
}


def _ends(exact: torch.Tensor, k: int, which: str) -> torch.Tensor:
    top, bottom = exact.flip(0)[:k], exact[:k].flip(0)
    return {"largest": top, "smallest": bottom, "both": torch.cat([top, bottom])}[which]


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-10])
@pytest.mark.parametrize("name,which", [(n, w) for n, (_, ws) in ERROR_CASES.items()
                                        for w in ws])
def test_tol_bounds_the_relative_eigenvalue_error(name, which, tol):
    """``tol`` is the relative error of each reported eigenvalue; and stopping on the estimated
    error (``r^2 / gap``) comes before every residual is that small."""
    A = _sym(ERROR_CASES[name][0](), seed=1)
    n = A.shape[0]
    k = 5 if which == "both" else 10
    v0 = random_unit(n, generator=torch.Generator().manual_seed(2), dtype=DT, device="cpu")
    values = lanczos(lambda v: A @ v, n, k, which=which, tol=tol, v0=v0)
    expected = _ends(torch.linalg.eigvalsh(A), k, which)
    rel = (values - expected).abs() / expected.abs()
    if name == "clustered" and tol == 1e-3:
        # The cluster's top member is not resolved yet when the estimate says 1e-3: the 10th
        # value sits between cluster members, off by less than the cluster's width.
        assert tol < float(rel.max()) < 0.008
        return
    assert float(rel.max()) <= tol
    # it stopped on the estimate r^2 / gap: some wanted residual is still above tol * |theta|
    _, vectors = lanczos(lambda v: A @ v, n, k, which=which, tol=tol, v0=v0, return_vectors=True)
    resid = torch.linalg.vector_norm(A @ vectors - vectors * values, dim=0)
    assert bool((resid > tol * values.abs()).any())


def test_error_bounds_use_the_gap_to_the_other_ritz_intervals():
    theta = torch.tensor([1.0, 2.0, 5.0], dtype=DT)
    resid = torch.tensor([0.1, 0.01, 0.5], dtype=DT)
    got = error_bounds(theta, resid, torch.tensor([0, 1, 2]))
    # gaps: 1 - 0.01 (to [1.99, 2.01]); 1 - 0.1 (to [0.9, 1.1]); 3 - 0.01
    expected = torch.tensor([0.01 / 0.99, 1e-4 / 0.9, 0.25 / 2.99], dtype=DT)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # a gap not above the residual, or no other Ritz value: the residual itself
    wide = error_bounds(theta, torch.tensor([0.1, 0.9, 0.5], dtype=DT), torch.tensor([0]))
    torch.testing.assert_close(wide, torch.tensor([0.1], dtype=DT))
    torch.testing.assert_close(error_bounds(theta[:1], resid[:1], torch.tensor([0])),
                               resid[:1])


def test_error_estimates_cover_the_true_errors_of_resolved_ritz_values():
    """Ritz values of an 8-step Lanczos on a power law: each of the top 4 is within its
    estimate of the eigenvalue it approximates, and the estimate is far below the residual."""
    A = _sym(torch.arange(1, 301, dtype=DT) ** -1.0, seed=5)
    exact = torch.linalg.eigvalsh(A)
    v0 = random_unit(300, generator=torch.Generator().manual_seed(0), dtype=DT, device="cpu")
    alpha, beta = lanczos_tridiagonal(lambda v: A @ v, v0, 9)
    T = torch.diag(alpha[:8]) + torch.diag(beta[:7], 1) + torch.diag(beta[:7], -1)
    theta, S = torch.linalg.eigh(T)
    resid = (beta[7] * S[-1]).abs()
    top = torch.arange(4, 8)
    est = error_bounds(theta, resid, top)
    err = (exact[-4:] - theta[top]).abs()
    assert bool((err > 1e-12).all())  # above rounding
    assert bool((err <= est).all())
    assert bool((est <= 0.2 * resid[top]).all())


def test_lanczos_repeated_top_eigenvalue_is_found_once():
    """Single-vector Krylov limitation (as ARPACK): a repeated eigenvalue that converges before
    the space is exhausted appears once; its value is still exact."""
    A = _sym(EIGENVALUE_CASES["repeated_top"](), seed=1)
    vals = lanczos(lambda v: A @ v, 30, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vals[0], torch.tensor(2.0, dtype=DT), rtol=1e-10, atol=0)
    assert float(vals[1]) <= 2.0 + 1e-10


def test_lanczos_stops_early_and_counts():
    A = _sym(EIGENVALUE_CASES["power_law"](), seed=3)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    lanczos(matvec, 200, 5, generator=torch.Generator().manual_seed(0))
    assert 5 <= len(calls) < 100  # converged well before the Krylov space is exhausted


def test_lanczos_deterministic_given_generator_and_float32():
    A = _sym(EIGENVALUE_CASES["indefinite"](), seed=4)
    run = [lanczos(lambda v: A @ v, 150, 4, generator=torch.Generator().manual_seed(5))
           for _ in range(2)]
    assert torch.equal(run[0], run[1])
    A32 = A.float()
    v32 = lanczos(lambda v: A32 @ v, 150, 4, dtype=torch.float32,
                  generator=torch.Generator().manual_seed(5))
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), run[0], rtol=1e-4, atol=1e-4)


def test_lanczos_warns_when_not_converged_and_checks_inputs():
    A = _sym(torch.linspace(1, 2, 300, dtype=DT), seed=6)  # clustered: slow convergence
    with pytest.warns(RuntimeWarning, match="raise num_iter"):
        lanczos(lambda v: A @ v, 300, 3, num_iter=10, tol=1e-12)
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(lambda v: A @ v, 300, 3, which="top")
    with pytest.raises(ValueError, match=r"k must be"):
        lanczos(lambda v: A @ v, 300, 0)
    with pytest.raises(ValueError, match=r"matvec must map a \[300\] tensor"):
        lanczos(lambda v: v[:10], 300, 2)
    with pytest.raises(TypeError, match="dtype"):
        lanczos(lambda v: A @ v, 300, 2, dtype=torch.int64)


def test_lanczos_v0_start():
    A = _sym(EIGENVALUE_CASES["power_law"](), seed=7)
    v0 = torch.ones(200, dtype=DT)
    vals = lanczos(lambda v: A @ v, 200, 2, v0=v0)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-8, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lanczos_on_cuda():
    A = _sym(EIGENVALUE_CASES["indefinite"](), seed=8).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    vals = lanczos(lambda v: A @ v, 150, 3, generator=g, device="cuda")
    assert vals.device.type == "cuda"
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------- Hutchinson


def test_hutchinson_exact_for_diagonal_and_batched_equals_single():
    d = torch.arange(1.0, 31.0, dtype=DT)
    est = hutchinson_trace(lambda v: d * v, 30, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est.estimate, d.sum(), rtol=1e-12, atol=0)  # z_i^2 = 1
    A = _sym(torch.linspace(-1, 3, 30, dtype=DT), seed=9)
    single = hutchinson_trace(lambda v: A @ v, 30, 10, generator=torch.Generator().manual_seed(1))
    batched = hutchinson_trace(lambda V: A @ V, 30, 10, batch_size=4,
                               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(single.samples, batched.samples, rtol=1e-12, atol=1e-12)
    z = random_probes(30, 10, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(single.samples, torch.einsum("pi,ij,pj->p", z, A, z))
    torch.testing.assert_close(single.std_error, single.samples.std() / math.sqrt(10))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_three_standard_errors(distribution):
    A = _sym(torch.linspace(-2, 6, 80, dtype=DT), seed=10)
    est = hutchinson_trace(lambda v: A @ v, 80, 200, distribution=distribution,
                           generator=torch.Generator().manual_seed(2))
    assert abs(float(est.estimate - torch.trace(A))) <= 3 * float(est.std_error)
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchinson_trace(lambda v: A @ v, 80, 2, distribution="uniform")


# ----------------------------------------------------------------------------- SLQ


def test_slq_quadrature_reproduces_moments_per_probe():
    A = _sym(torch.linspace(-1, 2, 60, dtype=DT) ** 3, seed=11)
    nodes, weights = slq_quadrature(lambda v: A @ v, 60, num_probes=5, num_iter=6,
                                    generator=torch.Generator().manual_seed(3))
    z = random_probes(60, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    q = z / math.sqrt(60)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, dtype=DT))
    for p in range(0, 12):  # Gauss quadrature with 6 nodes is exact to degree 11
        Ap = torch.linalg.matrix_power(A, p)
        torch.testing.assert_close((weights * nodes**p).sum(-1),
                                   torch.einsum("pi,ij,pj->p", q, Ap, q), rtol=1e-9, atol=1e-12)


def test_spectral_density_moments_and_mass():
    spectrum = torch.linspace(0, 1, 120, dtype=DT) ** 2
    A = _sym(spectrum, seed=12)
    dens = spectral_density(lambda v: A @ v, 120, num_probes=30, num_iter=40,
                            generator=torch.Generator().manual_seed(4))
    assert abs(float(torch.trapezoid(dens.density, dens.grid)) - 1) < 1e-3
    for p in (1, 2):
        per_probe = (dens.weights * dens.nodes**p).sum(-1)
        se = per_probe.std() / math.sqrt(30)
        exact = (spectrum**p).mean()
        assert abs(float(dens.moment(p) - exact)) <= 3 * float(se)
    # once the Krylov space is exhausted, nodes are the exact eigenvalues
    small = _sym(torch.tensor([1.0, 2.0, 5.0], dtype=DT), seed=13)
    nodes, weights = slq_quadrature(lambda v: small @ v, 3, num_probes=1, num_iter=10)
    torch.testing.assert_close(nodes[0].sort().values, torch.tensor([1.0, 2.0, 5.0], dtype=DT))


def test_gaussian_density_against_direct_sum():
    nodes = torch.tensor([[0.0, 1.0]], dtype=DT)
    weights = torch.tensor([[0.25, 0.75]], dtype=DT)
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    sigma = 0.3

    def phi(x):
        return math.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    expected = torch.tensor([0.25 * phi(x) + 0.75 * phi(x - 1.0) for x in grid.tolist()],
                            dtype=DT)
    torch.testing.assert_close(gaussian_density(nodes, weights, grid, sigma), expected)
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaussian_density(nodes, weights, grid, 0.0)


def test_lanczos_long_run_grows_basis_and_is_exact_at_full_dimension():
    A = _sym(torch.linspace(1, 2, 80, dtype=DT), seed=14)  # clustered: needs many steps
    vals = lanczos(lambda v: A @ v, 80, 1, tol=1e-13, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A)[-1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize(("name", "which", "k", "max_basis"), [
    ("power_law", "largest", 5, 9), ("indefinite", "both", 3, 16),
    ("indefinite", "smallest", 4, 12), ("low_rank", "largest", 3, 5),
])
def test_thick_restart_matches_eigvalsh_within_a_bounded_basis(name, which, k, max_basis,
                                                               monkeypatch):
    A = _sym(EIGENVALUE_CASES[name](), seed=21)
    exact = torch.linalg.eigvalsh(A)
    widest = []

    def matvec(v):
        return A @ v

    real_empty = torch.empty

    def spy_empty(*shape, **kw):  # record the basis allocation
        out = real_empty(*shape, **kw)
        if len(shape) == 2 and shape[1] == A.shape[0]:
            widest.append(shape[0])
        return out

    monkeypatch.setattr(torch, "empty", spy_empty)
    values, vectors = lanczos(matvec, A.shape[0], k, which=which, max_basis=max_basis,
                              num_iter=3000, generator=torch.Generator().manual_seed(3),
                              return_vectors=True)
    monkeypatch.undo()
    top, bottom = exact.flip(0)[:k], exact[:k].flip(0)
    expected = {"largest": top, "smallest": bottom, "both": torch.cat([top, bottom])}[which]
    scale = exact.abs().max()
    torch.testing.assert_close(values, expected, rtol=1e-7, atol=1e-10 * scale)
    torch.testing.assert_close(A @ vectors, vectors * values, rtol=0, atol=1e-5 * scale)
    assert widest == [max_basis]  # one basis of max_basis rows, never grown


def test_thick_restart_float32_basis_and_bad_max_basis():
    A = _sym(EIGENVALUE_CASES["power_law"](), seed=22).float()
    vals = lanczos(lambda v: A @ v, 200, 4, dtype=torch.float32, max_basis=8, num_iter=2000,
                   generator=torch.Generator().manual_seed(0))
    assert vals.dtype == torch.float32
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A.double()).flip(0)[:4].float(),
                               rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="max_basis must be an int >= 6"):
        lanczos(lambda v: A @ v, 200, 4, max_basis=5)


# block Krylov (dense matrices, the top end only)
BLOCK_CASES = {
    "power_law": lambda: torch.arange(1, 401, dtype=DT) ** -1.5,
    # a few outliers over a tight bulk: Kronecker factors of a small batch look like this
    "outliers_over_cluster": lambda: torch.cat([torch.tensor([1.0, 0.5, 0.49, 0.27], dtype=DT),
                                                1.5e-3 * torch.rand(
                                                    200, generator=torch.Generator()
                                                    .manual_seed(3), dtype=DT)]),
    "repeated_top": lambda: torch.cat([torch.full((4,), 2.0, dtype=DT),
                                       torch.linspace(0, 1, 300, dtype=DT)]),
    "indefinite": lambda: torch.linspace(-3, 5, 400, dtype=DT) ** 3,
    # fewer nonzero eigenvalues than asked for: the zeros come from an invariant subspace
    "low_rank": lambda: torch.cat([torch.tensor([9.0, 4.0, 1.0], dtype=DT), torch.zeros(397)]),
}


@pytest.mark.parametrize("name", list(BLOCK_CASES))
@pytest.mark.parametrize("block", [None, 5])
def test_block_top_eigenvalues_match_eigvalsh(name, block):
    A = _sym(BLOCK_CASES[name](), seed=1)
    k = 8
    exact = torch.linalg.eigvalsh(A).flip(0)[:k]
    got = block_top_eigenvalues(A, k, tol=1e-10, block=block)
    scale = float(exact.abs().max())
    # each value within tol of an eigenvalue (relative), or the rounding level for zeros
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-13 * scale)
    assert torch.all(got[:-1] >= got[1:])


def test_block_whole_space_is_exact():
    A = _sym(torch.arange(1.0, 13.0, dtype=DT), seed=4)
    torch.testing.assert_close(block_top_eigenvalues(A, 12, tol=1e-10),
                               torch.linalg.eigvalsh(A).flip(0), rtol=1e-12, atol=1e-12)


def test_block_same_generator_same_values():
    A = _sym(torch.arange(1, 301, dtype=DT) ** -1.0, seed=5)
    a = block_top_eigenvalues(A, 5, tol=1e-10, generator=torch.Generator().manual_seed(7))
    b = block_top_eigenvalues(A, 5, tol=1e-10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(("A", "k", "match"), [
    (torch.ones(3, 4, dtype=DT), 1, r"square matrix, got shape \(3, 4\)"),
    (torch.eye(3, dtype=DT), 0, r"1 <= k <= n=3, got 0"),
    (torch.eye(3, dtype=DT), 4, r"1 <= k <= n=3, got 4"),
])
def test_block_bad_input_raises(A, k, match):
    with pytest.raises(ValueError, match=match):
        block_top_eigenvalues(A, k, tol=1e-10)
