"""End-to-end tests of the ``curvlens`` command on tiny runs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest

from curvlens.cli import main
from curvlens.report import from_json, load_reports

pytest.importorskip("sklearn")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TINY = ["--max-train", "128", "--samples", "96", "--fixed-batch", "32", "--top-k", "5",
         "--lanczos-k", "3",
         "--bootstrap", "0", "--every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny two-epoch demo shared by the tests: ``(output dir, stdout)``."""
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--epochs", "2", "--out", str(out), *_TINY]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    return demo_run[0]


def test_demo_writes_reports_and_plots(demo_dir, capsys):
    run = json.loads((demo_dir / "run.json").read_text())
    assert run["format"] == "curvlens.run" and run["meta"]["epochs"] == 2
    reports = load_reports(demo_dir / "run.json")
    assert [r.epoch for r in reports] == [0, 1]
    assert list(reports[-1].layers) == ["conv1", "conv2", "fc", "head"]
    last = from_json(demo_dir / "report.json")
    assert last.to_dict() == reports[-1].to_dict() or json.dumps(last.to_dict()) == json.dumps(
        reports[-1].to_dict())
    assert any(math.isfinite(rep.alpha) for rep in last.layers.values())
    # the gradient on all 96 shifted samples, the curvatures on the first two batches of 32
    assert last.meta["batch_size"] == 96 and last.meta["curvature_samples"] == 64
    assert run["meta"]["analysis_samples"] == 96
    rows = list(csv.DictReader((demo_dir / "report.csv").open()))
    assert len(rows) == 8 and {r["layer"] for r in rows} == {"conv1", "conv2", "fc", "head"}
    pngs = sorted((demo_dir / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"alpha_fits.png", "transfer.png", "alpha_by_layer.png",
                                      "rank_profile.png", "alpha_over_epochs.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_demo_prints_a_table_per_epoch(demo_run):
    out_dir, out = demo_run
    assert out.count("curvlens report | epoch") == 2
    assert out.count("layer  kind") == 2 and out.count("median transfer error") == 2
    assert out.count("test accuracy") == 2
    assert ("K=5: the gradient on 96 training images under random one-pixel shifts (3 batches "
            "of 32), the curvatures on the first 64") in out
    for name in ("run.json", "report.json", "report.csv", "plots/transfer.png"):
        assert str(out_dir / name) in out  # the files are named at the end


def test_demo_spectral_newton_auto_alpha(tmp_path, capsys):
    args = ["demo", "--epochs", "1", "--optimizer", "spectral-newton", "--out", str(tmp_path),
            "--no-plots", *_TINY, "--samples", "32"]  # one analysis batch: no curvature split
    assert main(args) == 0
    report = load_reports(tmp_path / "run.json")[0]
    assert report.epoch == 0
    assert report.meta["batch_size"] == 32 and report.meta.get("curvature_samples") in (None, 32)
    assert "spectral-newton" in capsys.readouterr().out
    assert not (tmp_path / "plots").exists()


def test_report_command(demo_dir, tmp_path, capsys):
    csv_path, plot_dir = tmp_path / "r.csv", tmp_path / "plots"
    assert main(["report", str(demo_dir / "run.json"), "--all", "--csv", str(csv_path),
                 "--plot", str(plot_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("curvlens report | epoch") == 2
    for name in ("conv1", "conv2", "fc", "head"):
        assert f"\n{name} " in out
    assert csv_path.is_file() and len((plot_dir / "transfer.png").read_bytes()) > 1000
    assert main(["report", str(demo_dir / "report.json")]) == 0
    assert capsys.readouterr().out.count("curvlens report | epoch 1") == 1


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no report file" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert main(["report", str(tmp_path / "x.json")]) == 2
    assert "not a curvlens report" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert main(["demo", "--optimizer", "sgd"]) == 2
    assert main(["demo", "--samples", "0"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_reproduce_teacher(tmp_path, capsys):
    args = ["reproduce", "--tasks", "teacher", "--scale", "0.1", "--fixed-batch", "64",
            "--top-k", "8", "--bootstrap", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "median transfer error" in out and "alpha by layer type" in out
    reports = load_reports(tmp_path / "reproduce.json")
    assert [r.meta["task"] for r in reports] == ["teacher"]
    assert list(reports[0].layers) == ["fc1", "fc2", "head"]
    assert main(["reproduce", "--tasks", "nope"]) == 2


@pytest.mark.slow
def test_reproduce_all_tasks_tiny(tmp_path, capsys):
    args = ["reproduce", "--scale", "0.05", "--fixed-batch", "64", "--top-k", "6",
            "--bootstrap", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for task in ("digits-cnn", "digits-mlp", "chars", "teacher"):
        assert f"\n{task} " in out
    assert "embedding" in out and "conv" in out


def test_demo_analysis_data_is_shifted_training_images():
    import torch
    import torch.nn.functional as F

    from curvlens._demo import _analysis_data

    x = torch.rand(7, 1, 8, 8)
    y = torch.arange(7)
    batches = _analysis_data(x, y, 30, 8, torch.Generator().manual_seed(0))
    assert [len(b[1]) for b in batches] == [8, 8, 8, 6]
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(torch.bincount(ys, minlength=7).tolist()) == [4] * 5 + [5] * 2  # 30 = 7 x 4 + 2
    pad = F.pad(x, (1, 1, 1, 1))
    moved = torch.stack([pad[..., i:i + 8, j:j + 8] for i in range(3) for j in range(3)], 1)
    for image, label in zip(xs, ys):  # each sample: its label's image moved by one pixel or not
        assert (moved[label] == image).all(-1).all(-1).all(-1).any()
    assert not all(torch.equal(image, x[label]) for image, label in zip(xs, ys))
