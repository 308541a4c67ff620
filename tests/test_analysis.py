"""Tests of curvlens.analysis / alignment / results: the paper's per-layer quantities."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvlens.alignment import alignment_budget
from curvlens.analysis import LayerReport, Report, analyze_layer
from curvlens.kronecker import kronecker_factors
from curvlens.measure import analyze_model

DATA = Path(__file__).parent / "data" / "spectral_alignment"
TOL = 1e-9


def _triangle_layers() -> list[dict]:
    runs = json.loads((DATA / "results_alpha_triangle.json").read_text())
    return [dict(layer, experiment=run["experiment"]) for run in runs for layer in run["results"]]


TRIANGLE = _triangle_layers()
MODEL_FITS = {
    f"{x['experiment']}/{x['name']}": x
    for x in json.loads((DATA / "results_model_fit_comparison.json").read_text())["layers"]
}


def _id(layer: dict) -> str:
    return f"{layer['experiment']}/{layer['name']}"


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("layer", TRIANGLE, ids=_id)
def test_analyze_layer_reproduces_the_paper(layer):
    rep = analyze_layer(layer["sigma"], layer["h_exact"], name=layer["name"],
                        shape=tuple(layer["shape"]), paper_compatible=True, bootstrap=0)
    assert len(TRIANGLE) == 24
    for ours, ref in [("alpha", "alpha"), ("alpha_r2", "r2_alpha"), ("gamma", "gamma"),
                      ("gamma_r2", "r2_gamma"), ("s_rayleigh", "s_hessian"),
                      ("s_rayleigh_r2", "r2_s_hessian"), ("predicted_s", "predicted_s"),
                      ("transfer_error_rayleigh", "triangle_relative_error")]:
        assert getattr(rep, ours) == pytest.approx(layer[ref], abs=TOL), ours
    fits = MODEL_FITS[_id(layer)]
    assert rep.bic_best == fits["best_model_bic"]
    for model, ref in fits["fits"].items():
        assert rep.bic[model] == pytest.approx(ref["bic"], abs=TOL)
        assert rep.aic[model] == pytest.approx(ref["aic"], abs=TOL)
    assert rep.n_negative_h == sum(h <= 0 for h in layer["h_exact"])
    assert rep.unexplained_nans() == []


def test_default_mode_stops_at_the_numerical_rank():
    # The paper's 10-class heads have a 1e-8 singular value (rank 9): the default window drops it.
    (fc,) = [x for x in TRIANGLE if x["name"] == "fc"]
    paper = analyze_layer(fc["sigma"], fc["h_exact"], shape=(10, 512), paper_compatible=True,
                          rank_tol=1e-6, bootstrap=0)
    default = analyze_layer(np.float32(fc["sigma"]), fc["h_exact"], shape=(10, 512), bootstrap=0)
    assert paper.rank == default.rank == 9
    sigma = np.asarray(fc["sigma"][:9])
    slope = np.polyfit(np.log(np.arange(1, 10)), np.log(sigma), 1)[0]
    assert default.gamma == pytest.approx(-slope, abs=1e-12)
    assert paper.gamma == pytest.approx(fc["gamma"], abs=TOL)
    assert any("rank 9 < K=10" in w for w in default.warnings)
    assert any("paper-compatible" in w for w in paper.warnings)


# --------------------------------------------------------------------------- synthetic spectra


def test_exact_synthetic_spectrum():
    k = torch.arange(1, 31, dtype=torch.float64)
    sigma, h = 2.0 * k**-0.8, 0.5 * (2.0 * k**-0.8) ** 1.7
    lam = 3.0 * k**-1.36
    rep = analyze_layer(sigma, h, lambda_top=lam.flip(0), bootstrap=100)
    assert rep.alpha == pytest.approx(1.7, abs=1e-12)
    assert rep.alpha_k2 == pytest.approx(1.7, abs=1e-12)
    assert rep.alpha_theil_sen == pytest.approx(1.7, abs=1e-12)
    assert rep.gamma == pytest.approx(0.8, abs=1e-12)
    assert rep.s_rayleigh == pytest.approx(1.36, abs=1e-12)
    assert rep.s_lanczos == pytest.approx(1.36, abs=1e-12)  # sorted descending internally
    assert rep.predicted_s == pytest.approx(1.36, abs=1e-12)
    assert rep.transfer_error_rayleigh == pytest.approx(0.0, abs=1e-12)
    assert rep.transfer_error_lanczos == pytest.approx(0.0, abs=1e-12)
    assert rep.psi_slope == pytest.approx(1.7 - 2.0, abs=1e-12)
    hs = h.numpy()
    assert rep.pr_h == pytest.approx(hs.sum() ** 2 / (hs**2).sum(), rel=1e-13)
    assert rep.pr_h < rep.zeta_bound  # a truncated PR of a pure power law stays below the bound
    assert rep.bic_best == "power_law"
    assert rep.lambda_top == sorted(lam.tolist(), reverse=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_synthetic_exponents_within_ci(seed):
    rng = np.random.default_rng(seed)
    k = np.arange(1, 41, dtype=float)
    sigma = k**-0.9 * np.exp(rng.normal(scale=0.05, size=k.size))
    sigma = np.sort(sigma)[::-1].copy()
    h = sigma**2.1 * np.exp(rng.normal(scale=0.2, size=k.size))
    rep = analyze_layer(sigma, h, seed=seed)
    assert rep.alpha_ci[0] < 2.1 < rep.alpha_ci[1]
    assert rep.gamma_ci[0] < 0.9 < rep.gamma_ci[1]
    assert rep.alpha_ci[1] - rep.alpha_ci[0] < 0.6
    assert abs(rep.alpha_theil_sen - 2.1) < 0.2
    assert rep.psi_slope == pytest.approx(rep.alpha - 2.0, abs=1e-10)


def test_noise_floor_keeps_sigma_above_twice_the_noise():
    k = torch.arange(1, 21, dtype=torch.float64)
    sigma, h = k**-1.0, k**-2.0
    rep = analyze_layer(sigma, h, noise_norm=0.05, bootstrap=0)  # floor 0.1 keeps k <= 9
    assert rep.noise_floor == pytest.approx(0.1)
    assert rep.k_kept == 9
    assert rep.alpha_above_floor == pytest.approx(2.0, abs=1e-12)
    tight = analyze_layer(sigma, h, noise_norm=0.3, bootstrap=0)  # keeps k = 1 only
    assert tight.k_kept == 1 and math.isnan(tight.alpha_above_floor)
    assert "noise floor" in tight.nan_reasons["alpha_above_floor"]
    with pytest.raises(ValueError, match="noise_norm"):
        analyze_layer(sigma, h, noise_norm=-1.0)


# --------------------------------------------------------------------------- alignment budget


@pytest.fixture(scope="module")
def trained_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(),
                        nn.Linear(8, 4)).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(10, 4, dtype=torch.float64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, x, y


def _dense_block_curvature(net, loss_fn, x, y, name, U, V) -> torch.Tensor:
    """h_k from the dense Hessian block (torch.func.hessian), the brute-force reference."""
    pname = f"{name}.weight"
    params = {k: v.detach() for k, v in net.named_parameters()}
    W = params[pname]

    def loss(w):
        return loss_fn(functional_call(net, {**params, pname: w}, (x,)), y)

    H = torch.func.hessian(loss)(W).reshape(W.numel(), W.numel())
    D = torch.einsum("mk,nk->kmn", U, V).reshape(U.shape[1], -1)
    return torch.einsum("ki,ij,kj->k", D, H, D)


@pytest.mark.parametrize("name", ["0", "2", "4"])
def test_alpha_budget_on_a_trained_mlp(name, trained_mlp):
    net, x, y = trained_mlp
    loss_fn = nn.MSELoss()
    W = dict(net.named_modules())[name].weight
    (G,) = torch.autograd.grad(loss_fn(net(x), y), [W])
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    V = Vh.mT
    h = _dense_block_curvature(net, loss_fn, x, y, name, U, V)
    f = kronecker_factors(net, loss_fn, x, y, mode="empirical", layers=[name])[name]
    rep = analyze_layer(S, h, C_A=f.C_A, C_delta=f.C_delta, U=U, V=V, bootstrap=0)
    assert rep.alpha_n >= 3 and math.isfinite(rep.alpha)
    # alpha = b(chi) + b(rho_delta) + b(rho_A) + b(lambda_delta) + b(lambda_A) (same window)
    assert rep.alpha_budget == pytest.approx(rep.alpha, abs=1e-10)
    assert rep.psi_slope == pytest.approx(rep.alpha - 2.0, abs=1e-10)
    assert rep.beta == pytest.approx(rep.b_lambda_delta + rep.b_lambda_A, abs=1e-10)
    assert rep.phi == pytest.approx(rep.b_rho_delta + rep.b_rho_A, abs=1e-10)
    # Per direction: h_k = chi_k rho_delta_k rho_A_k lambda_delta_k lambda_A_k, and h_kron.
    prod = (np.array(rep.chi) * np.array(rep.rho_delta) * np.array(rep.rho_A)
            * np.array(rep.lambda_delta) * np.array(rep.lambda_A))
    np.testing.assert_allclose(prod, h.numpy(), rtol=1e-10, atol=1e-14)
    ev_d = torch.linalg.eigvalsh(f.C_delta).flip(0)[: len(rep.sigma)]
    np.testing.assert_allclose(rep.lambda_delta, ev_d.numpy(), rtol=1e-10, atol=1e-14)
    hk = ((U.mT @ f.C_delta @ U).diagonal() * (V.mT @ f.C_A @ V).diagonal()).numpy()
    np.testing.assert_allclose(rep.h_kron, hk, rtol=1e-12, atol=1e-16)
    assert not [w for w in rep.warnings if "alignment budget" in w]
    assert rep.unexplained_nans() == []


def test_kronecker_exact_layer_has_chi_one():
    # One Linear layer under MSE: H_WW = kron(C_delta, C_A) exactly with the "ggn" factors, so
    # chi_k = h_k / h_kron_k = 1 and b(chi) = 0: the budget is pure alignment + spectra.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(7, 5, bias=False)).double()
    x, y = torch.randn(40, 7, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    (G,) = torch.autograd.grad(loss_fn(net(x), y), [net[0].weight])
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    h = _dense_block_curvature(net, loss_fn, x, y, "0", U, Vh.mT)
    f = kronecker_factors(net, loss_fn, x, y, mode="ggn", layers=["0"])["0"]
    rep = analyze_layer(S, h, C_A=f.C_A, C_delta=f.C_delta, U=U, V=Vh.mT, bootstrap=0)
    np.testing.assert_allclose(rep.chi, 1.0, rtol=1e-10)
    assert rep.b_chi == pytest.approx(0.0, abs=1e-9)
    assert rep.alpha_budget == pytest.approx(rep.alpha, abs=1e-10)


def test_alignment_budget_window_and_shapes():
    C_d = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    C_a = torch.eye(4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    h = torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    b = alignment_budget(sigma, h, C_A=C_a, C_delta=C_d, U=eye, V=eye)
    assert b.window.tolist() == [True, True, True, False]  # lambda_delta_4 = 0
    assert b.total == pytest.approx(b.alpha, abs=1e-12)
    assert any("k=[4]" in w for w in b.warnings)
    with pytest.raises(ValueError, match="U must be"):
        alignment_budget(sigma, h, C_A=C_a, C_delta=C_d, U=eye[:3], V=eye)
    with pytest.raises(ValueError, match="square"):
        alignment_budget(sigma, h, C_A=C_a[:3], C_delta=C_d, U=eye, V=eye[:3])


# --------------------------------------------------------------------------- NaN explanations


def test_fewer_than_three_positive_h_is_explained():
    rep = analyze_layer([3.0, 2.0, 1.0, 0.5], [1.0, -1.0, 0.5, -0.2], bootstrap=0)
    assert math.isnan(rep.alpha) and rep.n_negative_h == 2
    assert "fewer than 3 positive points" in rep.nan_reasons["alpha"]
    assert math.isfinite(rep.gamma)
    assert rep.unexplained_nans() == []
    assert any(w.startswith("alpha") and "fewer than 3" in w for w in rep.warnings)
    assert any("h_k <= 0" in w for w in rep.warnings)


def test_slow_decay_has_no_zeta_bound():
    k = torch.arange(1, 21, dtype=torch.float64)
    rep = analyze_layer(k**-0.5, k**-0.5, bootstrap=0)  # s = 0.5 <= 1
    assert rep.s_rayleigh == pytest.approx(0.5)
    assert math.isnan(rep.zeta_bound)
    assert "s > 1" in rep.nan_reasons["zeta_bound"]
    assert rep.unexplained_nans() == []


def test_missing_inputs_are_explained():
    k = torch.arange(1, 11, dtype=torch.float64)
    rep = analyze_layer(k**-1.0, k**-2.0, bootstrap=0)
    for name in ("b_chi", "beta", "phi"):
        assert "missing ['C_A', 'C_delta', 'U', 'V']" in rep.nan_reasons[name]
    assert "Lanczos" in rep.nan_reasons["s_lanczos"]
    assert "noise" in rep.nan_reasons["noise_floor"]
    assert "no weight passed" in rep.nan_reasons["weight_alpha"]


def test_weight_alpha_and_the_corollary_check():
    from curvlens.spectra.weight_tails import weight_tail_stats

    g = torch.Generator().manual_seed(0)
    W = torch.distributions.StudentT(1.0).sample((300, 200)).double()  # heavy-tailed ESD
    k = torch.arange(1, 11, dtype=torch.float64)
    rep = analyze_layer(k**-1.0, k**-2.0, weight=W, bootstrap=0)
    expected = weight_tail_stats(W).alpha
    assert math.isfinite(expected) and rep.weight_alpha == pytest.approx(expected, rel=1e-12)
    # s = 2 here: a tail exponent >= s violates the paper's corollary and is flagged.
    flagged = any("corollary" in w for w in rep.warnings)
    assert flagged == (expected >= rep.s_rayleigh)
    light = analyze_layer(k**-1.0, k**-3.0, weight=torch.randn(300, 200, generator=g,
                                                                   dtype=torch.float64),
                          bootstrap=0)
    assert math.isfinite(light.weight_alpha)
    assert any("corollary" in w for w in light.warnings) == (light.weight_alpha >= 3.0)
    assert rep.unexplained_nans() == []
    assert rep.h_kron == [] and rep.chi == []


def test_zero_gradient_is_all_nan_with_reason():
    rep = analyze_layer(torch.zeros(5), torch.zeros(5), name="dead")
    assert rep.rank == 0 and math.isnan(rep.alpha) and math.isnan(rep.gamma)
    assert rep.unexplained_nans() == []
    assert "zero gradient" in rep.nan_reasons["gamma"]


def test_bad_inputs_raise_with_the_layer_name():
    with pytest.raises(ValueError, match="'L'.*same length"):
        analyze_layer([1.0, 0.5], [1.0], name="L")
    with pytest.raises(ValueError, match="'L'.*descending"):
        analyze_layer([0.5, 1.0, 0.2], [1.0, 1.0, 1.0], name="L")
    with pytest.raises(ValueError, match="'L'.*NaN"):
        analyze_layer([1.0, float("nan")], [1.0, 1.0], name="L")
    with pytest.raises(ValueError, match="'L'.*empty"):
        analyze_layer([], [], name="L")
    with pytest.raises(ValueError, match="window"):
        analyze_layer([1.0, 0.5], [1.0, 1.0], name="L", window=3)
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'L'.*V must be"):
        analyze_layer([3.0, 2.0, 1.0], [3.0, 2.0, 1.0], name="L", C_A=torch.eye(4),
                      C_delta=eye, U=eye, V=eye)


# --------------------------------------------------------------------------- serialization


def test_report_round_trips_through_json():
    k = torch.arange(1, 16, dtype=torch.float64)
    rep = analyze_layer(k**-1.0, k**-2.0, name="a", shape=(15, 20), kind="conv",
                        lambda_top=k**-1.5, noise_norm=1e-3, bootstrap=50)
    report = Report(layers={"a": rep, "b": analyze_layer(torch.zeros(3), torch.zeros(3))},
                    epoch=2, step=40, meta={"top_k": 15})
    text = json.dumps(report.to_dict())
    back = Report.from_dict(json.loads(text))
    assert json.dumps(back.to_dict()) == text
    assert back.layers["a"].shape == (15, 20) and isinstance(back.layers["a"].alpha_ci, tuple)
    assert back.layers["a"].alpha == rep.alpha
    assert math.isnan(back.layers["b"].alpha)
    with pytest.raises(ValueError, match="not a curvlens report"):
        Report.from_dict({"layers": {}})
    with pytest.raises(ValueError, match="newer"):
        Report.from_dict({**report.to_dict(), "version": 99})


def test_layer_report_from_dict_reads_null_as_nan_and_warns_on_unknown_keys():
    d = LayerReport(name="x").to_dict()
    d["alpha"] = None
    d["future_field"] = 1
    with pytest.warns(UserWarning, match="future_field"):
        rep = LayerReport.from_dict(d)
    assert math.isnan(rep.alpha)


# --------------------------------------------------------------------------- end to end


def _digits_cnn(steps: int = 40):
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net, x[1500:1628], y[1500:1628]


def test_analyze_model_on_a_trained_digits_cnn():
    net, xb, yb = _digits_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no zero-gradient etc. on a healthy model
        warnings.simplefilter("error", RuntimeWarning)
        report = analyze_model(net, nn.CrossEntropyLoss(), xb, yb, top_k=6, bootstrap=200,
                               epoch=1, step=60)
    assert list(report.layers) == ["0", "2", "5", "8", "11"]
    assert report.epoch == 1 and report.meta["top_k"] == 6
    assert all(net[i].training for i in range(len(net)))  # measurement mode was undone
    for name in ("0", "2", "5"):
        rep = report.layers[name]
        assert rep.kind == "conv" and rep.top_k == 6 and len(rep.h) == 6
        assert rep.rank == 6 or any(f"rank {rep.rank} < K=6" in w for w in rep.warnings)
        # Only the weight tail (another module's job), where the batch gradient is within its
        # half-batch noise the fit above the noise floor, and on one batch the curvature noise
        # (no two halves of batches) may be undefined, with reasons.
        undefined = {k for k, v in rep.scalar_fields().items() if math.isnan(v)}
        assert undefined <= {"weight_alpha", "alpha_above_floor", "curvature_noise"}, (
            name, rep.nan_reasons)
        assert "curvature_noise" in undefined
        assert rep.unexplained_nans() == []
        if "alpha_above_floor" in undefined:
            assert rep.k_kept < 3 and "noise floor" in rep.nan_reasons["alpha_above_floor"]
        assert rep.alpha_budget == pytest.approx(rep.alpha, abs=1e-10)
        assert rep.psi_slope == pytest.approx(rep.alpha - 2.0, abs=1e-10)
        assert rep.noise_norm > 0 and rep.noise_floor == 2 * rep.noise_norm
        assert rep.k_kept == sum(s > rep.noise_floor for s in rep.sigma)
        assert len(rep.lambda_top) == 6 and rep.lambda_top[0] >= max(rep.h) * (1 - 1e-4)
        assert any("dropout off (Dropout in eval mode)" in n for n in rep.notes)
    # Cross-check one layer's h against the dense Hessian-free reference: h_k from a fresh
    # double-backward HVP along u_k v_k^T.
    rep = report.layers["5"]
    W = net[5].weight
    loss = nn.functional.cross_entropy(net.eval()(xb), yb)
    (G,) = torch.autograd.grad(loss, [W], create_graph=True)
    U, S, Vh = torch.linalg.svd(G.detach().flatten(1), full_matrices=False)
    np.testing.assert_allclose(rep.sigma, S[:6].double().numpy(), rtol=1e-5)
    D = torch.einsum("m,n->mn", U[:, 0], Vh[0]).reshape(W.shape)
    (HD,) = torch.autograd.grad(G, [W], grad_outputs=D)
    assert rep.h[0] == pytest.approx(float((HD * D).sum()), rel=1e-4)
    net.train()
    assert json.loads(json.dumps(report.to_dict()))["layers"]["5"]["alpha"] == rep.alpha


def test_analyze_model_bad_inputs():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="empty batch"):
        analyze_model(net, nn.MSELoss(), torch.zeros(0, 3), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="top_k"):
        analyze_model(net, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 2), top_k=0)

    class Sqrt(nn.Module):
        def forward(self, x):
            return x.abs().sqrt()

    bad = nn.Sequential(nn.Linear(3, 4), Sqrt(), nn.Linear(4, 2))
    with torch.no_grad():
        bad[0].weight.zero_()
        bad[0].bias.zero_()  # sqrt'(0) = inf: a finite loss with a NaN gradient in layer "0"
    with pytest.warns(UserWarning, match="layer '0'.*NaN or Inf"):
        report = analyze_model(bad, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 2))
    # one failing matrix never loses the report: "0" is NaN with the reason, "2" is reported
    assert math.isnan(report.layers["0"].alpha) and report.layers["0"].unexplained_nans() == []
    assert "NaN or Inf" in report.layers["0"].nan_reasons["alpha"]
    assert list(report.layers) == ["0", "2"]


def test_analyze_model_zero_gradient_layer_warns_and_explains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # dead ReLU: layer "0" gets an exactly zero gradient
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    with pytest.warns(UserWarning, match="exactly zero") as record:
        report = analyze_model(net, nn.MSELoss(), x, y, top_k=3, bootstrap=0)
    # Layer "2" sees only zeros from the dead ReLU, so its weight gradient is zero too.
    assert sorted(str(w.message).split("'")[1] for w in record) == ["0", "2"]
    dead = report.layers["0"]
    assert math.isnan(dead.alpha) and "zero gradient" in dead.nan_reasons["alpha"]
    assert dead.unexplained_nans() == []
    head = report.layers["4"]  # a 2 x 5 head: K = 2 directions, too few for any fit
    assert head.top_k == 2 and math.isnan(head.alpha) and math.isnan(head.bic["power_law"])
    assert head.bic_best == "" and "more than 2" in head.nan_reasons["bic"]
    assert head.unexplained_nans() == []
    assert any("top_k=3 clipped" in n for n in head.notes)
