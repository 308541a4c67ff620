"""Tests of curvlens.fit and curvlens.rank_models: paper conformance, exponents, PR, zeta."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlens.fit import (
    PowerLawFit,
    fit_power_law,
    fit_rank_decay,
    ols_slope,
    participation_ratio,
    zeta_bound,
)
from curvlens.rank_models import compare_rank_models

DATA = Path(__file__).parent / "data" / "spectral_alignment"
TOL = 1e-9


def _triangle_layers() -> list[dict]:
    runs = json.loads((DATA / "results_alpha_triangle.json").read_text())
    return [dict(layer, experiment=run["experiment"]) for run in runs for layer in run["results"]]


def _fit_layers() -> list[dict]:
    return json.loads((DATA / "results_model_fit_comparison.json").read_text())["layers"]


def _id(layer: dict) -> str:
    return f"{layer['experiment']}/{layer['name']}"


TRIANGLE = _triangle_layers()
MODEL_FITS = _fit_layers()


def test_conformance_data_has_24_layers():
    assert len(TRIANGLE) == 24
    assert len(MODEL_FITS) == 24


@pytest.mark.parametrize("layer", TRIANGLE, ids=_id)
def test_exponents_reproduce_the_paper(layer):
    sigma = np.asarray(layer["sigma"])
    h = np.asarray(layer["h_exact"])
    alpha = fit_power_law(sigma, h, bootstrap=0)
    gamma = fit_rank_decay(sigma, bootstrap=0)
    s = fit_rank_decay(np.sort(h[h > 0])[::-1].copy(), bootstrap=0)
    assert alpha.exponent == pytest.approx(layer["alpha"], abs=TOL)
    assert alpha.r2 == pytest.approx(layer["r2_alpha"], abs=TOL)
    assert gamma.exponent == pytest.approx(layer["gamma"], abs=TOL)
    assert gamma.r2 == pytest.approx(layer["r2_gamma"], abs=TOL)
    assert s.exponent == pytest.approx(layer["s_hessian"], abs=TOL)
    assert s.r2 == pytest.approx(layer["r2_s_hessian"], abs=TOL)
    predicted = alpha.exponent * gamma.exponent
    assert predicted == pytest.approx(layer["predicted_s"], abs=TOL)
    assert abs(s.exponent - predicted) / s.exponent == pytest.approx(
        layer["triangle_relative_error"], abs=TOL
    )
    assert alpha.n == int((h > 0).sum())


@pytest.mark.parametrize("layer", MODEL_FITS, ids=_id)
def test_rank_models_reproduce_the_paper(layer):
    (src,) = [t for t in TRIANGLE if _id(t) == _id(layer)]
    sigma = torch.tensor(src["sigma"][: layer["top_k"]], dtype=torch.float64)
    cmp = compare_rank_models(sigma)
    assert cmp.best == layer["best_model_bic"]
    for model, ref in layer["fits"].items():
        got = cmp.fits[model]
        assert got.valid is ref["valid"]
        assert got.n == ref["n"]
        for key in ("rss", "aic", "bic"):
            assert getattr(got, key) == pytest.approx(ref[key], abs=TOL), (model, key)
        for key, value in got.params.items():
            assert value == pytest.approx(ref[key], abs=TOL), (model, key)


def test_ols_slope_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)
    assert math.isnan(ols_slope([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_exact_power_law_is_recovered():
    x = torch.linspace(0.1, 10.0, 30, dtype=torch.float64)
    fit = fit_power_law(x, 3.0 * x**1.7)
    assert fit.exponent == pytest.approx(1.7, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.theil_sen == pytest.approx(1.7, abs=1e-12)
    assert fit.ci[0] == pytest.approx(1.7, abs=1e-10) and fit.ci[1] == pytest.approx(1.7, abs=1e-10)
    assert fit.n == 30 and fit.warnings == ()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_power_law_exponent_within_ci(seed):
    rng = np.random.default_rng(seed)
    k = np.arange(1, 41, dtype=float)
    values = 2.0 * k**-1.3 * np.exp(rng.normal(scale=0.15, size=k.size))
    fit = fit_rank_decay(values, seed=seed)
    lo, hi = fit.ci
    assert lo < 1.3 < hi
    assert lo < fit.exponent < hi
    assert hi - lo < 0.3  # informative, not a trivially wide interval
    assert abs(fit.theil_sen - 1.3) < 0.15
    # The studentized interval needs no randomness; the bootstrap option is seeded: same seed,
    # same interval; another seed, another one.
    assert fit_rank_decay(values, seed=seed + 10).ci == fit.ci
    boot = fit_rank_decay(values, seed=seed, interval="bootstrap")
    assert fit_rank_decay(values, seed=seed, interval="bootstrap").ci == boot.ci
    assert fit_rank_decay(values, seed=seed + 10, interval="bootstrap").ci != boot.ci


def test_bootstrap_ci_coverage_near_95_percent():
    # Over many noisy data sets the 95% interval should cover the truth most of the time.
    rng = np.random.default_rng(123)
    x = np.linspace(1.0, 50.0, 25)
    covered = 0
    trials = 60
    for t in range(trials):
        y = x**0.8 * np.exp(rng.normal(scale=0.2, size=x.size))
        lo, hi = fit_power_law(x, y, bootstrap=400, seed=t).ci
        covered += lo < 0.8 < hi
    assert covered >= 0.8 * trials


def test_rank_decay_keeps_ranks_of_dropped_values():
    values = [1.0, -1.0, 1 / 9, 1 / 16, 0.0, 1 / 36]
    fit = fit_rank_decay(values, bootstrap=0)
    assert fit.exponent == pytest.approx(2.0, abs=1e-12)
    assert fit.n == 4
    assert any("non-positive" in w for w in fit.warnings)


def test_too_few_points_is_nan_with_reason():
    fit = fit_power_law([1.0, 2.0, 3.0], [1.0, -2.0, 3.0])
    assert isinstance(fit, PowerLawFit)
    assert math.isnan(fit.exponent) and not fit.ok
    assert any("fewer than 3" in w for w in fit.warnings)


def test_inputs_as_lists_numpy_and_tensors_agree():
    x = [1.0, 2.0, 3.0, 5.0]
    y = [2.0, 3.0, 7.0, 8.0]
    a = fit_power_law(x, y, bootstrap=50)
    b = fit_power_law(np.array(x), np.array(y), bootstrap=50)
    c = fit_power_law(torch.tensor(x, dtype=torch.float32), torch.tensor(y), bootstrap=50)
    assert a == b
    assert c.exponent == pytest.approx(a.exponent, abs=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        fit_rank_decay(torch.ones(2, 2))
    with pytest.raises(ValueError, match="bootstrap"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], bootstrap=-1)
    with pytest.raises(TypeError, match="numbers"):
        fit_rank_decay("abc")


def test_theil_sen_resists_an_outlier():
    k = np.arange(1, 31, dtype=float)
    values = k**-1.0
    values[0] *= 50.0  # a high-leverage first point
    fit = fit_rank_decay(values, bootstrap=0)
    assert fit.theil_sen == pytest.approx(1.0, abs=0.05)
    assert abs(fit.exponent - 1.0) > 0.3


def test_rank_models_pick_the_generating_model():
    rng = np.random.default_rng(0)
    k = np.arange(1, 31, dtype=float)
    noise = np.exp(rng.normal(scale=0.02, size=k.size))
    assert compare_rank_models(k**-1.5 * noise).best == "power_law"
    assert compare_rank_models(np.exp(-0.3 * k) * noise).best == "exponential"
    lognormal = np.exp(-0.2 * np.log(k) ** 2 - 0.1 * np.log(k)) * noise
    cmp = compare_rank_models(lognormal)
    assert cmp.best == "lognormal"
    assert cmp.fits["lognormal"].params["a"] == pytest.approx(-0.2, abs=0.02)
    assert cmp.bic == {name: f.bic for name, f in cmp.fits.items()}


def test_rank_models_with_too_few_values():
    cmp = compare_rank_models([1.0, 0.5, 0.0])
    assert cmp.best == ""
    assert all(not f.valid and math.isnan(f.bic) for f in cmp.fits.values())
    assert cmp.warnings


def test_participation_ratio_matches_definition():
    x = np.array([3.0, 1.0, 0.5, -1.0, 0.0])
    pos = x[x > 0]
    assert participation_ratio(x) == pytest.approx(pos.sum() ** 2 / (pos**2).sum(), rel=1e-14)
    assert participation_ratio(torch.full((7,), 1e-200, dtype=torch.float64)) == pytest.approx(7.0)
    with pytest.warns(UserWarning, match="no positive"):
        assert math.isnan(participation_ratio([-1.0, 0.0]))


def test_zeta_bound_known_values():
    # zeta(2)^2/zeta(4) = 5/2; zeta(4)^2/zeta(8) = 7/6 (from zeta(2n) = |B_2n| (2 pi)^2n / 2(2n)!).
    assert zeta_bound(2.0) == pytest.approx(2.5, rel=1e-13)
    assert zeta_bound(4.0) == pytest.approx(7.0 / 6.0, rel=1e-13)
    assert zeta_bound(1.5) > zeta_bound(3.0) > 1.0


@pytest.mark.parametrize("s", [0.5, 1.0, float("nan")])
def test_zeta_bound_undefined_warns(s):
    with pytest.warns(RuntimeWarning, match="zeta bound undefined"):
        assert math.isnan(zeta_bound(s))


@pytest.mark.parametrize("s", [1.2, 1.5, 2.0, 3.0])
def test_truncated_pr_increases_to_zeta_bound(s):
    bound = zeta_bound(s)
    prs = [participation_ratio(np.arange(1, K + 1, dtype=float) ** -s) for K in
           (2, 5, 10, 20, 50, 100, 1000, 10000, 100000)]
    assert all(b > a for a, b in zip(prs, prs[1:]))  # strictly increasing in K
    assert all(pr < bound for pr in prs)  # a lower bound
    # ... and converging to it: PR_K = (zeta(s) - zeta(s, K+1))^2 / (zeta(2s) - zeta(2s, K+1))
    # with the Hurwitz zeta tails, which vanish as K grows.
    for K, pr in zip((10000, 100000), prs[-2:]):
        t = torch.tensor([s, 2 * s], dtype=torch.float64)
        full = torch.special.zeta(t, torch.ones(2, dtype=torch.float64))
        tail = torch.special.zeta(t, torch.full((2,), K + 1.0, dtype=torch.float64))
        exact = float((full[0] - tail[0]) ** 2 / (full[1] - tail[1]))
        assert pr == pytest.approx(exact, rel=1e-9)
    huge = 10.0**12
    t = torch.tensor([s, 2 * s], dtype=torch.float64)
    tail = torch.special.zeta(t, torch.full((2,), huge, dtype=torch.float64))
    full = torch.special.zeta(t, torch.ones(2, dtype=torch.float64))
    pr_huge = float((full[0] - tail[0]) ** 2 / (full[1] - tail[1]))
    assert prs[-1] <= pr_huge <= bound
    assert bound - pr_huge < 0.2 * (bound - prs[2])  # much closer than at K = 10
