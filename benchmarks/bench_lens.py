"""Overhead of CurvatureLens on a training epoch of the digits CNN (CPU).

Three loops over the same seeded data, interleaved and repeated (median of the repeats):

* ``plain``: forward, backward, AdamW step;
* ``step-only``: the same inside ``with lens:`` with ``lens.step()`` after every backward
  (gradient spectra and running Kronecker factors every ``--every`` steps; target <= 1.15x);
* ``+analyze``: step-only plus one ``lens.analyze`` of a fixed batch per epoch (the full
  measurement: exact HVPs along the top-K gradient directions, Lanczos, fits).

Usage: ``python benchmarks/bench_lens.py [--epochs N] [--repeats N] [--every N] [--threads N]
[--quick]``. Prints the per-epoch times and the ratios against ``plain``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvlens._tasks import DigitsCNN, digits_data  # noqa: E402
from curvlens.lens import CurvatureLens  # noqa: E402


def epoch_time(mode: str, data, *, epochs: int, every: int, top_k: int, lanczos_k: int,
               bootstrap: int, fixed: int) -> float:
    """Mean seconds per epoch (training plus, for ``+analyze``, one analysis) of one run."""
    torch.manual_seed(0)
    model = DigitsCNN()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lens = CurvatureLens(model, loss_fn, top_k=top_k, every=every, lanczos_k=lanczos_k,
                         analyze_options={"bootstrap": bootstrap})
    g = torch.Generator().manual_seed(1)
    x, y = data.x_train, data.y_train
    x_fixed, y_fixed = x[:fixed], y[:fixed]
    use_lens = mode != "plain"
    start = time.perf_counter()
    if use_lens:
        lens.__enter__()
    try:
        for epoch in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(64):
                loss_fn(model(x[idx]), y[idx]).backward()
                if use_lens:
                    lens.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if mode == "+analyze":
                lens.analyze(x_fixed, y_fixed, epoch=epoch)
    finally:
        lens.close()
    return (time.perf_counter() - start) / epochs


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--lanczos-k", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--fixed-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run (1 epoch, 1 repeat)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 1, 1
    torch.set_num_threads(args.threads)
    data = digits_data(0)
    kw = dict(epochs=args.epochs, every=args.every, top_k=args.top_k, lanczos_k=args.lanczos_k,
              bootstrap=args.bootstrap, fixed=args.fixed_batch)
    modes = ["plain", "step-only", "+analyze"]
    for mode in modes:  # warm-up: imports, first-call dispatch, vmap/jvp set-up
        epoch_time(mode, data, **{**kw, "epochs": 1})
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved, so machine load hits every mode alike
        for mode in modes:
            times[mode].append(epoch_time(mode, data, **kw))
    med = {m: statistics.median(t) for m, t in times.items()}
    steps = -(-len(data.y_train) // 64)
    print(f"digits CNN, {len(data.y_train)} images/epoch ({steps} steps of 64), "
          f"{args.threads} thread(s), every={args.every}, top_k={args.top_k}, "
          f"lanczos_k={args.lanczos_k}, bootstrap={args.bootstrap}, fixed batch "
          f"{args.fixed_batch}; median of {args.repeats} x {args.epochs} epochs")
    print(f"{'mode':<10} {'s/epoch':>9} {'min':>8} {'max':>8} {'ratio':>7}")
    ratios = {}
    for mode in modes:
        ratios[mode] = med[mode] / med["plain"]
        print(f"{mode:<10} {med[mode]:>9.3f} {min(times[mode]):>8.3f} {max(times[mode]):>8.3f} "
              f"{ratios[mode]:>6.2f}x")
    verdict = "meets" if ratios["step-only"] <= 1.15 else "MISSES"
    print(f"step-only overhead {ratios['step-only']:.3f}x {verdict} the <= 1.15x target")
    return ratios


if __name__ == "__main__":
    main()
