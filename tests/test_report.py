"""Tests of curvlens.report: table, JSON/CSV round trips, atomic writes, PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics

import numpy as np
import pytest
import torch

from curvlens import report as R
from curvlens.analysis import analyze_layer
from curvlens.results import LayerReport, Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _layer(name: str, kind: str, alpha: float, gamma: float, seed: int) -> LayerReport:
    """A real analysis of a noisy power law h_k ~ sigma_k^alpha, sigma_k ~ k^-gamma."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(1, 16, dtype=torch.float64)
    sigma = k ** -gamma
    h = sigma ** alpha * torch.exp(0.05 * torch.randn(15, generator=g, dtype=torch.float64))
    h[-1] = -1e-6  # one negative curvature, kept in h and out of the fits
    return analyze_layer(sigma, h, name=name, shape=(16, 15 + seed), kind=kind, bootstrap=50,
                         lambda_top=h[:10].abs().flip(0) * 1.1)


def _report(epoch: int = 3) -> Report:
    layers = {
        "features.0": _layer("features.0", "conv", 2.0, 1.2, 0),
        "features.3": _layer("features.3", "conv", 1.8, 1.0, 1),
        "classifier.very_long_layer_name_that_needs_truncation.fc": _layer(
            "classifier.very_long_layer_name_that_needs_truncation.fc", "linear", 1.3, 0.8, 2),
        "head": _layer("head", "head", 1.1, 0.9, 3),
    }
    return Report(layers=layers, epoch=epoch, step=120,
                  meta={"top_k": 15, "batch_size": 64, "note": "x"})


def _same(a: object, b: object) -> bool:
    """Equality with NaN == NaN, recursively."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _half(ci):
    h = (ci[1] - ci[0]) / 2
    return f"±.{round(100 * h):02d}" if h < 0.995 else f"±{h:.1f}"


def test_table_rows_carry_the_report_values():
    rep = _report()
    text = R.table(rep)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(map(len, lines))
    assert lines[0].startswith("curvlens report | epoch 3, step 120")
    row = next(line for line in lines if line.startswith("features.0 "))
    lr = rep.layers["features.0"]
    assert lr.trust_flags == {"alpha": "", "gamma": "", "s_rayleigh": "", "s_lanczos": ""}
    cells = row.split()
    assert cells[1:3] == ["conv", "16x15"]
    assert cells[3:6] == [f"{lr.alpha:.2f}{_half(lr.alpha_ci)}", f"{lr.gamma:.2f}"
                          f"{_half(lr.gamma_ci)}", f"{lr.s_rayleigh:.2f}{_half(lr.s_rayleigh_ci)}"]
    assert cells[6] == f"{lr.alpha * lr.gamma:.2f}"
    assert cells[7] == f"{100 * lr.transfer_error_rayleigh:.1f}%"
    assert cells[8] == f"{lr.s_lanczos:.2f}"
    assert cells[9] == "pow"
    assert any(line.startswith("~") for line in lines)  # the long name is shortened


def test_table_marks_untrusted_exponents_and_summary_leaves_them_out():
    rep = _report()
    bad = rep.layers["features.3"]
    bad.trust_flags = {**bad.trust_flags, "alpha": "noise_floor,poor_fit"}
    lines = R.table(rep).splitlines()
    row = next(line for line in lines if line.startswith("features.3 ")).split()
    assert row[3].endswith("!") and not row[4].endswith("!")
    good = next(line for line in lines if line.startswith("features.0 ")).split()
    assert not any(c.endswith("!") for c in good)
    assert any(line.startswith("untrusted: alpha 1 (noise_floor 1, poor_fit 1)")
               for line in lines)
    conv = next(x for x in R.summary_lines(rep) if x.startswith("conv"))
    assert "1 of 2 trusted; 1 left out (noise_floor 1, poor_fit 1)" in conv
    medians = R.summary_lines(rep)[R.summary_lines(rep).index(conv) + 1]
    assert medians.startswith(f"  alpha {rep.layers['features.0'].alpha:.2f} ")
    kept = [r.transfer_error_rayleigh for n, r in rep.layers.items() if n != "features.3"]
    assert R.median_transfer_error(rep) == pytest.approx(statistics.median(kept), rel=1e-15)
    everything = [r.transfer_error_rayleigh for r in rep.layers.values()]
    assert R.median_transfer_error(rep, trusted_only=False) == pytest.approx(
        statistics.median(everything), rel=1e-15)
    last = next(x for x in R.summary_lines(rep) if x.startswith("median transfer error"))
    assert "over 3 trusted layers" in last
    assert "1 left out (noise_floor 1, poor_fit 1) of the medians" in R.summary_lines(rep)[-1]


def test_table_summary_per_kind_and_median_error():
    rep = _report()
    conv = [r for r in rep.layers.values() if r.kind == "conv"]
    lines = R.summary_lines(rep)
    i = next(i for i, x in enumerate(lines) if x.startswith("conv"))
    assert "2 of 2 trusted" in lines[i]
    assert f"alpha {statistics.median(r.alpha for r in conv):.2f}" in lines[i + 1]
    errors = [r.transfer_error_rayleigh for r in rep.layers.values()]
    assert R.median_transfer_error(rep) == pytest.approx(statistics.median(errors), rel=1e-15)
    assert f"{100 * statistics.median(errors):.1f}%" in lines[-1] or any(
        f"{100 * statistics.median(errors):.1f}%" in x for x in lines)


def test_median_interval_is_the_binomial_order_statistic_interval():
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (6, 10, 25, 93):
        xs = rng.normal(size=n)
        lo, hi = R.median_interval(xs.tolist())
        j = int(stats.binom.ppf(0.025, n, 0.5))  # largest j with P(Bin < j) <= 2.5%
        while stats.binom.cdf(j, n, 0.5) <= 0.025:
            j += 1
        assert (lo, hi) == (sorted(xs)[j - 1], sorted(xs)[n - j])
        assert stats.binom.cdf(j - 1, n, 0.5) <= 0.025 < stats.binom.cdf(j, n, 0.5)
    assert all(math.isnan(v) for v in R.median_interval([1.0, 2.0, 3.0]))


def test_table_marks_undefined_values():
    rep = Report(layers={"fc": LayerReport(name="fc", kind="linear", shape=(3, 2))})
    row = R.table(rep, summary=False).splitlines()[2].split()
    assert row[:3] == ["fc", "lin", "3x2"] and row[3:9] == ["-"] * 6


def test_json_round_trip_is_lossless(tmp_path):
    rep = _report()
    rep.layers["head"].alpha_ci = (math.nan, math.inf)
    path = R.to_json(rep, tmp_path / "sub" / "run.json")
    back = R.from_json(path)
    assert isinstance(back, Report)
    assert _same(back.to_dict(), rep.to_dict())
    for name, lr in rep.layers.items():
        for field, value in lr.scalar_fields().items():
            assert _same(back.layers[name].scalar_fields()[field], value), (name, field)
        assert back.layers[name].shape == lr.shape and back.layers[name].sigma == lr.sigma
    assert os.listdir(tmp_path / "sub") == ["run.json"]  # no temporary file left


def test_json_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    R.to_json(_report(epoch=1), path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        R.to_json(_report(epoch=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_run_file_round_trip(tmp_path):
    reports = [_report(epoch=e) for e in range(3)]
    path = R.save_reports(reports, tmp_path / "run.json", meta={"seed": 0})
    back = R.load_reports(path)
    assert [r.epoch for r in back] == [0, 1, 2]
    assert all(_same(a.to_dict(), b.to_dict()) for a, b in zip(reports, back))
    assert R.from_json(path).epoch == 2
    assert json.loads(path.read_text())["meta"] == {"seed": 0}


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        R.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        R.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a curvlens report"):
        R.from_json(tmp_path / "other.json")
    with pytest.raises(TypeError, match="curvlens Report"):
        R.to_json({"layers": {}}, tmp_path / "x.json")


def test_csv_rows(tmp_path):
    reports = [_report(epoch=0), _report(epoch=1)]
    path = R.to_csv(reports, tmp_path / "r.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 8
    assert [r["epoch"] for r in rows] == ["0"] * 4 + ["1"] * 4
    for row in rows[:4]:
        lr = reports[0].layers[row["layer"]]
        assert row["kind"] == lr.kind and int(row["m"]) == lr.shape[0]
        for field in ("alpha", "gamma", "s_rayleigh", "transfer_error_rayleigh", "zeta_bound"):
            assert _same(float(row[field]), getattr(lr, field))  # repr: exact round trip
        assert int(row["n_warnings"]) == len(lr.warnings)


def test_plots_are_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = [_report(epoch=e) for e in range(2)]
    paths = R.plot(history[-1], tmp_path / "plots", history=history)
    names = sorted(p.name for p in paths)
    assert names == ["alpha_by_layer.png", "alpha_fits.png", "alpha_over_epochs.png",
                     "rank_profile.png", "transfer.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, p
    single = R.plot(history[0], tmp_path / "one")
    assert "alpha_over_epochs.png" not in {p.name for p in single}
    with pytest.raises(ValueError, match="no layers"):
        R.plot(Report(), tmp_path / "empty")


def test_untrusted_legend_swatch_looks_like_the_untrusted_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from curvlens._plots import _alpha_by_layer, _mpl

    made = []

    class Recording(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    rep = _report()
    rep.layers["head"].trust_flags = {"alpha": "noise_floor"}
    _alpha_by_layer(rep, Recording, _mpl()[1], tmp_path / "a.png")
    ax = made[0].axes[0]
    bars = {t.get_text(): p for t, p in zip(ax.get_xticklabels(), ax.patches)}
    untrusted = [p for name, p in bars.items() if name == "head"][0]
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(),
                                               ax.get_legend().legend_handles)}
    swatch = legend["untrusted (1)"]
    assert swatch.get_hatch() == untrusted.get_hatch() == "//"
    assert swatch.get_facecolor() == untrusted.get_facecolor()
    trusted = bars["features.0"]
    assert trusted.get_hatch() is None and trusted.get_facecolor() != untrusted.get_facecolor()
