"""``curvlens spectra ...``: weight tails of a checkpoint, free decompression of a spectrum.

The lead wires :func:`add_parser` into ``curvlens/cli.py``; :func:`run` executes the parsed args.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curvlens.spectra.free_decompression import free_decompress
from curvlens.spectra.weight_tails import (
    WeightTailStats,
    format_weight_tails,
    model_weight_tails,
    weight_tail_stats,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``spectra`` with its ``weights`` and ``decompress`` subcommands."""
    p = subparsers.add_parser("spectra", help="spectral tools: weight tails, free decompression")
    sub = p.add_subparsers(dest="spectra_cmd", required=True)
    w = sub.add_parser("weights", help="per-layer weight-spectrum tail table of a checkpoint")
    w.add_argument("checkpoint", help="a saved nn.Module or state_dict (torch.save)")
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


def _load_weights(path: str, normalization: str, min_tail: int) -> dict[str, WeightTailStats]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pickled full model needs weights_only=False (trusted files only)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return model_weight_tails(obj, normalization=normalization, min_tail=min_tail)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected an nn.Module or a state_dict, got {type(obj).__name__}")
    out = {}
    for name, t in obj.items():
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and torch.is_floating_point(t) \
                and name.endswith("weight"):
            out[name.removesuffix(".weight")] = weight_tail_stats(
                t, normalization=normalization, min_tail=min_tail, name=name)
    if not out:
        raise ValueError(f"{path}: no floating '*weight' tensors with 2+ dims in the state_dict")
    return out


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``curvlens spectra`` command; returns the exit status."""
    if args.spectra_cmd == "weights":
        res = _load_weights(args.checkpoint, args.normalization, args.min_tail)
        print(format_weight_tails(res))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({k: v.as_dict() for k, v in res.items()},
                                                      indent=2))
        return 0
    if args.spectra_cmd == "decompress":
        path = Path(args.eigs)
        eigs = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
        out = free_decompress(eigs, args.n, deg_z=args.deg_z, deg_m=args.deg_m)
        q = out.quantiles([0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0])
        print(f"n_s={np.size(eigs)} -> n={args.n} (t={out.t:.4f}), curve degrees "
              f"{out.curve.coeffs.shape[0] - 1}x{out.curve.coeffs.shape[1] - 1}, "
              f"mass={out.mass:.4f}")
        print("quantiles 0/1/25/50/75/99/100%: " + " ".join(f"{v:.6g}" for v in q))
        if args.out:
            np.savez(args.out, x=out.x, density=out.density, eigenvalues=out.eigenvalues())
            print(f"wrote {args.out}")
        return 0
    raise ValueError(f"unknown spectra command {args.spectra_cmd!r}")
