"""analyze_model's interval method, confidence level and trust thresholds: each reaches every
layer exactly as analyze_layer computes it from the same measurements, and bad values are
refused before anything is measured."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlens.analysis import analyze_layer
from curvlens.measure import analyze_model
from curvlens.trust import TrustPolicy, trust_flags


def _setup():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(10, 6, generator=g, dtype=torch.float64))
    return net, nn.MSELoss(), x, y


def _run(**options):
    torch.manual_seed(0)
    net, loss, x, y = _setup()
    return analyze_model(net, loss, x, y, top_k=6, lanczos_k=0, kronecker_backend=None,
                         **options)


def _reference(rep, **options):
    """analyze_layer on the layer's own measured sigma, h and noise norm."""
    return analyze_layer(torch.tensor(rep.sigma, dtype=torch.float64),
                         torch.tensor(rep.h, dtype=torch.float64), name=rep.name,
                         shape=rep.shape, noise_norm=rep.noise_norm, n_samples=rep.n_samples,
                         **options)


def test_level_and_bootstrap_interval_reach_every_layer():
    default = _run(bootstrap=0)
    narrow = _run(bootstrap=0, level=0.5)
    boot = _run(bootstrap=300, seed=4, interval="bootstrap", level=0.8)
    assert narrow.meta["ci_level"] == 0.5 and narrow.meta["interval"] == "studentized"
    assert boot.meta["ci_level"] == 0.8 and boot.meta["interval"] == "bootstrap"
    for name, rep in default.layers.items():
        lo, hi = rep.alpha_ci
        nlo, nhi = narrow.layers[name].alpha_ci
        assert math.isfinite(lo) and lo < nlo < nhi < hi  # a 50% interval inside the 95% one
        assert narrow.layers[name].alpha == rep.alpha
        ref = _reference(narrow.layers[name], bootstrap=0, level=0.5)
        assert narrow.layers[name].alpha_ci == ref.alpha_ci
        assert narrow.layers[name].gamma_ci == ref.gamma_ci
        b = boot.layers[name]
        ref = _reference(b, bootstrap=300, seed=4, interval="bootstrap", level=0.8)
        assert b.alpha_ci == ref.alpha_ci and b.s_rayleigh_ci == ref.s_rayleigh_ci
        assert b.alpha_ci != rep.alpha_ci


def test_trust_policy_reaches_every_layer():
    default = _run(bootstrap=0)
    strict = _run(bootstrap=0, trust=TrustPolicy(min_r2=1.0, min_points=6))
    lax = _run(bootstrap=0, trust=TrustPolicy(floor_fraction=0.0, min_points=3, min_r2=0.0))
    for name, rep in default.layers.items():
        for report, policy in ((strict, TrustPolicy(min_r2=1.0, min_points=6)),
                               (lax, TrustPolicy(floor_fraction=0.0, min_points=3, min_r2=0.0))):
            got = report.layers[name]
            fits = {e: (getattr(got, e), getattr(got, f"{e}_r2"),
                        got.alpha_n if e == "alpha" else got.top_k)
                    for e in ("alpha", "gamma", "s_rayleigh")}
            want = trust_flags(fits, window=got.rank, k_above_floor=got.k_kept, policy=policy)
            assert {e: got.trust_flags[e] for e in want} == want
        assert "poor_fit" in strict.layers[name].trust_flags["alpha"]
        assert all("noise_floor" not in f and "poor_fit" not in f
                   for f in lax.layers[name].trust_flags.values())
        assert rep.trust_flags != strict.layers[name].trust_flags


@pytest.mark.parametrize("options, match", [
    ({"interval": "jackknife"}, "interval must be one of"),
    ({"level": 1.5}, "level must be in"),
    ({"trust": {"min_r2": 0.5}}, "trust must be a curvlens.trust.TrustPolicy"),
])
def test_bad_interval_options_are_refused_up_front(options, match):
    with pytest.raises(ValueError, match=match):
        _run(**options)
