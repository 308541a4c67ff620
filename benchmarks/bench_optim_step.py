"""Optimizer step time: SpectralNewton vs torch.optim.Muon vs AdamW, big matrices and a small GPT.

What is compared (CPU, one thread, float32 parameters, interleaved paired rounds: every round times
one step of each method in a rotating order; the ratio is the median over rounds of the per-round
ratio to Muon):

* ``muon``: ``torch.optim.Muon`` as shipped: five Newton-Schulz iterations in bfloat16, which
  approximate ``U V^T`` only loosely (its singular values land in about ``[0.7, 1.2]``; the
  relative Frobenius error against the exact ``U V^T`` is printed).
* ``muon_f32``: the same five iterations in float32 (faster than bfloat16 on a CPU without fast
  bfloat16 matrix products; 2.5 times slower on the machine of the committed results).
* ``sn``: ``SpectralNewton`` at its default policy (alpha 2: one Cholesky factorization of the
  smaller Gram matrix, relative damping, RMS rule). ``sn_eigh``: alpha 1.5 (``eigh`` of the Gram
  matrix), what a measured non-integer exponent costs.
* ``adamw``: ``torch.optim.AdamW`` (foreach).

Accuracy: each SpectralNewton kernel's relative Frobenius error against the SVD formula in
float64 on the benchmark's own gradient matrix (the same float32 input; one float64 SVD serves
alpha 2 and 1.5 and the exact ``U V^T``). The timed run measures it up to 768 x 3072;
``--accuracy-only`` measures it at every size, 4096 x 4096 included, without timing (the float64
SVD of that matrix and the two float32 kernels take minutes on one thread; Muon's bf16 iteration
is left out there) and writes ``bench_optim_step_accuracy.{json,log}``.

The GPT: ``curvlens._tasks.CharTransformer`` with width 256, 4 blocks, 4 heads, context 64 (about
3.2M parameters), gradients of one batch; Muon and SpectralNewton route parameters the same way
(``split_parameters``), AdamW for the rest.

Usage: ``python benchmarks/bench_optim_step.py [--quick] [--out DIR]``; writes
``bench_optim_step.{json,log}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_optim import MuonWithAdamW  # noqa: E402
from curvlens._tasks import CharTransformer, lm_loss  # noqa: E402
from curvlens.optim import SpectralNewton, spectral_update  # noqa: E402

SIZES = {"768x768": (768, 768, 7), "768x3072": (768, 3072, 5), "4096x4096": (4096, 4096, 2)}
NS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's coefficients


def _ns_f32(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalization, in float32."""
    a, b, c = NS
    X = G.float()
    tall = X.shape[0] > X.shape[1]
    X = X.mT if tall else X
    X = X / X.norm().clamp_min(1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class _MuonF32(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, its lr adjustment) with float32 iterations."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 0.05)
                upd = _ns_f32(p.grad.lerp(buf, 0.95))
                m, n = p.shape
                p.add_(upd, alpha=-group["lr"] * math.sqrt(max(1.0, m / n)))


def _rounds(steps: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _ratios(times: dict[str, list[float]], base: str = "muon") -> dict[str, float]:
    return {k: statistics.median(a / b for a, b in zip(v, times[base])) for k, v in times.items()}


def _gradient(m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=g) * torch.logspace(0, -2, n)  # decaying column scales


def accuracy_case(grad: torch.Tensor, muon: bool = True) -> dict[str, float]:
    """Relative Frobenius errors against the SVD formula (one float64 SVD of ``grad``)."""
    U, S, Vh = torch.linalg.svd(grad.double(), full_matrices=False)
    x = S / S[0]
    err = {}
    for name, alpha in (("sn", 2.0), ("sn_eigh", 1.5)):
        ref = (U * (x / (x**alpha + 0.01))) @ Vh  # relative damping delta = 0.01
        out = spectral_update(grad, alpha=alpha, damping=0.01, damping_mode="relative")
        err[name] = float((out.double() - ref).norm() / ref.norm())
    polar = U @ Vh
    if muon:
        bf16 = torch.optim._muon._zeropower_via_newtonschulz(grad, NS, 5, 1e-7)
        err["muon"] = float((bf16.double() - polar).norm() / polar.norm())
    err["muon_f32"] = float((_ns_f32(grad).double() - polar).norm() / polar.norm())
    return err


def matrix_case(m: int, n: int, rounds: int, accuracy: bool, log=print) -> dict:
    grad = _gradient(m, n)
    params = {k: nn.Parameter(torch.zeros(m, n)) for k in ("muon", "muon_f32", "sn", "sn_eigh",
                                                             "adamw")}
    for p in params.values():
        p.grad = grad.clone()
    opts = {
        "muon": torch.optim.Muon([params["muon"]], lr=1e-4),
        "muon_f32": _MuonF32([params["muon_f32"]], lr=1e-4),
        "sn": SpectralNewton([("w", params["sn"])], lr=1e-4),
        "sn_eigh": SpectralNewton([("w", params["sn_eigh"])], lr=1e-4, alpha=1.5),
        "adamw": torch.optim.AdamW([params["adamw"]], lr=1e-4),
    }
    times = _rounds({k: o.step for k, o in opts.items()}, rounds)
    row = {"median_s": {k: statistics.median(v) for k, v in times.items()},
           "vs_muon": _ratios(times), "rounds": rounds}
    if accuracy:
        row["rel_error"] = accuracy_case(grad)
    log(f"{m}x{n}: " + "  ".join(f"{k} {row['median_s'][k]:.3f}s ({row['vs_muon'][k]:.2f}x)"
                                  for k in opts)
        + (f"  | rel. error vs exact: {row['rel_error']}" if accuracy else ""), flush=True)
    return row


def gpt_case(rounds: int, log=print) -> dict:
    torch.manual_seed(0)
    models = {k: CharTransformer(96, dim=256, heads=4, layers=4, ctx=64)
              for k in ("muon", "sn", "adamw")}
    state = models["muon"].state_dict()
    x = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(1))
    for model in models.values():
        model.load_state_dict(state)
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    opts = {"muon": MuonWithAdamW(models["muon"], 1e-4, 1e-4),
            "sn": SpectralNewton(models["sn"], lr=1e-4),
            "adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-4)}
    times = _rounds({k: o.step for k, o in opts.items()}, rounds)
    row = {"median_s": {k: statistics.median(v) for k, v in times.items()},
           "vs_muon": _ratios(times), "rounds": rounds,
           "parameters": sum(p.numel() for p in models["sn"].parameters())}
    log("gpt: " + "  ".join(f"{k} {row['median_s'][k]:.3f}s ({row['vs_muon'][k]:.2f}x)"
                            for k in opts), flush=True)
    return row


def accuracy_only(out_dir: str) -> dict:
    """Each size's errors (``--accuracy-only``), with the seconds each took."""
    out, lines = {}, []
    for name, (m, n, _) in SIZES.items():
        t = time.perf_counter()
        out[name] = accuracy_case(_gradient(m, n), muon=max(m, n) <= 3072)
        out[name]["seconds"] = time.perf_counter() - t
        lines.append(f"{name}: rel. error vs the SVD formula (float64): "
                     + "  ".join(f"{k} {v:.2e}" for k, v in out[name].items() if k != "seconds")
                     + f"  ({out[name]['seconds']:.0f}s)")
        print(lines[-1], flush=True)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "bench_optim_step_accuracy")
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(stem + ".log", "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, two rounds (smoke)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--accuracy-only", action="store_true",
                    help="errors against the SVD formula at every size, no timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.accuracy_only:
        return accuracy_only(args.out)
    sizes = {"64x96": (64, 96, 2)} if args.quick else SIZES
    lines: list[str] = []

    def log(msg: str, flush: bool = False) -> None:
        print(msg, flush=True)
        lines.append(msg)

    log("opt.step() seconds (median over paired rounds) and median per-round ratio to "
        "torch.optim.Muon; 1 thread")
    out = {name: matrix_case(m, n, r, accuracy=max(m, n) <= 3072, log=log)
           for name, (m, n, r) in sizes.items()}
    out["gpt"] = gpt_case(2 if args.quick else 5, log=log)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_optim_step" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(stem + ".log", "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
