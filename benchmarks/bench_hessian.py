"""Top-5 Hessian eigenvalues: curvlens Lanczos vs PyHessian and curvlinops + scipy ``eigsh``.

On one small CNN (scikit-learn digits, 8x8 images, a few training steps from a seeded init) and
one fixed batch, in float32 on the CPU, each method computes the top-5 eigenvalues of

(a) the whole Hessian (all parameters) and (b) the Hessian block of one layer (``conv2``'s weight;
    the other parameters are frozen for the anchors, which is what a user of them would do),

at a requested relative accuracy of 1e-4. For each: wall time (best of ``--repeats``), the number
of Hessian-vector products (HVPs) and the largest relative error against a float64 reference
(curvlens Lanczos at tol 1e-12 on a float64 copy of the model). Methods:

* ``curvlens``: :func:`curvlens.hessian_spectrum.model_eigenvalues` / ``block_eigenvalues`` with
  ``tol=1e-4`` (each wanted Ritz value's estimated error ``min(r, r^2 / gap)`` at most
  ``1e-4 |theta|``, ``r`` its residual).
* ``pyhessian``: ``pyhessian.hessian(...).eigenvalues(top_n=5, tol=...)``, deflated power
  iteration, run at its default tol 1e-3 and at tol 1e-4 (maxIter 100 per eigenvalue, default).
* ``curvlinops``: ``HessianLinearOperator(...).to_scipy()`` + ``scipy.sparse.linalg.eigsh(k=5,
  which="LA", tol=1e-4)`` (ARPACK's implicitly restarted Lanczos).

Also the cost of one HVP relative to one gradient (forward + backward): amortized (one extra
backward through the cached gradient graph, as curvlens's Lanczos uses) and from scratch.

Run: ``python benchmarks/bench_hessian.py [--batch 256] [--repeats 2]``; exits 0. Anchors that
are not installed (``pip install curvlens[bench]``) print ``skipped: <why>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvlens.hessian import GradGraph  # noqa: E402
from curvlens.hessian_spectrum import block_eigenvalues, model_eigenvalues  # noqa: E402

TOP = 5
RTOL = 1e-4
LAYER = "conv2"


class SmallCNN(nn.Module):
    """conv(1->8) - conv(8->16, stride 2) - fc(256->10), ReLU: 3.9k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def setup(batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):  # a partly trained model: a realistic, non-trivial spectrum
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    return model, X[:batch], y[:batch]


@contextlib.contextmanager
def only_trainable(model: nn.Module, keep: list[nn.Parameter] | None) -> Iterator[None]:
    """Freeze every parameter not in ``keep`` (``None``: keep all) for the block anchors."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if keep is not None:
            for p in model.parameters():
                p.requires_grad_(any(p is q for q in keep))
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def count_calls(owner: object, name: str, counter: list[int]) -> Iterator[None]:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_curvlens(model, X, y, block: bool, tol: float = RTOL):
    counter = [0]
    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    with count_calls(GradGraph, "hvp", counter):
        if block:
            vals = block_eigenvalues(model, loss, X, y, LAYER, TOP, tol=tol, generator=gen)
        else:
            vals = model_eigenvalues(model, loss, X, y, TOP, tol=tol, generator=gen)
    return [float(v) for v in vals], counter[0]


def run_pyhessian(model, X, y, block: bool, tol: float):
    import pyhessian

    ph = sys.modules["pyhessian.hessian"]  # the module (the package re-exports the class name)

    counter = [0]
    keep = [getattr(model, LAYER).weight] if block else None
    torch.manual_seed(0)
    with only_trainable(model, keep), count_calls(ph, "hessian_vector_product", counter):
        comp = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        vals, _ = comp.eigenvalues(top_n=TOP, tol=tol)
    model.zero_grad(set_to_none=True)
    return sorted(vals, reverse=True), counter[0]


def run_curvlinops(model, X, y, block: bool, tol: float = RTOL):
    import numpy as np
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [getattr(model, LAYER).weight] if block else [p for p in model.parameters()]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)],
                              check_deterministic=False).to_scipy()
    counter = [0]

    def matvec(x):
        counter[0] += 1
        return H @ x

    op = LinearOperator(H.shape, matvec=matvec, dtype=H.dtype)
    v0 = np.random.default_rng(0).standard_normal(H.shape[0]).astype(H.dtype)
    vals = eigsh(op, k=TOP, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted((float(v) for v in vals), reverse=True), counter[0]


def timed(fn: Callable, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def hvp_over_grad(model, X, y, repeats: int = 30) -> tuple[float, float]:
    """Medians over interleaved repetitions of (amortized HVP, HVP from scratch) / gradient."""
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    graph = GradGraph(model, loss_fn, (X,), y, params, "model")
    fns = (
        lambda: torch.autograd.grad(loss_fn(model(X), y), params),  # one gradient
        lambda: graph.hvp(v),  # one more backward through the cached gradient graph
        lambda: GradGraph(model, loss_fn, (X,), y, params, "model").hvp(v),  # from scratch
    )
    ratios: list[tuple[float, float]] = []
    for rep in range(repeats + 1):
        ts = []
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        if rep:  # the first round warms up
            ratios.append((ts[1] / ts[0], ts[2] / ts[0]))
    return statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # pyhessian's backward
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit notices on imports
    model, X, y = setup(args.batch)
    P = sum(p.numel() for p in model.parameters())
    print(f"SmallCNN on digits, batch {args.batch}, {P} parameters, layer {LAYER!r} "
          f"({getattr(model, LAYER).weight.numel()} weights); float32 CPU, "
          f"{args.threads} thread(s); top-{TOP} at rtol {RTOL:g}\n")

    ref64 = copy.deepcopy(model).double()
    anchors: dict[str, Callable] = {"curvlens": run_curvlens}
    for name, mod, fn in (
        ("pyhessian tol=1e-3 (default)", "pyhessian", lambda m, X, y, b: run_pyhessian(
            m, X, y, b, 1e-3)),
        ("pyhessian tol=1e-4", "pyhessian", lambda m, X, y, b: run_pyhessian(m, X, y, b, 1e-4)),
        ("curvlinops + eigsh", "curvlinops", run_curvlinops),
    ):
        try:
            __import__(mod)
            anchors[name] = fn
        except Exception as err:  # noqa: BLE001 - any import failure means "skip this anchor"
            print(f"{name}: skipped: {type(err).__name__}: {err}")

    for block in (False, True):
        what = f"block H_WW of {LAYER!r}" if block else "whole Hessian"
        ref, _ = run_curvlens(ref64, X.double(), y, block, tol=1e-12)
        print(f"== {what}: reference top-{TOP} (float64) "
              + " ".join(f"{v:.6g}" for v in ref))
        print(f"{'method':<30}{'time [s]':>10}{'HVPs':>7}{'max rel err':>13}"
              f"{'time ratio':>12}{'HVP ratio':>11}")
        rows = {}
        for name, fn in anchors.items():
            try:
                t, (vals, n) = timed(lambda fn=fn, b=block: fn(model, X, y, b), args.repeats)
            except Exception as err:  # noqa: BLE001 - report and go on with the other anchors
                print(f"{name:<30}skipped: {type(err).__name__}: {err}")
                continue
            err = max(abs(a - b) / abs(b) for a, b in zip(vals, ref))
            rows[name] = (t, n, err)
        t0, n0, _ = rows["curvlens"]
        for name, (t, n, err) in rows.items():
            print(f"{name:<30}{t:>10.3f}{n:>7d}{err:>13.2e}{t / t0:>11.2f}x{n / n0:>10.2f}x")
        print("(ratios: anchor / curvlens; > 1 means curvlens is faster / uses fewer HVPs)\n")

    amortized, scratch = hvp_over_grad(model, X, y)
    print(f"one HVP / one gradient: {amortized:.2f} (cached gradient graph), "
          f"{scratch:.2f} (from scratch: forward + double backward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
