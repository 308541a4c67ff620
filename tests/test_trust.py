"""Tests of the numbers a reviewer would trust: interval coverage, trust flags, samples needed,
the two s on one window, the alignment score, gamma_trace's rank cut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvlens.analysis import analyze_layer
from curvlens.fit import fit_rank_decay, student_t_quantile
from curvlens.lens import CurvatureLens
from curvlens.measure import analyze_model
from curvlens.report import from_json, to_csv, to_json
from curvlens.results import Report
from curvlens.trust import TrustPolicy, alignment_score, samples_needed, trust_flags

TRUE = {"alpha": 2.1, "gamma": 0.9, "s_rayleigh": 2.1 * 0.9, "s_lanczos": 1.5}


def _synthetic(seed: int, K: int = 20):
    """A layer with known exponents and multiplicative noise on every measured value."""
    rng = np.random.default_rng(seed)
    k = np.arange(1, K + 1, dtype=float)
    sigma = np.sort(k ** -TRUE["gamma"] * np.exp(rng.normal(scale=0.05, size=K)))[::-1].copy()
    h = sigma ** TRUE["alpha"] * np.exp(rng.normal(scale=0.2, size=K))
    lam = k ** -TRUE["s_lanczos"] * np.exp(rng.normal(scale=0.1, size=K))
    return sigma, h, lam


def _coverage(draws: int, interval: str = "studentized") -> dict[str, float]:
    hits = {name: 0 for name in TRUE}
    for seed in range(draws):
        sigma, h, lam = _synthetic(seed)
        rep = analyze_layer(sigma, h, lambda_top=lam, level=0.90, interval=interval,
                            bootstrap=400, seed=seed)
        for name, true in TRUE.items():
            lo, hi = getattr(rep, f"{name}_ci")
            hits[name] += lo < true < hi
    return {name: n / draws for name, n in hits.items()}


@pytest.mark.slow
def test_90_percent_intervals_cover_the_true_exponents_in_200_draws():
    cover = _coverage(200)
    assert all(0.80 <= c <= 0.97 for c in cover.values()), cover


def test_90_percent_intervals_cover_in_60_draws():
    cover = _coverage(60)
    assert all(0.75 <= c <= 1.0 for c in cover.values()), cover
    # Informative: not covering by being huge.
    sigma, h, lam = _synthetic(0)
    rep = analyze_layer(sigma, h, lambda_top=lam, level=0.90)
    assert rep.alpha_ci[1] - rep.alpha_ci[0] < 0.8
    assert rep.gamma_ci[1] - rep.gamma_ci[0] < 0.2


def test_studentized_interval_equals_the_t_interval_when_residuals_are_independent():
    from scipy import stats

    rng = np.random.default_rng(3)
    k = np.arange(1, 31, dtype=float)
    values = k**-1.2 * np.exp(rng.permutation(np.linspace(-0.3, 0.3, 30)))
    fit = fit_rank_decay(values, level=0.9)
    lx, ly = np.log(k), np.log(values)
    res = stats.linregress(lx, ly)
    resid = ly - res.intercept - res.slope * lx
    rho = (resid[1:] * resid[:-1]).sum() / (resid**2).sum()
    rho = min(max(rho + (1 + 3 * rho) / 30, 0.0), 0.95)
    f = (1 + rho) / (1 - rho)
    half = stats.t.ppf(0.95, max(30 / f - 2, 1)) * res.stderr * math.sqrt(f)
    assert fit.ci[0] == pytest.approx(-res.slope - half, rel=1e-9)
    assert fit.ci[1] == pytest.approx(-res.slope + half, rel=1e-9)


@pytest.mark.parametrize("p,df", [(0.95, 1.0), (0.975, 2.5), (0.95, 18.0), (0.9995, 3.0)])
def test_student_t_quantile_matches_scipy(p, df):
    from scipy import stats

    assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)
    assert student_t_quantile(1 - p, df) == pytest.approx(stats.t.ppf(1 - p, df), rel=1e-8)


def test_trust_flag_codes_and_policy_checks():
    flags = trust_flags({"alpha": (2.0, 0.5, 20), "gamma": (1.0, 0.99, 4),
                         "s_rayleigh": (math.nan, math.nan, 2), "s_lanczos": (1.5, 0.99, 20)},
                        window=20, k_above_floor=9)
    assert flags == {"alpha": "noise_floor,poor_fit", "gamma": "noise_floor,few_points",
                     "s_rayleigh": "undefined,noise_floor", "s_lanczos": ""}
    assert trust_flags({"alpha": (2.0, 0.9, 20)}, window=20, k_above_floor=10) == {"alpha": ""}
    assert trust_flags({"alpha": (2.0, 0.9, 20)}, window=20, k_above_floor=None) == {"alpha": ""}
    with pytest.raises(ValueError, match="min_r2"):
        TrustPolicy(min_r2=1.5)
    with pytest.raises(ValueError, match="min_points"):
        TrustPolicy(min_points=2)


def _regression(signal: bool, B: int = 1024, seed: int = 0):
    """A linear layer whose gradient is pure noise (targets independent of the inputs, weight
    near zero) or signal (targets from a teacher with a slowly decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 24, generator=g, dtype=torch.float64)
    if signal:
        W = torch.randn(12, 24, generator=g, dtype=torch.float64)
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        teacher = U @ torch.diag(torch.arange(1, 13, dtype=torch.float64) ** -0.3) @ Vh
        y = x @ teacher.T
    else:
        y = torch.randn(B, 12, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(24, 12, bias=False)).double()
    with torch.no_grad():  # (almost) zero: the predictions carry no signal either
        net[0].weight.copy_(1e-6 * torch.randn(12, 24, generator=g, dtype=torch.float64))
    return net, x, y


def test_pure_noise_gradient_is_flagged_untrusted():
    net, x, y = _regression(signal=False)
    rep = analyze_model(net, nn.MSELoss(), x, y, top_k=8, lanczos_k=0,
                        kronecker_backend=None).layers["0"]
    for name in ("alpha", "gamma", "s_rayleigh"):
        assert "noise_floor" in rep.trust_flags[name] and not rep.trusted(name)
    assert rep.k_kept < 4
    assert rep.n_samples == 1024 and rep.samples_needed > rep.n_samples
    assert rep.samples_needed == math.ceil(1024 * (rep.noise_floor / rep.sigma[7]) ** 2)
    assert any(w.startswith("untrusted: alpha (") for w in rep.warnings)

    net, x, y = _regression(signal=True, B=4096)
    rep = analyze_model(net, nn.MSELoss(), x, y, top_k=8, lanczos_k=0,
                        kronecker_backend=None).layers["0"]
    assert rep.k_kept == 8 and rep.trust_flags["gamma"] == ""
    assert all("noise_floor" not in f for f in rep.trust_flags.values())
    assert rep.samples_needed <= rep.n_samples


def test_samples_needed_follows_the_inverse_square_root_floor():
    sigma = torch.tensor([3.0, 1.0, 0.5])
    assert samples_needed(sigma, 1.0, 64, 3) == 256.0  # the floor must halve: 4x the samples
    assert samples_needed(sigma, 1.0, 64, 1) == 8.0
    assert math.isnan(samples_needed(torch.tensor([1.0, 0.0]), 1.0, 64, 2))


def test_trust_flags_and_intervals_round_trip_through_json_and_csv(tmp_path):
    sigma, h, lam = _synthetic(1)
    rep = analyze_layer(sigma, h, lambda_top=lam, name="fc", noise_norm=0.15, n_samples=128)
    assert rep.trust_flags["alpha"] == "noise_floor" and rep.trust_flags["s_lanczos"] == ""
    report = Report(layers={"fc": rep}, meta={"ci_level": 0.95})
    back = from_json(to_json(report, tmp_path / "r.json")).layers["fc"]
    assert back.trust_flags == rep.trust_flags
    assert back.alpha_ci == rep.alpha_ci and back.samples_needed == rep.samples_needed
    assert [back.trusted(n) for n in TRUE] == [False, False, False, True]
    text = to_csv(report, tmp_path / "r.csv").read_text()
    header, row = text.splitlines()[:2]
    cells = dict(zip(header.split(","), row.split(",")))
    assert cells["trust_alpha"] == "noise_floor" and cells["trust_s_lanczos"] == ""
    assert float(cells["alpha_ci[0]"]) == rep.alpha_ci[0]


def test_both_s_are_refitted_on_one_rank_window():
    sigma, h, lam = _synthetic(2)
    lam = lam[:12]
    rep = analyze_layer(sigma, h, lambda_top=lam)
    assert rep.s_window == 12
    hs = np.sort(h)[::-1][:12].copy()
    assert rep.s_rayleigh_common == pytest.approx(fit_rank_decay(hs).exponent, rel=1e-12)
    assert rep.s_lanczos_common == pytest.approx(
        fit_rank_decay(np.sort(lam)[::-1].copy()).exponent, rel=1e-12)
    assert rep.s_gap == pytest.approx(rep.s_rayleigh_common - rep.s_lanczos_common, abs=1e-12)
    rep = analyze_layer(sigma, h)
    assert math.isnan(rep.s_gap) and "s_gap" in rep.nan_reasons


def test_alignment_score_matches_dense_hessian_eigenvectors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss()
    report = analyze_model(net, loss_fn, x, y, top_k=3, lanczos_k=4, kronecker_backend=None)
    rep = report.layers["0"]

    params = dict(net.named_parameters())

    def loss_of(w):
        return loss_fn(functional_call(net, {**params, "0.weight": w}, (x,)), y)

    w = params["0.weight"].detach().clone().requires_grad_(True)
    H = hessian(loss_of)(w).reshape(20, 20).detach()
    evals, evecs = torch.linalg.eigh(H)
    Q = evecs[:, -4:].T.reshape(4, 4, 5)  # top-4 eigenvectors as [r, m, n]
    G = torch.autograd.grad(loss_of(w), w)[0]
    U, _, Vh = torch.linalg.svd(G.detach())
    ref = alignment_score(U[:, :3], Vh[:3].T, Q)
    assert rep.lambda_top == pytest.approx(evals.flip(0)[:4].tolist(), rel=1e-6)
    assert rep.alignment_score == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert 0.0 <= rep.alignment_score <= 1.0
    assert rep.alignment_chance == pytest.approx(3 / 20)
    # By hand: each D_k's squared overlap with the eigenvectors, averaged over them.
    by_hand = sum(float(torch.dot(Q[i].reshape(-1), torch.outer(U[:, k], Vh[k]).reshape(-1)))
                  ** 2 for i in range(4) for k in range(3)) / 4
    assert ref == pytest.approx(by_hand, rel=1e-12)


def test_alignment_score_is_one_when_the_eigenspace_is_spanned():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))[0]
    D = torch.stack([torch.outer(U[:, k], V[:, k]) for k in range(3)])  # [3, 6, 5]
    mix = torch.linalg.qr(torch.randn(3, 2, generator=g, dtype=torch.float64))[0]  # [3, 2]
    Q = torch.einsum("kmn,kr->rmn", D, mix)  # two orthonormal matrices inside span(D)
    assert alignment_score(U, V, Q) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        alignment_score(U, V, Q[:, :5])


def test_gamma_trace_uses_the_rank_cut_of_analyze_on_a_10_class_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.randn(128, 16), torch.randint(0, 10, (128,))
    lens = CurvatureLens(model, nn.CrossEntropyLoss(), top_k=10, every=1, kronecker="none",
                         lanczos_k=0, analyze_options={"bootstrap": 0})
    with lens:
        nn.CrossEntropyLoss()(model(x), y).backward()
        lens.step()
        model.zero_grad()
        report = lens.analyze(x, y)
    head = report.layers["2"]
    assert head.rank == 9  # softmax minus one-hot sums to zero over the classes
    S = lens.gradient_spectra["2"][-1][1].double()
    assert float(S[9] / S[0]) < 1e-5  # a round-off singular value
    gamma = lens.gamma_trace()["2"][-1][1]
    assert gamma == pytest.approx(head.gamma, rel=1e-4)
    naive = -np.polyfit(np.log(np.arange(1, 11)), np.log(S.numpy()), 1)[0]
    assert abs(naive - head.gamma) > 0.2  # what the old trace reported
    assert report.meta["lens"]["train_gamma"]["2"] == gamma
