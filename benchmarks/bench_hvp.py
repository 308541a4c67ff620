"""Cost of one exact Hessian-vector product per weight matrix of a ResNet-18, with torch's own
convolution derivatives and with curvlens's lean ones, as ratios to a plain training step.

torchvision ``resnet18(num_classes=10)``, 32x32 inputs, batch 64, one thread. For each batch-norm
policy (``eval``: running statistics, curvlens's default; ``batch``: batch statistics) the gradient
graph over every convolution and the classifier is built twice inside curvlens's measurement mode,
once as :class:`curvlens._grad_graph.GradGraph` builds it (lean convolutions) and once with the
stand-in switched off (torch's ``convolution_backward`` double backward). Then, in paired rounds
whose order alternates, each matrix's block product ``H_WW v`` runs on both graphs; the products
agree to float32 rounding (printed). Reported: the median time per block in plain steps, the sum
over the 21 blocks (one product per matrix, what one Lanczos iteration over every matrix costs),
and the lean/torch ratio of the sums.

Usage: ``python benchmarks/bench_hvp.py [--rounds N] [--threads N] [--out DIR]``; writes
``bench_hvp.json`` and ``bench_hvp.log`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvlens._grad_graph as grad_graph  # noqa: E402
from curvlens._modes import measurement_mode  # noqa: E402


def _graph(model, loss_fn, x, y, weights, lean: bool):
    if lean:
        return grad_graph.GradGraph(model, loss_fn, (x,), y, weights, "resnet18")
    original = grad_graph.second_order_graph
    grad_graph.second_order_graph = contextlib.nullcontext  # torch's own derivatives
    try:
        return grad_graph.GradGraph(model, loss_fn, (x,), y, weights, "resnet18")
    finally:
        grad_graph.second_order_graph = original


def run(args: argparse.Namespace) -> dict:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain() -> float:
        start = time.perf_counter()
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = [model.get_submodule(n).weight for n in names]
    out: dict = {"model": "torchvision resnet18(num_classes=10), 32x32, batch 64",
                 "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__}
    for policy in ("eval", "batch"):
        plain()
        plain_s = statistics.median(plain() for _ in range(5))
        with measurement_mode(model, batch_norm=policy):
            graphs = {lean: _graph(model, loss_fn, x, y, weights, lean) for lean in (True, False)}
            times: dict[bool, list[list[float]]] = {True: [], False: []}
            worst = 0.0
            for w in weights:
                v = torch.randn(w.shape, generator=gen)
                views = {lean: g.restricted(w) for lean, g in graphs.items()}
                a, b = views[True].hvp([v])[0], views[False].hvp([v])[0]  # warm-up
                worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
                per = {True: [], False: []}
                for r in range(args.rounds):
                    for lean in ((True, False) if r % 2 == 0 else (False, True)):
                        start = time.perf_counter()
                        views[lean].hvp([v])
                        per[lean].append(time.perf_counter() - start)
                for lean in (True, False):
                    times[lean].append(per[lean])
            del graphs, views
        blocks = {name: {"torch": statistics.median(times[False][i]) / plain_s,
                         "lean": statistics.median(times[True][i]) / plain_s}
                  for i, name in enumerate(names)}
        total = {k: sum(b[k] for b in blocks.values()) for k in ("torch", "lean")}
        out[policy] = {"plain_step_s": plain_s, "blocks_plain_steps": blocks,
                       "sum_plain_steps": total, "lean_over_torch": total["lean"] / total["torch"],
                       "max_relative_difference": worst}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out["load_average"] = list(os.getloadavg())
    return out


def report(r: dict) -> str:
    buf = io.StringIO()
    print(f"{r['model']}; one thread; median of {r['rounds']} paired rounds per block", file=buf)
    for policy in ("eval", "batch"):
        p = r[policy]
        print(f"batch norm '{policy}': plain step {p['plain_step_s']:.3f} s", file=buf)
        print(f"  {'matrix':24s} {'torch':>7s} {'lean':>7s}  (plain steps per product)", file=buf)
        for name, b in p["blocks_plain_steps"].items():
            print(f"  {name:24s} {b['torch']:7.3f} {b['lean']:7.3f}", file=buf)
        s = p["sum_plain_steps"]
        print(f"  sum over 21 blocks: torch {s['torch']:.2f}, lean {s['lean']:.2f} plain steps; "
              f"lean/torch {p['lean_over_torch']:.3f}; products agree to "
              f"{p['max_relative_difference']:.1e}", file=buf)
    print(f"peak RSS {r['peak_rss_gb']:.2f} GB; load average "
          + ", ".join(f"{v:.2f}" for v in r["load_average"]), file=buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    text = report(result)
    print(text, end="")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_hvp.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "bench_hvp.log"), "w") as f:
        f.write(text)
    return result


if __name__ == "__main__":
    main()
