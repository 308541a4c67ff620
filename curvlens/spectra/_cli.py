"""``curvlens spectra ...``: weight tails of a checkpoint, free decompression of a spectrum.

The lead wires :func:`add_parser` into ``curvlens/cli.py``; :func:`run` executes the parsed args.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlens._io import atomic_write, atomic_write_text, read_text
from curvlens.spectra.free_decompression import free_decompress
from curvlens.spectra.weight_tails import (
    WeightTailStats,
    format_weight_tails,
    weight_tail_stats,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``spectra`` with its ``weights`` and ``decompress`` subcommands."""
    p = subparsers.add_parser("spectra", help="spectral tools: weight tails, free decompression")
    sub = p.add_subparsers(dest="spectra_cmd", required=True)
    w = sub.add_parser("weights", help="per-layer weight-spectrum tail table of a checkpoint")
    w.add_argument("checkpoint", help="a state_dict saved by torch.save (loaded with "
                   "weights_only=True; pickled modules are refused)")
    w.add_argument("--normalization", choices=["raw", "ww"], default="raw")
    w.add_argument("--min-tail", type=int, default=10)
    w.add_argument("--json", dest="json_out", help="also write the table as JSON here")
    d = sub.add_parser("decompress", help="predict the spectrum of a larger matrix (n x n)")
    d.add_argument("eigs", help=".npy / .txt file of a submatrix's eigenvalues")
    d.add_argument("--n", type=int, required=True, help="size of the full matrix")
    d.add_argument("--deg-z", type=int, default=None)
    d.add_argument("--deg-m", type=int, default=None)
    d.add_argument("--out", help="write x, density and predicted eigenvalues to this .npz")
    p.set_defaults(func=run)
    return p


def load_checkpoint(path: str | Path) -> Any:
    """The contents of a ``torch.save`` file, loaded with ``torch.load(weights_only=True)`` only.

    Nothing else is ever tried: a file that holds arbitrary pickled objects (a whole
    ``nn.Module``, custom classes) could run code while it is unpickled, so it is refused with
    the command that turns a trusted file into a plain state_dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, not a torch checkpoint, or a checkpoint the safe loader
            refuses; one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global: GLOBAL )?[^\s]+", str(err))
        if found is None or found.group(1) is None:  # garbage, not a refused object
            detail = found.group(0) if found is not None else _first_line(err)
            raise ValueError(f"{str(path)!r} is not a torch checkpoint ({detail})") from None
        out = path.with_name(f"{path.stem}.state_dict.pt")
        code = (f"import torch; o = torch.load({str(path)!r}, weights_only=False); "
                "o = o.state_dict() if hasattr(o, 'state_dict') else o.get('state_dict', o); "
                "torch.save({k: v for k, v in o.items() if isinstance(v, torch.Tensor)}, "
                f"{str(out)!r})")
        raise ValueError(
            f"{str(path)!r} holds pickled Python objects besides tensors, which curvlens never "
            "loads (unpickling can run code); if you trust the file, convert it to a plain "
            f'state_dict yourself and pass {str(out)!r}: python -c "{code}"'
        ) from None
    except Exception as err:  # torch raises many types on garbage: name the file, one line
        raise ValueError(f"{str(path)!r} is not a torch checkpoint "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip()[:200] if lines else "no details"


def _load_weights(path: str, normalization: str, min_tail: int) -> dict[str, WeightTailStats]:
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r}: expected a state_dict, got {type(obj).__name__}")
    out = {}
    for name, t in obj.items():
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and torch.is_floating_point(t) \
                and name.endswith("weight"):
            out[name.removesuffix(".weight")] = weight_tail_stats(
                t, normalization=normalization, min_tail=min_tail, name=name)
    if not out:
        raise ValueError(f"{path!r}: no floating '*weight' tensors with 2+ dims in the "
                         "state_dict")
    return out


def _load_eigenvalues(name: str) -> np.ndarray:
    """A 1-D float array from a ``.npy`` file (never a pickle) or a text file; one-line errors."""
    path = Path(name)
    try:
        if path.suffix == ".npy":
            if not path.is_file():
                read_text(path, "eigenvalue file")  # raises the missing / directory error
            eigs = np.load(path, allow_pickle=False)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # numpy only warns on a file without numbers
                eigs = np.loadtxt(io.StringIO(read_text(path, "eigenvalue file")), ndmin=1)
        eigs = np.asarray(eigs, dtype=np.float64)
    except (FileNotFoundError, ValueError) as err:
        if str(name) in str(err):
            raise
        raise ValueError(f"{name!r} is not a list of numbers ({_first_line(err)})") from None
    except Exception as err:
        raise ValueError(f"{name!r} is not a list of numbers "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    if eigs.ndim != 1:
        raise ValueError(f"{name!r}: expected a 1-D array of eigenvalues, got shape "
                         f"{eigs.shape}")
    finite = int(np.isfinite(eigs).sum())
    if finite < eigs.size:
        raise ValueError(f"{name!r}: {eigs.size - finite} of its {eigs.size} eigenvalues are "
                         f"NaN or Inf ({finite} finite); remove them first")
    return eigs


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``curvlens spectra`` command; returns the exit status."""
    if args.spectra_cmd == "weights":
        res = _load_weights(args.checkpoint, args.normalization, args.min_tail)
        print(format_weight_tails(res))
        if args.json_out:
            atomic_write_text(args.json_out,
                              json.dumps({k: v.as_dict() for k, v in res.items()}, indent=2))
        return 0
    if args.spectra_cmd == "decompress":
        eigs = _load_eigenvalues(args.eigs)
        out = free_decompress(eigs, args.n, deg_z=args.deg_z, deg_m=args.deg_m)
        q = out.quantiles([0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0])
        print(f"n_s={np.size(eigs)} -> n={args.n} (t={out.t:.4f}), curve degrees "
              f"{out.curve.coeffs.shape[0] - 1}x{out.curve.coeffs.shape[1] - 1}, "
              f"mass={out.mass:.4f}")
        print("quantiles 0/1/25/50/75/99/100%: " + " ".join(f"{v:.6g}" for v in q))
        if args.out:
            path = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as np.savez
            atomic_write(path, lambda fh: np.savez(fh, x=out.x, density=out.density,
                                                   eigenvalues=out.eigenvalues()))
            print(f"wrote {path}")
        return 0
    raise ValueError(f"unknown spectra command {args.spectra_cmd!r}")
