r"""Spreading SpectralNewton's per-layer matrix work over ``torch.distributed`` ranks.

Under data parallelism (DDP) every rank holds the same parameters and, after the gradient
all-reduce, the same gradients, so every rank would compute the same ``U diag(T(sigma)) V^T``
for every layer. Instead each matrix parameter gets one owner rank
(:func:`assign_owners`), only the owner computes its update, and :func:`broadcast_updates` sends
each rank's updates to all others, one flat broadcast per rank and dtype, as in the
distributed Muon and Shampoo implementations. Momentum buffers and the element-wise AdamW part
stay replicated: they are cheap and keep every rank's optimizer state complete for
checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlens import _dist

__all__ = ["assign_owners", "broadcast_updates"]


def assign_owners(numels: Sequence[int], world: int) -> list[int]:
    """Owner rank of each parameter: round-robin over the parameters sorted by size.

    The largest parameter goes to rank 0, the next to rank 1, ..., wrapping around, so every
    rank gets a similar share of the large matrices. Deterministic (ties keep list order), so
    every rank computes the same assignment.

    Args:
        numels: number of entries of each parameter.
        world: number of ranks.

    Returns:
        ``owners[i]`` in ``[0, world)`` for each parameter ``i``.

    Example:
        >>> assign_owners([10, 40, 20, 30, 5], world=2)  # sizes 40, 30, 20, 10, 5 -> 0, 1, 0, 1, 0
        [1, 0, 0, 1, 0]
    """
    order = sorted(range(len(numels)), key=lambda i: (-int(numels[i]), i))
    owners = [0] * len(numels)
    for j, i in enumerate(order):
        owners[i] = j % world
    return owners


def broadcast_updates(
    updates: list[Tensor | None],
    owners: Sequence[int],
    shapes: Sequence[torch.Size],
    dtypes: Sequence[torch.dtype],
    *,
    rank: int,
    world: int,
    device: torch.device,
) -> list[Tensor]:
    """Give every rank every update, each computed on its owner rank.

    Args:
        updates: this rank's updates: a tensor where ``owners[i] == rank``, ``None`` elsewhere.
        owners: owner rank of each update.
        shapes, dtypes: shape and dtype of each update (known on every rank).
        rank, world: this process's rank and the number of ranks.
        device: device of the flat buffers.

    Returns:
        All updates, on every rank.
    """
    out: list[Tensor | None] = list(updates)
    for src in range(world):
        for dtype in dict.fromkeys(dtypes):
            idx = [i for i, (o, dt) in enumerate(zip(owners, dtypes)) if o == src and dt == dtype]
            if not idx:
                continue
            sizes = [shapes[i].numel() for i in idx]
            if src == rank:
                flat = torch.cat([out[i].reshape(-1) for i in idx])
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            _dist.broadcast(flat, src)
            for i, piece in zip(idx, flat.split(sizes)):
                out[i] = piece.view(shapes[i])
    return out  # type: ignore[return-value]
