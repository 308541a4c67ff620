"""Weight-spectrum tails: CSN power-law fits, Hill, norms, Marchenko-Pastur edge."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from curvlens.spectra.weight_tails import (
    esd,
    fit_powerlaw_tail,
    format_weight_tails,
    hill_estimator,
    model_weight_tails,
    weight_tail_stats,
)


def _pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Samples with density proportional to x^-alpha on [xmin, inf) (inverse CDF)."""
    u = 1.0 - np.random.default_rng(seed).random(n)
    return xmin * u ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [1.5, 2.5, 3.5])
def test_pareto_fixed_xmin_within_standard_errors(alpha):
    fit = fit_powerlaw_tail(_pareto(alpha, 20000, seed=1), xmin=1.0)
    assert fit.n_tail == 20000
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(20000), rel=1e-12)
    assert abs(fit.alpha - alpha) < 3 * fit.sigma


@pytest.mark.parametrize("alpha", [1.8, 2.5])
def test_pareto_tail_above_lognormal_bulk_ks_xmin(alpha):
    rng = np.random.default_rng(3)
    bulk = rng.uniform(0.1, 1.0, 3000)
    x = np.concatenate([bulk, _pareto(alpha, 3000, seed=4, xmin=1.0)])
    fit = fit_powerlaw_tail(x)
    assert 0.9 <= fit.xmin <= 1.6  # the KS choice sits at the start of the true tail
    assert abs(fit.alpha - alpha) < 3 * fit.sigma


def test_mle_is_stationary_point_of_likelihood():
    x = _pareto(2.2, 500, seed=5, xmin=0.5)
    fit = fit_powerlaw_tail(x, xmin=0.5)

    def loglik(a):
        return np.sum(np.log((a - 1) / 0.5) - a * np.log(x / 0.5))

    h = 1e-5
    assert (loglik(fit.alpha + h) - loglik(fit.alpha - h)) / (2 * h) == pytest.approx(0, abs=1e-4)
    assert loglik(fit.alpha) > loglik(fit.alpha + 0.05)
    assert loglik(fit.alpha) > loglik(fit.alpha - 0.05)


@pytest.mark.parametrize("k", [2, 5, 37, 400])
def test_csn_equals_hill_identity(k):
    """CSN(xmin = X_(k)) = 1 + (k / (k - 1)) / Hill_{k-1}, X_(1) >= X_(2) >= ... descending."""
    x = np.random.default_rng(k).lognormal(0, 1.3, 1000)
    xk = np.sort(x)[::-1][k - 1]
    csn = fit_powerlaw_tail(x, xmin=xk)
    assert csn.n_tail == k
    assert csn.alpha == pytest.approx(1 + (k / (k - 1)) / hill_estimator(x, k - 1), rel=1e-13)


def test_hill_estimator_by_hand_and_errors():
    x = [8.0, 1.0, 4.0, 2.0]
    assert hill_estimator(x, 1) == pytest.approx(math.log(2), rel=1e-15)
    assert hill_estimator(x, 3) == pytest.approx((math.log(8) + math.log(4) + math.log(2)) / 3)
    with pytest.raises(ValueError, match="1 <= k < n"):
        hill_estimator(x, 4)


def test_ks_distance_matches_brute_force():
    x = _pareto(2.0, 300, seed=8)
    fit = fit_powerlaw_tail(x, xmin=1.2)
    tail = np.sort(x[x >= 1.2])
    grid = np.concatenate([tail, tail - 1e-12])
    ecdf = np.searchsorted(tail, grid, side="right") / tail.size
    model = 1 - (grid / 1.2) ** (1 - fit.alpha)
    assert fit.ks_distance == pytest.approx(np.max(np.abs(ecdf - model)), abs=1e-9)


@pytest.mark.parametrize("mu,seed", [(0.8, 0), (1.0, 1), (1.2, 2)])
def test_student_t_matrix_esd_exponent(mu, seed):
    """Entries Student-t(mu), mu < 2: ESD tail exponent 1 + mu/2 (Martin & Mahoney)."""
    w = np.random.default_rng(seed).standard_t(mu, size=(1000, 500))
    stats = weight_tail_stats(torch.from_numpy(w))
    assert stats.alpha == pytest.approx(1 + mu / 2, rel=0.15)


def test_esd_normalizations_and_conv_flatten():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(w.flatten(1) @ w.flatten(1).T).flip(0)
    torch.testing.assert_close(esd(w), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(esd(w, "ww"), ref / 27, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="normalization must be one of"):
        esd(w, "frobenius")
    with pytest.raises(ValueError, match="needs a matrix"):
        esd(torch.ones(3))


def test_norm_metrics_against_definitions():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(120, 80, generator=g, dtype=torch.float64)
    w[:, 0] *= 20  # one spike
    for norm, scale in (("raw", 1.0), ("ww", 1 / 120)):
        s = weight_tail_stats(w, normalization=norm)
        sv = torch.linalg.svdvals(w)
        lam = sv**2 * scale
        assert s.lambda_max == pytest.approx(float(lam[0]), rel=1e-12)
        assert s.log_spectral_norm == pytest.approx(math.log10(lam[0]), rel=1e-12)
        assert s.log_frobenius_norm == pytest.approx(math.log10(float((w**2).sum()) * scale))
        assert s.stable_rank == pytest.approx(float((w**2).sum() / sv[0] ** 2), rel=1e-12)
        assert s.alpha_weighted == pytest.approx(s.alpha * math.log10(lam[0]), rel=1e-12)
        p = lam / lam.sum()
        assert s.spectral_entropy == pytest.approx(float(-(p * p.log()).sum() / math.log(80)))
        assert s.n_spikes == 1
        edge = float((w**2).mean()) * (math.sqrt(120) + math.sqrt(80)) ** 2 * scale
        assert s.mp_edge == pytest.approx(edge, rel=1e-12)


def test_marchenko_pastur_edge_for_gaussian_and_planted_spikes():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(600, 300, generator=g, dtype=torch.float64)
    s = weight_tail_stats(w, mp_variance=1.0)
    assert s.n_spikes == 0
    assert abs(s.lambda_max - s.mp_edge) < 4 * s.tw_scale  # the top eigenvalue sits at the edge
    u = torch.linalg.qr(torch.randn(600, 3, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(300, 3, generator=g, dtype=torch.float64))[0]
    spiked = w + u @ torch.diag(torch.tensor([80.0, 60.0, 50.0], dtype=torch.float64)) @ v.T
    assert weight_tail_stats(spiked, mp_variance=1.0).n_spikes == 3


def test_entropy_extremes():
    with pytest.warns(UserWarning, match="power-law fit undefined"):
        flat = weight_tail_stats(torch.eye(50, dtype=torch.float64), min_tail=5, name="eye")
    assert flat.spectral_entropy == pytest.approx(1.0, abs=1e-12)
    with pytest.warns(UserWarning, match="fc"):
        rank1 = weight_tail_stats(torch.ones(20, 10, dtype=torch.float64), name="fc")
    assert rank1.spectral_entropy == 0.0
    assert math.isnan(rank1.alpha) and rank1.warnings


def test_model_weight_tails_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 64),
                        nn.ReLU(), nn.Linear(64, 32))
    res = model_weight_tails(net, min_tail=5)
    assert list(res) == ["0", "3", "5"]
    assert res["0"].shape == (16, 27) and res["3"].shape == (64, 576)
    direct = weight_tail_stats(net[3].weight, min_tail=5)
    assert res["3"].alpha == pytest.approx(direct.alpha, rel=1e-12)
    table = format_weight_tails(res)
    assert "64x576" in table and len(table.splitlines()) == 5
    assert res["5"].as_dict()["shape"] == [32, 64]


def test_bad_input_messages():
    with pytest.raises(ValueError, match="NaN or Inf"):
        weight_tail_stats(torch.full((5, 5), float("nan")), name="fc1")
    with pytest.raises(ValueError, match="min_tail"):
        fit_powerlaw_tail([1.0, 2.0, 3.0], min_tail=10)
    with pytest.raises(ValueError, match="identical"):
        fit_powerlaw_tail(np.ones(30), min_tail=5)


def test_agrees_with_powerlaw_package():
    powerlaw = pytest.importorskip("powerlaw", reason="optional reference: pip install powerlaw")
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.lognormal(0, 0.5, 1500), 3 * _pareto(2.2, 500, seed=12)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # powerlaw 2.0 clips alpha to [0, 3] unless parameter_ranges is given.
        ranges = {"alpha": [1.0001, 10.0]}
        fixed = powerlaw.Fit(x, xmin=3.0, verbose=False, parameter_ranges=ranges).power_law
        free = powerlaw.Fit(x, verbose=False, parameter_ranges=ranges)
    ours = fit_powerlaw_tail(x, xmin=3.0)
    assert ours.alpha == pytest.approx(fixed.alpha, rel=1e-12)
    se = fixed.standard_err if hasattr(fixed, "standard_err") else fixed.sigma
    assert ours.sigma == pytest.approx(se, rel=1e-12)
    best = fit_powerlaw_tail(x, min_tail=2)
    assert abs(best.alpha - free.power_law.alpha) < 2 * best.sigma


def test_cli_weights_table_from_state_dict_refuses_pickled_module(tmp_path, capsys):
    import argparse
    import json

    from curvlens.spectra._cli import add_parser

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save(net, tmp_path / "full.pt")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["spectra", "weights", str(tmp_path / "sd.pt"),
                              "--json", str(tmp_path / "w.json")])
    assert args.func(args) == 0
    out = json.loads((tmp_path / "w.json").read_text())
    assert list(out) == ["0", "2"] and out["0"]["shape"] == [128, 64]
    ref = weight_tail_stats(net[0].weight)
    assert out["0"]["alpha"] == pytest.approx(ref.alpha, rel=1e-12)
    assert "128x64" in capsys.readouterr().out
    # a pickled module is never unpickled: refused, with the conversion to run on trusted files
    args = parser.parse_args(["spectra", "weights", str(tmp_path / "full.pt")])
    with pytest.raises(ValueError, match="full.pt.*weights_only=False.*state_dict"):
        args.func(args)
