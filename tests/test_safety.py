"""Hostile inputs: untrusted checkpoints, damaged files and reports, interrupted writes.

Each test names the behaviour it pins down; the docstrings say why the same test fails on a
curvlens that unpickles refused checkpoints, accepts damaged fields or rewrites file modes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import curvlens._io
from curvlens import report as R
from curvlens._io import atomic_write_text
from curvlens._schema import field_types
from curvlens.analysis import analyze_layer
from curvlens.cli import main
from curvlens.results import LayerReport, Report

_IO_FILE = Path(curvlens._io.__file__)


class _Payload:
    """Pickles as a call to ``open(marker, "w")``: loading it with full unpickling runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line_error(err: str, name: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvlens: error: "), err
    assert name in lines[0], err


# --------------------------------------------------------------------------- checkpoints


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    """A state_dict with one entry whose unpickling would create a file.

    Loading it with ``weights_only=False`` (what the command fell back to when the safe load
    refused a file) would create the marker and print a normal table; it must be refused
    before anything is unpickled, with a one-line error that names the file and shows the
    conversion a user runs on a file they trust.
    """
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.randn(16, 12), "extra": _Payload(marker)}, ckpt)
    assert not marker.exists()
    code, err = _run(["spectra", "weights", str(ckpt)], capsys)
    assert code == 2 and not marker.exists()
    _one_line_error(err, str(ckpt))
    assert "weights_only=False" in err and "state_dict" in err and "trust" in err


@pytest.mark.filterwarnings("ignore:.*power-law fit undefined")
def test_conversion_command_in_the_error_works(tmp_path, capsys):
    """The one-liner in the error turns a pickled module into a state_dict the command reads."""
    ckpt = tmp_path / "net.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Linear(16, 12)), ckpt)
    code, err = _run(["spectra", "weights", str(ckpt)], capsys)
    assert code == 2
    command = err.split('python -c "', 1)[1].rstrip().removesuffix('"')
    exec(command, {})  # what the user runs on a file they trust (here: one this test wrote)
    converted = tmp_path / "net.state_dict.pt"
    assert set(torch.load(converted, weights_only=True)) == {"0.weight", "0.bias", "1.weight",
                                                             "1.bias"}
    assert main(["spectra", "weights", str(converted)]) == 0
    assert "0" in capsys.readouterr().out


def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"bad-{kind}.bin"
    if kind == "text":
        path.write_text("hello world\nthis is not it\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text('{"a": [1, 2]}')
    elif kind == "truncated":
        good = tmp_path / "good.pt"
        torch.save({"w.weight": torch.randn(8, 8)}, good)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": never created


_KINDS = ["text", "empty", "json", "truncated", "binary", "directory", "missing"]
_COMMANDS = {
    "spectra-weights": lambda p: ["spectra", "weights", str(p)],
    "spectra-decompress": lambda p: ["spectra", "decompress", str(p), "--n", "40"],
    "report": lambda p: ["report", str(p)],
}


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("command", list(_COMMANDS))
def test_every_command_rejects_bad_files_in_one_line(command, kind, tmp_path, capsys):
    """Exit 2 and one stderr line naming the file, for every way a file can be wrong.

    Before, ``spectra weights`` ended in tracebacks (exit 1) on text, empty, JSON, truncated
    files and directories, and a binary report file gave a decode error without its name.
    """
    path = _bad_file(kind, tmp_path)
    code, err = _run(_COMMANDS[command](path), capsys)
    assert code == 2, err
    _one_line_error(err, str(path))


def test_report_csv_into_a_directory(tmp_path, capsys):
    """``report --csv DIR`` (a directory where a file is expected): exit 2, one line."""
    run = tmp_path / "r.json"
    R.to_json(_report(), run)
    (tmp_path / "out").mkdir()
    code, err = _run(["report", str(run), "--csv", str(tmp_path / "out")], capsys)
    assert code == 2
    _one_line_error(err, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []
    code, err = _run(["report", str(run), "--plot", str(run)], capsys)  # a file, not a dir
    assert code == 2
    _one_line_error(err, str(run))


def test_decompress_counts_finite_values(tmp_path, capsys):
    """22 eigenvalues of which 20 finite: the error says 20 finite (it said "got 22")."""
    path = tmp_path / "eigs.npy"
    np.save(path, np.r_[np.linspace(1.0, 2.0, 20), np.nan, np.inf])
    code, err = _run(["spectra", "decompress", str(path), "--n", "40"], capsys)
    assert code == 2
    _one_line_error(err, str(path))
    assert "20 finite" in err and "2 of its 22" in err
    from curvlens.spectra.spectral_curve import fit_spectral_curve

    with pytest.raises(ValueError, match="got 22, of which 20 finite"):
        fit_spectral_curve(np.r_[np.linspace(1.0, 2.0, 20), np.nan, np.inf], 1, 2)


# --------------------------------------------------------------------------- damaged reports


def _report() -> Report:
    k = torch.arange(1, 11, dtype=torch.float64)
    rep = analyze_layer(k ** -1.0, k ** -2.2, name="fc", shape=(12, 10), kind="linear",
                        bootstrap=20)
    return Report(layers={"fc": rep}, epoch=1, step=10, meta={"top_k": 10})


_DAMAGE = [  # (field, bad value, words the error must contain)
    ("shape", [3], "a list of 2 entries"),
    ("shape", [3, -1], ">= 0"),
    ("top_k", 2.7, "an int"),
    ("top_k", 10.0, "an int"),
    ("rank", True, "an int"),
    ("warnings", "abc", "a list"),
    ("notes", [1], "a string"),
    ("alpha", "1.5", "a number"),
    ("alpha", math.inf, "finite"),
    ("alpha_ci", [1.0], "2 entries"),
    ("sigma", ["x"] * 10, "a number"),
    ("sigma", [1.0] * 11, "top_k is 10"),
    ("h", [1.0] * 9, "9 entries"),
    ("rank", 11, "more than top_k"),
    ("kind", "banana", "one of"),
    ("kind", 3, "a string"),
    ("nan_reasons", {"alpha": 3}, "a string"),
    ("nan_reasons", ["alpha"], "an object"),
    ("bic", {"power_law": "low"}, "a number"),
    ("bic_best", "cubic", "one of"),
    ("n_negative_h", -1, ">= 0"),
]


@pytest.mark.parametrize(("name", "value", "words"), _DAMAGE,
                         ids=[f"{n}={v!r}"[:30] for n, v, _ in _DAMAGE])
def test_damaged_field_names_field_and_layer(name, value, words, tmp_path, capsys):
    """Hand-edited fields: ValueError naming the layer and the field; the CLI says it in one line.

    Before, ``shape [3]``, ``top_k 2.7`` and ``warnings "abc"`` were accepted silently and others
    raised TypeError/AttributeError (a traceback, exit 1, from ``curvlens report``).
    """
    data = _report().to_dict()
    data["layers"]["fc"][name] = value
    with pytest.raises(ValueError, match=rf"layer 'fc': field '{name}'.*{words}"):
        Report.from_dict(data)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    code, err = _run(["report", str(path)], capsys)
    assert code == 2
    _one_line_error(err, str(path))
    assert f"field '{name}'" in err and "'fc'" in err


def test_every_layer_field_is_checked():
    """Generic: a value of the wrong JSON type in any LayerReport field (today's and those added
    later) is rejected with the field's name."""
    for name, tp in field_types(LayerReport).items():
        wrong = "not-a-number" if tp in (int, float) else (
            [[1]] if tp is str else {"x": object()} if tp is list else 3.5)
        data = _report().to_dict()
        data["layers"]["fc"][name] = wrong
        with pytest.raises(ValueError, match=f"field '{name}'"):
            Report.from_dict(data)


@pytest.mark.parametrize(("patch", "words"), [
    ({"version": 99}, "newer"),
    ({"version": "1"}, "'version' must be an int"),
    ({"version": True}, "'version' must be an int"),
    ({"version": None}, "'version' must be an int"),
    ({"format": "other"}, "not a curvlens report"),
    ({"epoch": "3"}, "'epoch'"),
    ({"step": 1.5}, "'step'"),
    ({"meta": []}, "'meta'"),
    ({"layers": []}, "'layers'"),
    ({"layers": {"fc": "x"}}, "'fc'"),
])
def test_report_level_fields_and_version(patch, words):
    data = {**_report().to_dict(), **patch}
    with pytest.raises(ValueError, match=words):
        Report.from_dict(data)


def test_run_file_version_and_reports_checked(tmp_path):
    """The run-level format version was never checked; a run's reports must be a list."""
    path = R.save_reports([_report()], tmp_path / "run.json")
    data = json.loads(path.read_text())
    for patch, words in [({"version": 7}, "newer"), ({"version": 0}, "'version'"),
                         ({"reports": {"a": 1}}, "'reports' must be a list")]:
        path.write_text(json.dumps({**data, **patch}))
        with pytest.raises(ValueError, match=words):
            R.load_reports(path)
    data["reports"][0]["layers"]["fc"]["top_k"] = 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"reports\[0\].*'fc'.*'top_k'"):
        R.load_reports(path)


def test_valid_reports_still_round_trip(tmp_path):
    """NaN, None-as-NaN and unbounded interval ends stay readable."""
    rep = _report()
    rep.layers["fc"].alpha_ci = (-math.inf, 2.0)
    back = R.from_json(R.to_json(rep, tmp_path / "r.json"))
    assert back.layers["fc"].alpha_ci == (-math.inf, 2.0)
    assert back.layers["fc"].shape == (12, 10) and back.layers["fc"].top_k == 10


# --------------------------------------------------------------------------- file writes


def test_existing_file_keeps_its_mode(tmp_path):
    """An existing 0644 file stays 0644 (the temporary file's 0600 used to replace it)."""
    path = tmp_path / "r.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    R.to_json(_report(), path)
    assert (path.stat().st_mode & 0o777) == 0o644
    os.chmod(path, 0o640)
    R.to_csv(_report(), path)
    assert (path.stat().st_mode & 0o777) == 0o640


def test_new_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o664


def test_symlink_is_followed(tmp_path):
    """Writing through a symbolic link replaces the target and keeps the link."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "report.json"
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    R.to_json(_report(), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert R.from_json(target).epoch == 1
    assert sorted(os.listdir(tmp_path / "real")) == ["report.json"]


def test_keyboard_interrupt_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    R.to_json(_report(), path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.to_json(_report(), path)
    assert os.listdir(tmp_path) == ["r.json"] and path.read_bytes() == before


def test_failing_writer_leaves_the_old_file(tmp_path):
    """A writer that fails half-way (a plot that cannot render, an archive that cannot be built)
    leaves the old file byte for byte and no temporary file."""
    path = tmp_path / "plot.png"
    path.write_bytes(b"old plot")

    def half(fh):
        fh.write(b"new bytes, then")
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        curvlens._io.atomic_write(path, half)
    assert os.listdir(tmp_path) == ["plot.png"] and path.read_bytes() == b"old plot"


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    """Report plots go through the atomic writer: a figure that fails while being saved leaves the
    previous PNG as it was; a good one replaces it with a real PNG."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    rep = _report()
    paths = R.plot(rep, tmp_path)
    assert paths and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    before = {p: p.read_bytes() for p in paths}

    def broken(self, fh, **kwargs):
        fh.write(b"partial")
        raise ValueError("cannot render")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(ValueError, match="cannot render"):
        R.plot(rep, tmp_path)
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)


def test_decompress_out_is_atomic_and_named_as_written(tmp_path, capsys, monkeypatch):
    """``spectra decompress --out`` without a suffix writes ``.npz`` (as numpy names it) and says
    so; an archive that fails to build leaves the old one."""
    eigs = tmp_path / "e.npy"
    np.save(eigs, np.linalg.eigvalsh(np.cov(np.random.default_rng(0).standard_normal((50, 200)))))
    argv = ["spectra", "decompress", str(eigs), "--n", "100", "--deg-z", "1", "--deg-m", "2",
            "--out"]
    assert main([*argv, str(tmp_path / "d")]) == 0
    written = tmp_path / "d.npz"
    assert f"wrote {written}" in capsys.readouterr().out
    before = written.read_bytes()
    assert np.load(written)["eigenvalues"].shape == (100,)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    code, err = _run([*argv, str(written)], capsys)
    assert code == 2
    _one_line_error(err, "disk full")
    assert written.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.npz", "e.npy"]


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """SIGTERM while a report is being written: no hidden ``.tmp`` file is left, the old file
    is intact, and the process still ends by SIGTERM (before, the temporary file stayed)."""
    path = tmp_path / "r.json"
    path.write_text("old")
    script = textwrap.dedent(f"""
        import importlib.util, os, time
        spec = importlib.util.spec_from_file_location("io_under_test", {str(_IO_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the module alone: no torch import, a fast start
        atomic_write_text = module.atomic_write_text
        def slow_fsync(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = slow_fsync
        atomic_write_text({str(path)!r}, "new" * 100000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # mid-write
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(tmp_path) == ["r.json"] and path.read_text() == "old"


# --------------------------------------------------------------------------- the lens


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(steps)]


_OVERFLOW = {2, 5}


def _scaler_run(unscale: bool):
    """8 steps under a GradScaler; on steps 2 and 5 the scaled loss overflows float32."""
    from curvlens.lens import CurvatureLens

    model, loss_fn = _mlp(), torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)
    lens = CurvatureLens(model, loss_fn, top_k=4, every=1, grad_scaler=scaler)
    scales = []
    with lens:
        for t, (x, y) in enumerate(_batches(8)):
            loss = loss_fn(model(x), y) * (1e36 if t in _OVERFLOW else 1.0)
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            lens.step()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return lens, scales


def _fp32_run():
    """The same training in plain float32, without the overflow steps (the scaler skips them)."""
    from curvlens.lens import CurvatureLens

    model, loss_fn = _mlp(), torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lens = CurvatureLens(model, loss_fn, top_k=4, every=1)
    with lens:
        for t, (x, y) in enumerate(_batches(8)):
            if t in _OVERFLOW:
                continue
            loss_fn(model(x), y).backward()
            lens.step()
            opt.step()
            opt.zero_grad()
    return lens


@pytest.mark.parametrize("unscale", [False, True], ids=["scaled-grads", "unscale_"])
def test_grad_scaler_loop_records_unscaled_and_skips_overflow(unscale):
    """A GradScaler loop with two forced overflows runs to the end; what the lens recorded on
    the other steps equals a float32 run's, in the units of the unscaled loss.

    Before, the first overflow step raised from ``lens.step()`` (and ``CurvatureLens`` took no
    scaler), the running ``C_delta`` was ``scale^2`` too large and, without ``unscale_``, the
    spectra ``scale`` too large.
    """
    lens, scales = _scaler_run(unscale)
    ref = _fp32_run()
    assert len(set(scales)) == 2  # the scale moved down (overflows) and up (growth)
    assert lens.num_steps == 8 and lens._recorder.skipped_steps == 2
    assert lens._meta()["skipped_overflow_steps"] == 2
    for name in ref.layers:
        got = list(lens.gradient_spectra[name])
        want = list(ref.gradient_spectra[name])
        assert [s for s, _ in got] == [t for t in range(8) if t not in _OVERFLOW]
        for (_, a), (_, b) in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=0)
    running, want = lens.running_factors(), ref.running_factors()
    for name, f in want.items():
        torch.testing.assert_close(running[name].C_A, f.C_A, rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(running[name].C_delta, f.C_delta, rtol=1e-3, atol=1e-7)
        assert running[name].num_samples == f.num_samples == 6 * 32


@pytest.mark.parametrize("order", ["after-step", "after-update"])
def test_grad_scaler_wrong_order_is_detected(order):
    """``lens.step()`` after ``scaler.step`` or after ``scaler.update``: a RuntimeError that
    gives the right order, nothing recorded."""
    from curvlens.lens import CurvatureLens

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    lens = CurvatureLens(model, torch.nn.CrossEntropyLoss(), top_k=4, every=1,
                         grad_scaler=scaler)
    batches = _batches(3)
    with lens:
        _scaled_step(model, lens, scaler, opt, *batches[0], order)  # wrong on the first step
    with lens:
        _scaled_step(model, lens, scaler, opt, *batches[1], "right")  # and after a right one
        _scaled_step(model, lens, scaler, opt, *batches[2], order)
    assert [len(s) for s in lens.gradient_spectra.values()] == [1, 1]


def _scaled_step(model, lens, scaler, opt, x, y, order: str) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if order == "right":
        lens.step()
    scaler.step(opt)
    if order == "after-step":
        with pytest.raises(RuntimeError, match="after scaler.step"):
            lens.step()
    scaler.update()
    if order == "after-update":
        with pytest.raises(RuntimeError, match=r"scaler.update\(\) ran too early"):
            lens.step()
    opt.zero_grad()


def test_overflow_without_the_scaler_says_to_pass_it():
    from curvlens.lens import CurvatureLens

    model = _mlp()
    lens = CurvatureLens(model, torch.nn.CrossEntropyLoss(), top_k=4, every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    (x, y), = _batches(1)
    with lens:
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * 1e36).backward()
        with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
            lens.step()


def test_gradient_spectra_history_is_bounded_and_standalone():
    """``spectra_history`` entries per layer, each a standalone ``[k]`` tensor.

    Before, the history grew by one entry per recorded step without bound, and each entry was
    a view keeping the whole ``svdvals`` output (``min(m, n)`` values) alive.
    """
    from curvlens.lens import CurvatureLens

    model, loss_fn = _mlp(), torch.nn.CrossEntropyLoss()
    lens = CurvatureLens(model, loss_fn, top_k=2, every=1, spectra_history=3,
                         kronecker="none")

    def held_bytes() -> int:
        return sum(t.untyped_storage().nbytes() for records in lens.gradient_spectra.values()
                   for _, t in records)

    sizes = []
    with lens:
        for x, y in _batches(12):
            loss_fn(model(x), y).backward()
            lens.step()
            model.zero_grad()
            sizes.append(held_bytes())
    assert sizes[2] == sizes[-1] == 2 * 3 * 2 * 4  # layers x history x k x float32
    for records in lens.gradient_spectra.values():
        assert [s for s, _ in records] == [9, 10, 11]
        assert all(t._base is None and t.numel() == 2 for _, t in records)
    with pytest.raises(ValueError, match="spectra_history"):
        CurvatureLens(model, loss_fn, spectra_history=0)
    with pytest.raises(TypeError, match="GradScaler"):
        CurvatureLens(model, loss_fn, grad_scaler=object())


def test_overflowing_running_factor_is_refused_and_not_stored():
    """Output gradients so large that ``sum g g^T`` overflows float32: a warning naming the layer
    and the overflow, the layer is no longer recorded, and nothing of that step is stored; the
    training loop goes on.

    Before, the running ``C_delta`` silently became ``inf``.
    """
    from curvlens.lens import CurvatureLens

    model = _mlp()

    def loss_fn(out, y):
        return 1e22 * torch.nn.functional.cross_entropy(out, y)

    lens = CurvatureLens(model, loss_fn, top_k=4, every=1)
    (x, y), (x2, y2) = _batches(2)
    with lens:
        (loss_fn(model(x), y) / 1e22).backward()  # a normal step first
        lens.step()
        model.zero_grad()
        loss_fn(model(x2), y2).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        with pytest.warns(RuntimeWarning, match=r"layer '\d'.*C_delta would overflow"):
            lens.step()
    assert set(lens.skipped_layers) == {"0", "2"}
    assert all("overflow" in why for why in lens.skipped_layers.values())
    assert all(len(s) == 1 for s in lens.gradient_spectra.values())
    assert lens.running_factors() == {}  # dropped, never inf


def test_loss_of_shape_one_is_a_scalar_everywhere():
    """A loss of shape [1] is accepted as the scalar it holds by every stage of the analysis
    (before, the gradient stage accepted it and the Kronecker stage refused it); a loss with
    two values is refused at the first stage with the shape named."""
    from curvlens import analyze_model

    model = _mlp().double()
    (x, y), = _batches(1)
    x = x.double()
    ce = torch.nn.CrossEntropyLoss()
    options = {"top_k": 4, "lanczos_k": 2, "bootstrap": 0}
    want = analyze_model(model, ce, x, y, **options)
    got = analyze_model(model, lambda o, t: ce(o, t).reshape(1), x, y, **options)
    for name, rep in want.layers.items():
        for field in ("sigma", "h", "h_kron", "lambda_top"):
            np.testing.assert_allclose(getattr(got.layers[name], field), getattr(rep, field),
                                       rtol=1e-10)
    with pytest.raises(ValueError, match=r"scalar.*\(2,\)"):
        analyze_model(model, lambda o, t: ce(o, t).repeat(2), x, y, **options)
