"""Array plumbing shared by several modules (curvlens.fit, rank_models, the measurements)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _as_f64(x: Tensor | Sequence[float] | object, name: str) -> Tensor:
    """A flat float64 CPU-or-same-device tensor from a tensor, numpy array or list."""
    if isinstance(x, Tensor):
        t = x.detach().to(torch.float64)
    else:
        try:
            t = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a tensor, numpy array or list of numbers, got {type(x).__name__}"
            ) from err
    if t.dim() > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.reshape(-1)


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from one ``aminmax`` pass: a NaN makes both the
    minimum and the maximum NaN, an infinity shows in one of them. On large tensors about 10x
    cheaper than ``isfinite(t).all()``, which writes a boolean tensor first.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return all_finite(torch.view_as_real(t))
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    return math.isfinite(lo) and math.isfinite(hi)
