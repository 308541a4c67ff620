"""Array plumbing shared by curvlens.fit and curvlens.rank_models."""

from __future__ import annotations

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
