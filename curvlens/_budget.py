"""The memory budget: how many bytes one large working allocation of curvlens may take.

Every allocation whose size grows with a layer's shape is sized against one number, the
*memory budget*, before it is made: a dense Kronecker factor (``n^2`` entries), the Gram matrix of
a gradient, a Lanczos basis (``j`` vectors of the block's dimension), a chunk of batched
Hessian-vector-product directions, an SVD's workspace. An allocation that cannot fit is refused
with :class:`MemoryBudgetError` before it is tried; the message names the layer, the size and the
option to change (``memory_budget=`` of :class:`curvlens.CurvatureLens` and
:func:`curvlens.analyze_model`). Where a smaller form exists (a diagonal or sketched factor side,
a restarted Lanczos basis, smaller direction chunks) curvlens uses it instead of failing.

The budget is per allocation, not a cap on the process: the model, its activations and the
optimizer are the user's. The default is a quarter of the memory available when it is resolved
(``MemAvailable`` of ``/proc/meminfo`` on Linux, free device memory on CUDA), capped at 3 GiB and
at least 64 MiB.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MemoryBudgetError", "resolve_budget", "check_fits", "format_bytes", "count_that_fits",
           "activation_bytes", "direction_chunk"]

GiB = 1024**3
MiB = 1024**2
DEFAULT_FRACTION = 0.25
DEFAULT_CAP = 3 * GiB  # keeps a GPT-2-small analysis (tied-block Lanczos) within 6 GB
DEFAULT_FLOOR = 64 * MiB
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": MiB, "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}


class MemoryBudgetError(MemoryError):
    """An allocation would exceed the memory budget; raised before it is tried."""


def format_bytes(nbytes: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} GiB"  # pragma: no cover


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes free for new allocations on ``device`` (None when it cannot be told)."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def resolve_budget(budget: int | float | str | None, device: torch.device | str | None = None
                   ) -> int:
    """The budget in bytes from an option value.

    Args:
        budget: ``None`` (the default: a quarter of the available memory, capped at 3 GiB, at
            least 64 MiB), a number of bytes, or a string such as ``"2GB"``, ``"512 MiB"``.
        device: where the allocations live (CUDA: free device memory).

    Raises:
        ValueError: a non-positive or unparsable value.

    Example:
        >>> resolve_budget("1.5 GiB"), resolve_budget(1000)
        (1610612736, 1000)
    """
    if budget is None:
        avail = available_memory(device)
        if avail is None:
            return DEFAULT_CAP
        return int(max(DEFAULT_FLOOR, min(DEFAULT_CAP, DEFAULT_FRACTION * avail)))
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory_budget {budget!r} is not a size; use bytes (an int) or a "
                             "string such as '2GB' or '512MiB'")
        value = float(match.group(1)) * _UNITS[unit]
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    else:
        raise ValueError(f"memory_budget must be None, a number of bytes or a string such as "
                         f"'2GB', got {budget!r}")
    if not value >= 1:
        raise ValueError(f"memory_budget must be at least 1 byte, got {budget!r}")
    return int(value)


def check_fits(nbytes: int, budget: int, *, what: str, layer: str, hint: str = "") -> None:
    """Refuse an allocation of ``nbytes`` that the budget cannot hold.

    Raises:
        MemoryBudgetError: names ``layer``, ``what`` and the option ``memory_budget``.

    Example:
        >>> check_fits(10, 100, what="a factor", layer="fc")
        >>> try:
        ...     check_fits(1000, 100, what="a factor", layer="fc")
        ... except MemoryBudgetError as err:
        ...     print(str(err)[:54])
        layer 'fc': a factor needs 1000 B but memory_budget is
    """
    if nbytes > budget:
        raise MemoryBudgetError(
            f"layer {layer!r}: {what} needs {format_bytes(nbytes)} but memory_budget is "
            f"{format_bytes(budget)}; raise memory_budget= (CurvatureLens or analyze_model)"
            + (f" or {hint}" if hint else "")
        )


def count_that_fits(per_item: int, budget: int, *, reserve: int = 0) -> int:
    """How many items of ``per_item`` bytes fit in ``budget - reserve`` (0 when none).

    Example:
        >>> count_that_fits(10, 105), count_that_fits(10, 105, reserve=100)
        (10, 0)
    """
    return max(0, int((budget - reserve) // max(1, per_item)))


def activation_bytes(model: nn.Module, args: tuple[Any, ...]) -> int:
    """Bytes of every leaf module's output in one forward pass of ``model(*args)`` (no grad).

    A proxy for the memory that each extra direction of a batched second-order product adds
    (its tangents or its double-backward buffers run through the same activations).
    """
    total = [0]

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def direction_chunk(per_direction: int, budget: int, k: int) -> int:
    """How many of ``k`` directions one batched second-order product may take at once.

    At least one: a single direction costs about what a training step costs, which the user's
    model already needs.

    Example:
        >>> direction_chunk(100, 1000, 20), direction_chunk(100, 50, 20), direction_chunk(1, 99, 7)
        (10, 1, 7)
    """
    return max(1, min(k, count_that_fits(per_direction, budget)))
