"""SpectralNewton's kernels: accuracy against the SVD formula in float64, and bounded updates."""

from __future__ import annotations

import math

import pytest
import torch

from curvlens.optim._kernels import (
    _top_eigenvalue,
    spectral_update,
    spectral_update_cholesky,
    spectral_update_eigh,
    spectral_update_svd,
    update_bound,
)


def _power_law(m: int, n: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    """``U diag(k^-decay) V^T`` with random orthonormal ``U, V`` (a gradient-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.arange(1, k + 1, dtype=torch.float64) ** -decay) @ V.T


def _svd_reference(M: torch.Tensor, alpha: float, d: float, relative: bool) -> torch.Tensor:
    """The formula written out with a float64 SVD, one matrix at a time."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    x = S / S[0] if relative else S
    return U @ torch.diag(torch.where(x > 0, x / (x**alpha + d), 0.0)) @ Vh


# Stated in curvlens/optim/_kernels.py: relative Frobenius error against the SVD formula
# (half-precision parameters: float32 maths, the result rounded to the parameter's dtype).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 1e-2,
             torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (48, 48)])
@pytest.mark.parametrize("mode,d", [("relative", 0.01), ("absolute", 0.1)])
def test_kernels_within_stated_tolerance(shape, alpha, mode, d, dtype):
    _check_kernels(shape, alpha, mode, d, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("alpha", [1.25, 2.5])
@pytest.mark.parametrize("shape", [(12, 20), (96, 8), (8, 96), (48, 48)])
@pytest.mark.parametrize("mode,d", [("relative", 0.01), ("absolute", 0.1)])
def test_kernels_within_stated_tolerance_more_alphas_and_shapes(shape, alpha, mode, d, dtype):
    """Non-integer exponents between the fast grid's, and very rectangular matrices."""
    _check_kernels(shape, alpha, mode, d, dtype)


def _check_kernels(shape, alpha, mode, d, dtype):
    M = (0.3 * _power_law(*shape, seed=sum(shape))).to(dtype)  # half params: float32 maths
    ref = _svd_reference(M, alpha, d, relative=mode == "relative")
    kernels = [spectral_update, spectral_update_eigh]
    if alpha == 2.0:
        kernels.append(lambda M, alpha, **kw: spectral_update_cholesky(M, **kw))
    for kernel in kernels:
        out = kernel(M, alpha=alpha, damping=d, damping_mode=mode)
        assert out.dtype == dtype
        err = float((out.double() - ref).norm() / ref.norm())
        assert err <= TOLERANCE[dtype], (kernel, err)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_large_gram_uses_krylov_top_eigenvalue_within_tolerance(alpha):
    """k = 300 > 256: relative damping's sigma_1 comes from the Krylov estimate."""
    M = _power_law(300, 320, seed=1, decay=0.5)
    S = M.mT @ M if M.shape[0] > M.shape[1] else M @ M.mT
    top = float(_top_eigenvalue(S.unsqueeze(0)))
    exact = float(torch.linalg.eigvalsh(S)[-1])
    assert top <= exact * (1 + 1e-12) and top >= exact * (1 - 1e-6)
    ref = _svd_reference(M, alpha, 0.01, relative=True)
    out = spectral_update(M.float(), alpha=alpha, damping=0.01, damping_mode="relative")
    assert float((out.double() - ref).norm() / ref.norm()) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("mode,d", [("relative", 0.01), ("absolute", 0.1)])
def test_batched_kernels_treat_each_matrix_alone(alpha, mode, d):
    """A stack [B, m, n] of matrices of very different scales (as the optimizer batches equal
    shapes): each result equals that matrix's own SVD formula."""
    M = torch.stack([s * _power_law(24, 16, seed=i) for i, s in enumerate((1e-6, 1.0, 1e4))])
    out = spectral_update(M.float(), alpha=alpha, damping=d, damping_mode=mode)
    for b in range(M.shape[0]):
        ref = _svd_reference(M[b], alpha, d, relative=mode == "relative")
        err = float((out[b].double() - ref).norm() / ref.norm())
        assert err <= TOLERANCE[torch.float32], (b, err)


def test_svd_kernel_equals_reference_batched():
    M = torch.stack([_power_law(6, 9, seed=s) for s in range(3)])
    for mode in ("relative", "absolute"):
        out = spectral_update_svd(M, alpha=1.5, damping=0.05, damping_mode=mode)
        for X, O in zip(M, out):
            torch.testing.assert_close(O, _svd_reference(X, 1.5, 0.05, mode == "relative"),
                                       rtol=1e-10, atol=1e-12)


def test_update_bound_is_the_supremum():
    s = torch.logspace(-8, 8, 200001, dtype=torch.float64)
    for alpha in (1.0, 1.5, 2.0, 3.0):
        for d in (1e-4, 0.01, 1.0):
            sup = float((s / (s**alpha + d)).max())
            assert sup <= update_bound(alpha, d) * (1 + 1e-12)
            assert sup >= update_bound(alpha, d) * (1 - 1e-3)
    assert update_bound(2.0, 0.0) == math.inf and update_bound(0.5, 0.1) == math.inf


def test_relative_damping_is_scale_free():
    M = _power_law(10, 14, seed=2)
    base = spectral_update(M, alpha=2.0, damping=0.01, damping_mode="relative")
    for scale in (1e-20, 1e-8, 1e8, 1e20):
        torch.testing.assert_close(
            spectral_update(M * scale, alpha=2.0, damping=0.01, damping_mode="relative"), base,
            rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
def test_property_bounded_and_finite_over_sixty_decades(alpha, mode):
    """Random finite float32 gradients of scale 1e-30 .. 1e30 (and zero): every update is finite
    and its spectral norm at most update_bound(alpha, d) (1e-3 for rounding), in every mode."""
    g = torch.Generator().manual_seed(int(alpha * 10) + (mode == "relative"))
    d = 0.01
    bound = update_bound(alpha, d)
    for trial in range(24):
        m, n = (int(v) for v in torch.randint(2, 24, (2,), generator=g))
        scale = 10.0 ** float(torch.empty(()).uniform_(-30, 30, generator=g))
        spectrum = torch.logspace(0, -float(torch.rand((), generator=g) * 8), min(m, n))
        M = (_power_law(m, n, seed=trial) * spectrum.double()[0]).float()
        M = M * (torch.randn(m, n, generator=g).abs() > 0.3) * scale if trial % 3 else M * scale
        M = torch.zeros_like(M) if trial == 0 else M
        out = spectral_update(M, alpha=alpha, damping=d, damping_mode=mode)
        assert torch.isfinite(out).all(), (trial, scale)
        assert float(torch.linalg.matrix_norm(out.double(), 2)) <= bound * (1 + 1e-3), (trial,
                                                                                       scale)
        if trial == 0:
            assert torch.equal(out, torch.zeros_like(out))
