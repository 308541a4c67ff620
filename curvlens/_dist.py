"""Small wrappers over ``torch.distributed`` so measurements on P processes equal one process
on the union of their batches.

Every function is a no-op when no process group is initialized, so single-process code pays
nothing and needs no branches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "all_reduce_mean", "broadcast"]


def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all processes (in place, also returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over all processes (in place, also returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast(tensor: Tensor, src: int) -> Tensor:
    """``tensor`` from process ``src`` on every process (in place, also returned)."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def sum_count(value: int, device: torch.device | str = "cpu") -> int:
    """Sum of an integer count over all processes."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def batch_mean(tensor: Tensor, batch_size: int) -> Tensor:
    """Batch-size-weighted mean over processes of a per-process mean (in place, also returned).

    A quantity that is linear in the per-process mean loss (a gradient, an HVP, a quadratic form
    of the Hessian) then equals the quantity of the mean loss over the union of the batches.
    """
    if is_distributed():
        total = sum_count(batch_size, tensor.device)
        tensor *= batch_size / total
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
