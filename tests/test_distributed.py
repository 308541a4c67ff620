"""Two gloo processes on CPU report what one process reports on the union of their batches."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curvlens.kronecker import kronecker_factors
from curvlens.measure import analyze_model
from tests.conftest import build_case

CASES = ("mlp", "cnn")
FIELDS = ("sigma", "h", "h_kron", "lambda_top", "alpha", "gamma", "s_rayleigh", "s_lanczos",
          "beta", "phi")


def _analysis(model, loss_fn, x, y):
    report = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, noise_floor=False,
                           bootstrap=10)
    return {name: {f: getattr(rep, f) for f in FIELDS} for name, rep in report.layers.items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        for case in CASES:
            model, loss_fn, x, y = build_case(case)
            shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
            factors = kronecker_factors(model, loss_fn, x[shard], y[shard], mode="empirical")
            torch.save({k: (f.C_A, f.C_delta, f.num_samples) for k, f in factors.items()},
                       os.path.join(out_dir, f"{case}-rank{rank}.pt"))
            torch.save(_analysis(model, loss_fn, x[shard], y[shard]),
                       os.path.join(out_dir, f"{case}-analysis-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for case in CASES:
        model, loss_fn, x, y = build_case(case)
        single = kronecker_factors(model, loss_fn, x, y, mode="empirical")
        single_analysis = _analysis(model, loss_fn, x, y)
        for rank in range(2):
            got = torch.load(tmp_path / f"{case}-rank{rank}.pt", weights_only=True)
            for name, f in single.items():
                C_A, C_delta, count = got[name]
                torch.testing.assert_close(C_A, f.C_A, rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(C_delta, f.C_delta, rtol=1e-10, atol=1e-14)
                assert count == f.num_samples == x.shape[0]
            analysis = torch.load(tmp_path / f"{case}-analysis-rank{rank}.pt",
                                  weights_only=True)
            for name, fields in single_analysis.items():
                for field, value in fields.items():
                    torch.testing.assert_close(
                        torch.as_tensor(analysis[name][field], dtype=torch.float64),
                        torch.as_tensor(value, dtype=torch.float64),
                        rtol=1e-7, atol=1e-12, equal_nan=True, msg=f"{case} {name} {field}")
