"""Array plumbing: the one-pass finiteness check against ``torch.isfinite``."""

from __future__ import annotations

import pytest
import torch

from curvlens._arrays import all_finite

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("t", [
    torch.randn(300, 70), torch.tensor([1.0, NAN]), torch.tensor([INF, 1.0]),
    torch.tensor([1.0, -INF]), torch.tensor([NAN, INF, -INF]), torch.zeros(0),
    torch.tensor([1.0, NAN], dtype=torch.float16), torch.tensor([2.0], dtype=torch.bfloat16),
    torch.tensor([1 + 1j, complex(NAN, 0.0)]), torch.tensor([1 + 1j]), torch.arange(5),
    torch.cat([torch.ones(100_000, dtype=torch.float64), torch.tensor([NAN], dtype=torch.float64)]),
], ids=lambda t: f"{t.dtype}-{t.numel()}")
def test_all_finite_agrees_with_isfinite(t):
    assert all_finite(t) == bool(torch.isfinite(t).all())
