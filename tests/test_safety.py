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
