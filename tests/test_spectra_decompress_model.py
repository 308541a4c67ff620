"""Free decompression of a layer's activation covariance and Hessian block from a subsample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from curvlens.spectra.decompress_model import (
    decompress_activation_covariance,
    decompress_hessian_block,
    wasserstein_1,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eig(m: torch.Tensor) -> np.ndarray:
    return np.linalg.eigvalsh(m.numpy())


def test_wasserstein_1_matches_sorted_difference():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(500), rng.standard_normal(500) + 0.3
    # equal sizes: W1 is the mean absolute difference of the sorted samples
    ref = np.mean(np.abs(np.sort(a) - np.sort(b)))
    assert wasserstein_1(a, b, levels=500) == pytest.approx(ref, rel=1e-12)
    assert wasserstein_1(a, b, levels=1000) == pytest.approx(ref, rel=1e-12)
    assert wasserstein_1(a, a + 2.0) == pytest.approx(2.0, rel=1e-12)
    # different sizes: a sample against itself repeated twice is at distance 0
    assert wasserstein_1(a, np.r_[a, a]) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("center", [False, True], ids=["second-moment", "centred"])
def test_activation_subsample_is_principal_submatrix(center):
    net = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    x = torch.randn(40, 12, generator=_gen(0), dtype=F64) + 0.5
    out = decompress_activation_covariance(
        net, "0", [x[:25], x[25:]], subsample=6, center=center, generator=_gen(3),
        deg_z=1, deg_m=2, grid=200,
    )
    a = x - x.mean(0) if center else x
    cov = a.T @ a / 40
    idx = torch.randperm(12, generator=_gen(3))[:6].sort().values
    torch.testing.assert_close(out.indices, idx)
    np.testing.assert_allclose(out.sub_eigenvalues, _eig(cov[idx][:, idx]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.exact_eigenvalues, _eig(cov), rtol=0, atol=1e-12)
    assert (out.layer, out.matrix, out.n, out.n_target) == ("0", "activation_covariance", 12, 12)
    assert not net[0]._forward_hooks  # the capture's hook is gone


def test_activation_conv_uses_unfolded_patches():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 25, 2)).to(F64)
    x = torch.randn(6, 2, 5, 5, generator=_gen(1), dtype=F64)
    out = decompress_activation_covariance(net, net[0], x, subsample=10, exact_max=18,
                                           generator=_gen(2), deg_z=1, deg_m=2, grid=200)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)  # [B*T, C*k*k]
    cov = patches.T @ patches / patches.shape[0]
    np.testing.assert_allclose(out.exact_eigenvalues, _eig(cov), rtol=0, atol=1e-12)
    idx = out.indices
    np.testing.assert_allclose(out.sub_eigenvalues, _eig(cov[idx][:, idx]), rtol=0, atol=1e-12)


def test_activation_covariance_wishart_decompression_beats_subsample():
    """First layer on N(0, I) inputs: C_A is Wishart (n = 600, N = 1200); 150 features predict
    the Marchenko-Pastur spectrum at ratio 1/2 (the subsample alone is MP at ratio 1/8)."""
    net = nn.Sequential(nn.Linear(600, 3)).to(F64)
    x = torch.randn(1200, 600, generator=_gen(0), dtype=F64)
    out = decompress_activation_covariance(net, "0", x, subsample=150, generator=_gen(1),
                                           deg_z=1, deg_m=2)
    assert out.spectrum.mass == pytest.approx(1.0, abs=0.01)
    assert out.eigenvalues().shape == (600,)
    assert out.baseline_wasserstein() > 0.2  # the subsample alone is far off
    assert out.wasserstein() <= 0.05 * out.baseline_wasserstein()


def test_activation_covariance_hidden_layer_decompression():
    """A hidden wide layer: inputs x W1^T with W1 [600, 1200] Gaussian, so C_A is a product of two
    Wishart matrices (free multiplicative convolution of two MP laws: a cubic curve, degrees
    (1, 3))."""
    n, d = 600, 1200
    net = nn.Sequential(nn.Linear(d, n, bias=False), nn.Linear(n, 3)).to(F64)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(n, d, generator=_gen(0), dtype=F64) / d**0.5)
    x = torch.randn(2400, d, generator=_gen(1), dtype=F64)
    out = decompress_activation_covariance(net, "1", x, subsample=150, generator=_gen(1),
                                           deg_z=1, deg_m=3, grid=1000)
    assert out.spectrum.mass == pytest.approx(1.0, abs=0.02)
    assert out.wasserstein() <= 0.15 * out.baseline_wasserstein()


@pytest.mark.slow
def test_activation_covariance_hidden_layer_auto_degrees():
    n, d = 600, 1200
    net = nn.Sequential(nn.Linear(d, n, bias=False), nn.Linear(n, 3)).to(F64)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(n, d, generator=_gen(0), dtype=F64) / d**0.5)
    x = torch.randn(2400, d, generator=_gen(1), dtype=F64)
    out = decompress_activation_covariance(net, "1", x, subsample=150, generator=_gen(1))
    assert out.wasserstein() <= 0.15 * out.baseline_wasserstein()


def _dense_block_hessian(net, loss_fn, x, y, name):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(w):
        return loss_fn(functional_call(net, {**params, name: w}, (x,)), y)

    w = params[name]
    return hessian(loss)(w).reshape(w.numel(), w.numel())


def test_hessian_subsample_is_principal_submatrix():
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    x = torch.randn(16, 4, generator=_gen(0), dtype=F64)
    y = torch.randn(16, 2, generator=_gen(1), dtype=F64)
    loss_fn = nn.MSELoss()
    out = decompress_hessian_block(net, loss_fn, x, y, "0", rows=7, max_batch=3, exact_max=12,
                                   generator=_gen(5), deg_z=1, deg_m=2, grid=200)
    dense = _dense_block_hessian(net, loss_fn, x, y, "0.weight")  # [12, 12] row-major vec(W)
    idx = torch.randperm(12, generator=_gen(5))[:7].sort().values
    torch.testing.assert_close(out.indices, idx)
    np.testing.assert_allclose(out.sub_eigenvalues, _eig(dense[idx][:, idx]), rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(out.exact_eigenvalues, _eig(dense), rtol=0, atol=1e-12)
    assert (out.matrix, out.n, out.n_target) == ("hessian_block", 12, 12)


def test_hessian_block_wide_linear_decompression_beats_subsample():
    """One wide Linear output under MSE: H_WW = 2 X^T X / B, Wishart; 150 of 600 coordinates."""
    n, b = 600, 1200
    net = nn.Sequential(nn.Linear(n, 1)).to(F64)
    x = torch.randn(b, n, generator=_gen(0), dtype=F64)
    y = torch.randn(b, 1, generator=_gen(1), dtype=F64)
    out = decompress_hessian_block(net, nn.MSELoss(), x, y, "0", rows=150, max_batch=150,
                                   generator=_gen(1), deg_z=1, deg_m=2, grid=1000)
    exact = _eig(2 * x.T @ x / b)  # the dense block in closed form (HVP path checked above)
    assert out.exact_eigenvalues is None
    assert out.spectrum.mass == pytest.approx(1.0, abs=0.01)
    assert wasserstein_1(out.eigenvalues(), exact) <= 0.05 * wasserstein_1(out.sub_eigenvalues,
                                                                           exact)


def test_bad_input():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)).to(F64)
    tokens = torch.randint(0, 10, (5, 2), generator=_gen(0))
    with pytest.raises(ValueError, match="layer '0' is an Embedding"):
        decompress_activation_covariance(net, "0", tokens, subsample=4)
    with pytest.raises(ValueError, match=r"layer '2'.*subsample size must be an int in \[4, 8\]"):
        decompress_activation_covariance(net, "2", tokens, subsample=9)
    with pytest.raises(ValueError, match="n_target must be an int >= the subsample size 5"):
        decompress_activation_covariance(net, "2", tokens, subsample=5, n_target=4)
    with pytest.raises(ValueError, match="saw no inputs"):
        decompress_activation_covariance(net, "2", [], subsample=5)
    y = torch.randn(5, 2, generator=_gen(1), dtype=F64)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        decompress_hessian_block(net, nn.MSELoss(), tokens, y, "2", rows=5, max_batch=0)
    with pytest.raises(ValueError, match=r"subsample size must be an int in \[4, 16\]"):
        decompress_hessian_block(net, nn.MSELoss(), tokens, y, "2", rows=17)
    out = decompress_hessian_block(net, nn.MSELoss(), tokens, y, "2", rows=8, exact_max=0,
                                   deg_z=1, deg_m=2, grid=100)
    assert out.exact_eigenvalues is None
    with pytest.raises(RuntimeError, match="exact_max >= n"):
        out.wasserstein()
