"""Coverage of the exponent intervals: studentized (default) against the pairs bootstrap.

Synthetic layers with known exponents (``sigma_k ~ k^-gamma`` sorted after log-normal noise,
``h_k = sigma_k^alpha`` times log-normal noise, Lanczos eigenvalues ``k^-s`` with noise) are
analyzed with :func:`curvlens.analysis.analyze_layer` at a 90% level; the script counts how often
each interval covers the true exponent over ``--draws`` seeded draws, for ``K`` = 10, 20, 40.

Run: ``python benchmarks/bench_intervals.py [--draws 200] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from curvlens.analysis import analyze_layer

TRUE = {"alpha": 2.1, "gamma": 0.9, "s_rayleigh": 2.1 * 0.9, "s_lanczos": 1.5}


def _draw(seed: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = np.arange(1, K + 1, dtype=float)
    sigma = np.sort(k ** -TRUE["gamma"] * np.exp(rng.normal(scale=0.05, size=K)))[::-1].copy()
    h = sigma ** TRUE["alpha"] * np.exp(rng.normal(scale=0.2, size=K))
    lam = k ** -TRUE["s_lanczos"] * np.exp(rng.normal(scale=0.1, size=K))
    return sigma, h, lam


def coverage(K: int, draws: int, interval: str) -> dict[str, float]:
    hits = dict.fromkeys(TRUE, 0)
    for seed in range(draws):
        sigma, h, lam = _draw(seed, K)
        rep = analyze_layer(sigma, h, lambda_top=lam, level=0.90, interval=interval,
                            bootstrap=1000, seed=seed)
        for name, true in TRUE.items():
            lo, hi = getattr(rep, f"{name}_ci")
            hits[name] += lo < true < hi
    return {name: n / draws for name, n in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out", default=None, help="write bench_intervals.json here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    t0 = time.perf_counter()
    for K in (10, 20, 40):
        for interval in ("studentized", "bootstrap"):
            cov = coverage(K, args.draws, interval)
            results[f"K={K} {interval}"] = cov
            print(f"K={K:<3} {interval:<12} 90% coverage: "
                  + "  ".join(f"{n} {100 * c:.1f}%" for n, c in cov.items()), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        path = Path(args.out) / "bench_intervals.json"
        path.write_text(json.dumps({"draws": args.draws, "level": 0.9, "true": TRUE,
                                    "coverage": results}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
