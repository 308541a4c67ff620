"""The model zoo: every weight matrix of the architectures users study is measured and reported."""

from __future__ import annotations

import math

import pytest
import torch

from curvlens.measure import analyze_model
from tests.zoo import FAST, ZOO, finite_share, matrix_count, trained


@pytest.fixture(autouse=True)
def one_thread():
    """Small recurrent models run 30x slower with two threads on a busy machine (thread
    contention in the LSTM kernels); one thread is also what these sizes need."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "resnet18" else n for n in ZOO])
def test_zoo_reports_every_matrix_with_finite_exponents(name):
    case = trained(ZOO[name]())
    # no SDPA backend forced here: the measurement context picks the one with a double backward
    report = analyze_model(case.model, case.loss_fn, case.inputs, case.targets,
                           **{**FAST, **case.options})
    assert len(report.layers) == matrix_count(case.model)
    assert finite_share(report) >= 0.95, {
        n: r.nan_reasons.get("alpha") for n, r in report.layers.items() if math.isnan(r.alpha)}
    for rep in report.layers.values():
        assert rep.unexplained_nans() == [], (rep.name, rep.unexplained_nans())
        if case.options.get("kronecker_backend", "hooks") is not None:
            if math.isnan(rep.b_chi):  # a matrix without factors says why
                assert rep.nan_reasons["b_chi"], rep.name


def test_zoo_names_say_what_each_matrix_is():
    report_names = {}
    for name in ("gpt-tied", "lstm-lm"):
        case = trained(ZOO[name]())
        report = analyze_model(case.model, case.loss_fn, case.inputs, case.targets, **FAST)
        report_names[name] = report
    gpt = report_names["gpt-tied"].layers
    assert gpt["wte"].aliases == ["wte.weight", "lm_head.weight"]  # tied: once, both names
    assert "tied weight" in gpt["wte"].nan_reasons["b_chi"]
    assert {"blocks.0.attn.in_proj_weight.q", "blocks.0.attn.in_proj_weight.k",
            "blocks.0.attn.in_proj_weight.v", "blocks.0.attn.out_proj"} <= set(gpt)
    assert math.isfinite(gpt["blocks.0.attn.in_proj_weight.q"].b_chi)  # MHA factors captured
    lstm = report_names["lstm-lm"].layers
    assert lstm["rnn.weight_hh_l1"].kind == "recurrent"
    reason = lstm["rnn.weight_hh_l1"].nan_reasons["b_chi"]
    assert "no capture adapter for LSTM.weight_hh_l1" in reason


@pytest.mark.parametrize("name, routed", [
    # None: every matrix (ReLU, max pooling, batch norm on running statistics); slow: 38 s, the
    # products route of the comparison (tests/test_gauss_newton.py covers such a net quickly)
    pytest.param("resnet18", None, marks=pytest.mark.slow),
    ("vit", {"heads.head"}),  # only the head: GELU, LayerNorm and softmax sit behind the rest
    ("lstm-lm", {"head"}),
])
def test_zoo_takes_the_gauss_newton_route_where_the_output_is_linear(name, routed):
    case = trained(ZOO[name]())
    options = {**FAST, "lanczos_k": 3, **case.options}
    reports = [analyze_model(case.model, case.loss_fn, case.inputs, case.targets,
                             gauss_newton=gn, **options) for gn in (True, False)]
    route = {n for n, r in reports[0].layers.items()
             if any("exact from the Gauss-Newton factorization" in x for x in r.notes)}
    assert route == (set(reports[0].layers) if routed is None else routed)
    for n, rep in reports[0].layers.items():  # the same numbers as by products
        other = reports[1].layers[n]
        for field, tol in (("h", 1e-4), ("lambda_top", 5e-3)):
            ours, theirs = torch.tensor(getattr(rep, field)), torch.tensor(getattr(other, field))
            assert ((ours - theirs).abs() <= tol * theirs.abs().max()).all(), (n, field)
