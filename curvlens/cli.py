"""The ``curvlens`` command (also ``python -m curvlens``).

Subcommands:

* ``curvlens demo``: train a small CNN on scikit-learn's digits with the lens attached, print the
  per-layer report after each epoch, write JSON, CSV and PNGs;
* ``curvlens report RUN.json``: render a saved report or run (table, optional plots and CSV);
* ``curvlens reproduce``: the paper-style table across several architectures and data sets;
* ``curvlens spectra ...``: the spectral tools of :mod:`curvlens.spectra`, when available.

The measurements are those of Calvo (2026), arXiv:2606.02596.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _spectra_cli():
    try:
        return importlib.import_module("curvlens.spectra._cli")
    except ImportError:
        return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlens`` command."""
    parser = argparse.ArgumentParser(
        prog="curvlens",
        description="Layer-by-layer curvature of neural networks while they train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train a digits CNN with the lens attached",
                          description="Train a small CNN on scikit-learn's digits with "
                          "CurvatureLens attached; print the per-layer report every epoch and "
                          "write JSON, CSV and PNG figures.")
    demo.add_argument("--epochs", type=_positive_int, default=5)
    demo.add_argument("--optimizer", choices=["adamw", "spectral-newton"], default="adamw")
    demo.add_argument("--out", default="curvlens-out", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lr", type=float, default=None,
                      help="learning rate (default 3e-3 AdamW, 0.03 Spectral Newton)")
    demo.add_argument("--batch-size", type=_positive_int, default=64)
    demo.add_argument("--samples", type=_positive_int, default=16384,
                      help="analysis samples: training images under random one-pixel shifts "
                      "(the gradient and the noise floor use all of them)")
    demo.add_argument("--fixed-batch", type=_positive_int, default=256,
                      help="samples per analysis batch")
    demo.add_argument("--curvature-batches", type=_positive_int, default=2,
                      help="the curvatures are measured on the first this many analysis batches")
    demo.add_argument("--top-k", type=_positive_int, default=10)
    demo.add_argument("--lanczos-k", type=_nonneg_int, default=20,
                      help="Hessian-block eigenvalues per layer (0 skips Lanczos)")
    demo.add_argument("--bootstrap", type=_nonneg_int, default=500)
    demo.add_argument("--every", type=_positive_int, default=10,
                      help="lens.step() records every this many steps")
    demo.add_argument("--max-train", type=_positive_int, default=None,
                      help="use only this many training images (quick runs)")
    demo.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser("report", help="render a saved report or run",
                         description="Print the per-layer table of a report or run JSON file "
                         "(every epoch with --all), optionally write plots and CSV.")
    rep.add_argument("path", metavar="RUN.json")
    rep.add_argument("--plot", metavar="DIR", default=None, help="write PNG figures here")
    rep.add_argument("--csv", metavar="FILE", default=None, help="write a CSV file here")
    rep.add_argument("--all", action="store_true", help="print every report of a run")

    repro = sub.add_parser("reproduce", help="the paper-style table across architectures",
                           description="Train a digits CNN, a digits MLP, a character-level "
                           "transformer on Python's standard library and a synthetic teacher "
                           "task briefly, then print per-layer alpha, gamma, s, alpha*gamma, "
                           "the error, alpha by layer type and the median transfer error. "
                           "--full runs the paper-style suite (CNN, ResNet, ViT, GPT-style LM, "
                           "MLPs on digits, the standard library's text and a synthetic "
                           "teacher; 96 layers, the gradient on 3e4-5e5 samples per task and the "
                           "curvatures on its first 1024-4096; measured: 11 minutes on 2 "
                           "shared CPU cores) and prints "
                           "the published numbers beside the measured ones, with 95%% "
                           "intervals and trust flags.")
    repro.add_argument("--full", action="store_true",
                       help="the full paper-style suite (96 layers, 11 min measured on 2 "
                       "CPU cores)")
    repro.add_argument("--tasks", default=None,
                       help="comma-separated subset of the tasks (default: all of the suite)")
    repro.add_argument("--scale", type=float, default=1.0,
                       help="multiply the training steps (longer runs: 5, 10, ...)")
    repro.add_argument("--seed", type=int, default=0)
    repro.add_argument("--fixed-batch", type=_positive_int, default=None,
                       help="samples measured per task (default 256; with --full the "
                       "gradient's 32768 to 524288 per task, given as batches, the curvatures "
                       "on at most 1024 to 4096 of them)")
    repro.add_argument("--top-k", type=_positive_int, default=None,
                       help="fit window K (default 20; 10 with --full, where the paper used 20)")
    repro.add_argument("--lanczos-k", type=_nonneg_int, default=None,
                       help="Lanczos eigenvalues per layer for the independent s and the "
                       "alignment score (default 0; 8 with --full)")
    repro.add_argument("--bootstrap", type=_nonneg_int, default=200)
    repro.add_argument("--out", default=None,
                       help="write reproduce.json, reproduce.txt (and with --full "
                       "reproduce.png) into this directory")
    repro.add_argument("--no-progress", action="store_true", help="no progress bar")

    spectra = _spectra_cli()
    if spectra is not None and hasattr(spectra, "add_parser"):
        spectra.add_parser(sub)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from curvlens._demo import run_demo

    run_demo(epochs=args.epochs, optimizer=args.optimizer, out=args.out, seed=args.seed,
             batch_size=args.batch_size, samples=args.samples, fixed_batch=args.fixed_batch,
             curvature_batches=args.curvature_batches, top_k=args.top_k,
             lanczos_k=args.lanczos_k, bootstrap=args.bootstrap, every=args.every, lr=args.lr,
             plots=not args.no_plots, progress=not args.no_progress, max_train=args.max_train)
    return 0


def _report(args: argparse.Namespace) -> int:
    from curvlens.report import load_reports, plot, table, to_csv

    reports = load_reports(args.path)
    if not reports:
        raise ValueError(f"{args.path!r} holds no reports")
    for report in reports if args.all else reports[-1:]:
        print(table(report))
        print()
    if args.csv:
        print(f"wrote {to_csv(reports, args.csv)}")
    if args.plot:
        for path in plot(reports[-1], args.plot, history=reports):
            print(f"wrote {path}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from curvlens._reproduce import run_reproduce

    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",")
                                             if t.strip()]
    run_reproduce(tasks=tasks, full=args.full, scale=args.scale, seed=args.seed,
                  fixed_batch=args.fixed_batch, top_k=args.top_k, lanczos_k=args.lanczos_k,
                  bootstrap=args.bootstrap, out=args.out,
                  progress=False if args.no_progress else None)
    return 0


_COMMANDS = {"demo": _demo, "report": _report, "reproduce": _reproduce}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvlens`` command; returns the exit status.

    Bad input (a missing, unreadable, damaged or wrong file, a directory where a file is
    expected, a path that cannot be written, a bad option value) prints one line
    ``curvlens: error: ...`` naming the file to stderr and returns 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return int(exit_.code or 0)
    command = _COMMANDS.get(args.command)
    if command is None:
        spectra = _spectra_cli()
        command = spectra.run
    try:
        return int(command(args) or 0)
    except (OSError, ValueError, ImportError) as err:  # bad files, paths and values
        print(f"curvlens: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvlens: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an OSError without a file name gets its class)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename!r}" + (
            f" -> {err.filename2!r}" if err.filename2 is not None else "")
    return text or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
