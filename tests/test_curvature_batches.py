"""analyze_model(curvature_batches=n): curvatures on the first n batches, gradient on all."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvlens.analysis import analyze_layer
from curvlens.measure import analyze_model
from curvlens.results import Report
from curvlens.trust import TrustPolicy, trust_flags

DT = torch.float64


def _case(batches: int = 6, size: int = 8):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(batches * size, 5, generator=g, dtype=DT)
    y = torch.randint(0, 4, (batches * size,), generator=g)
    data = list(zip(x.split(size), y.split(size)))
    return model, nn.CrossEntropyLoss(), x, y, data


def _grad(model, loss_fn, x, y, name):
    w = dict(model.named_parameters())[f"{name}.weight"]
    return torch.autograd.grad(loss_fn(model(x), y), w)[0]


def _dense(model, loss_fn, x, y, name):
    """The dense Hessian block [m n, m n] of the mean loss on (x, y) w.r.t. layer ``name``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    key = f"{name}.weight"
    w = params[key]

    def loss(wt):
        return loss_fn(functional_call(model, {**params, key: wt}, (x,)), y)

    return hessian(loss)(w).reshape(w.numel(), w.numel())


def _quad(H, U, V):
    D = torch.einsum("mk,nk->kmn", U, V).reshape(U.shape[1], -1)
    return ((D @ H) * D).sum(1)


@pytest.mark.parametrize("budget", [None, 8_000])  # kept gradient graphs / streamed products
def test_curvatures_on_the_first_batches_gradient_and_floor_on_all(budget, monkeypatch):
    import curvlens.measure as measure

    kept = []

    def spy(*args, **kwargs):
        kept.append(shared_graphs(*args, **kwargs))
        return kept[-1]

    shared_graphs = measure.shared_graphs
    monkeypatch.setattr(measure, "shared_graphs", spy)
    model, loss_fn, x, y, data = _case()
    n, k = 4, 3
    rep = analyze_model(model, loss_fn, data, None, top_k=k, lanczos_k=3, bootstrap=0,
                        curvature_batches=n, memory_budget=budget)
    assert rep.meta["batch_size"] == 48 and rep.meta["curvature_samples"] == 32
    assert (kept[0] is None) is (budget is not None)  # the budget leaves no room for the graphs
    assert kept[0] is None or len(kept[0]) == n
    xc, yc = x[:32], y[:32]
    for name in ("0", "2"):
        layer = rep.layers[name]
        G = _grad(model, loss_fn, x, y, name)
        U, S, Vh = torch.linalg.svd(G)
        U, V = U[:, :k], Vh[:k].mT
        torch.testing.assert_close(torch.tensor(layer.sigma, dtype=DT), S[:k], rtol=1e-10,
                                   atol=1e-14)
        G1 = _grad(model, loss_fn, x[:24], y[:24], name)
        G2 = _grad(model, loss_fn, x[24:], y[24:], name)
        noise = float(torch.linalg.matrix_norm((G1 - G2) / 2, ord=2))
        assert layer.noise_norm == pytest.approx(noise, rel=1e-10)
        assert layer.n_samples == 48
        H = _dense(model, loss_fn, xc, yc, name)
        torch.testing.assert_close(torch.tensor(layer.h, dtype=DT), _quad(H, U, V),
                                   rtol=1e-8, atol=1e-12)
        top = torch.linalg.eigvalsh(H).flip(0)[:3]
        torch.testing.assert_close(torch.tensor(layer.lambda_top, dtype=DT), top, rtol=1e-6,
                                   atol=1e-10)
        h1 = _quad(_dense(model, loss_fn, xc[:16], yc[:16], name), U, V)
        h2 = _quad(_dense(model, loss_fn, xc[16:], yc[16:], name), U, V)
        want = ((h1 - h2).abs() / (h1 + h2).abs()).quantile(0.5)
        assert layer.curvature_noise == pytest.approx(float(want), rel=1e-6)
        assert any("curvature_batches=4" in note for note in layer.notes)


def test_default_and_all_batches_measure_the_curvature_on_every_batch():
    model, loss_fn, x, y, data = _case()
    opts = dict(top_k=3, lanczos_k=2, bootstrap=0)
    default = analyze_model(model, loss_fn, data, None, **opts)
    every = analyze_model(model, loss_fn, data, None, curvature_batches=6, **opts)
    assert default.meta["curvature_samples"] == every.meta["curvature_samples"] == 48
    for name, rep in default.layers.items():
        G = _grad(model, loss_fn, x, y, name)
        U, _, Vh = torch.linalg.svd(G)
        h = _quad(_dense(model, loss_fn, x, y, name), U[:, :3], Vh[:3].mT)
        torch.testing.assert_close(torch.tensor(rep.h, dtype=DT), h, rtol=1e-8, atol=1e-12)
        for field in ("h", "lambda_top", "sigma", "noise_norm", "curvature_noise"):
            torch.testing.assert_close(torch.tensor(getattr(every.layers[name], field)),
                                       torch.tensor(getattr(rep, field)), rtol=1e-10, atol=0)
        assert math.isfinite(rep.curvature_noise)


def test_one_batch_has_no_curvature_noise():
    model, loss_fn, x, y, _ = _case()
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=0, bootstrap=0)
    assert math.isnan(rep.layers["0"].curvature_noise)
    assert "one batch" in rep.layers["0"].nan_reasons["curvature_noise"]
    assert not rep.layers["0"].unexplained_nans()
    # the usual single-batch analysis: kept as a NaN reason, not a warning line on every layer
    assert not [w for w in rep.layers["0"].warnings if "curvature_noise" in w]


@pytest.mark.parametrize("value", [0, 1, -2, True, 2.5, "2"])
def test_bad_curvature_batches_are_refused_by_name(value):
    model, loss_fn, _, _, data = _case()
    with pytest.raises(ValueError, match="curvature_batches must be None or an int >= 2"):
        analyze_model(model, loss_fn, data, None, top_k=3, curvature_batches=value)


def test_more_curvature_batches_than_batches_or_one_batch_are_refused():
    model, loss_fn, x, y, data = _case()
    with pytest.raises(ValueError, match=r"curvature_batches=7, but the fixed data has only 6"):
        analyze_model(model, loss_fn, data, None, top_k=3, curvature_batches=7)
    with pytest.raises(ValueError, match="curvature_batches needs the fixed data as an iterable"):
        analyze_model(model, loss_fn, x, y, top_k=3, curvature_batches=2)


def test_curvature_noise_of_two_halves_and_its_trust_flag_round_trip():
    k = torch.arange(1, 11, dtype=DT)
    sigma, h = k ** -1.0, k ** -1.5
    for eps, flagged in ((0.3, True), (0.05, False)):
        rep = analyze_layer(sigma, h, name="toy", bootstrap=0, noise_norm=0.0,
                            h_halves=(h * (1 + eps), h * (1 - eps)))
        assert rep.curvature_noise == pytest.approx(eps, rel=1e-12)
        for name in ("alpha", "s_rayleigh", "gamma", "s_lanczos"):
            want = flagged and name in ("alpha", "s_rayleigh")
            assert ("curvature_noise" in rep.trust_flags[name]) is want, (eps, name)
        back = Report.from_dict(Report(layers={"toy": rep}).to_dict()).layers["toy"]
        assert back.curvature_noise == rep.curvature_noise
        assert back.trust_flags == rep.trust_flags
    loose = analyze_layer(sigma, h, name="toy", bootstrap=0, noise_norm=0.0,
                          h_halves=(h * 1.3, h * 0.7), trust=TrustPolicy(max_curvature_noise=0.5))
    assert loose.trust_flags["alpha"] == ""


def test_trust_flags_skip_an_unmeasured_curvature_noise_and_refuse_a_bad_threshold():
    fits = {"alpha": (2.0, 0.99, 10), "gamma": (1.0, 0.99, 10)}
    assert trust_flags(fits, window=10, k_above_floor=10, curvature_noise=math.nan) == {
        "alpha": "", "gamma": ""}
    assert trust_flags(fits, window=10, k_above_floor=10, curvature_noise=0.2) == {
        "alpha": "curvature_noise", "gamma": ""}
    with pytest.raises(ValueError, match="max_curvature_noise"):
        TrustPolicy(max_curvature_noise=0.0)
