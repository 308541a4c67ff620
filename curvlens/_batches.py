"""Fixed data given as one batch or as an iterable of batches, measured as one mean.

The measurement of :func:`curvlens.analyze_model` and of the Hessian functions is defined on the
mean loss over a fixed set of ``N`` samples. That set may be one batch ``(inputs, targets)`` or,
when it does not fit in memory at once, a re-iterable collection of batches (a list of
``(inputs, targets)`` pairs or a ``torch.utils.data.DataLoader``). Everything linear in the loss
(gradients, ``h_k``, Hessian-vector products) is then accumulated exactly as the mean over all
samples: batch ``i`` of ``B_i`` samples contributes its own mean with weight ``B_i / N`` (a loss
that sums over its batch contributes with weight 1, so the total is the sum over all samples).
Kronecker statistics are summed over the batches before they are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlens._functional_model import check_fixed_batch

__all__ = ["FixedData", "fixed_data", "is_batch_iterable", "one_batch"]


def is_batch_iterable(inputs: Any, targets: Any) -> bool:
    """Whether ``inputs`` is an iterable of ``(inputs, targets)`` batches (``targets is None``)."""
    return targets is None and not isinstance(inputs, (Tensor, tuple))


def one_batch(inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype, move: bool
              ) -> tuple[Any, Any]:
    """One fixed batch for ``lens.analyze``: moved to ``device`` (when ``move``) and checked against
    the model's device and ``dtype``; returns ``(inputs, targets)`` as ``analyze_model`` takes
    them (a tensor, or a tuple of tensors for several inputs)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if move:
        args = tuple(x.to(device) if isinstance(x, Tensor) else x for x in args)
        targets = targets.to(device) if isinstance(targets, Tensor) else targets
    check_fixed_batch(args, targets, device, dtype, "lens.analyze")
    return (args if len(args) > 1 else args[0]), targets


def _split(batch: Any, index: int) -> tuple[tuple[Any, ...], Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"batch {index} of the fixed data is a {type(batch).__name__}; an iterable of "
            "batches must yield (inputs, targets) pairs (inputs a tensor or a tuple of tensors)"
        )
    inputs, targets = batch
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
        raise ValueError(f"batch {index} of the fixed data: inputs must be a tensor [B, ...] "
                         "or a tuple of tensors with a batch dimension")
    return args, targets


@dataclass
class FixedData:
    """The fixed data as batches ``(args, targets)``; ``sizes`` is known after the first pass.

    Attributes:
        source: one ``(args, targets)`` pair (a single batch) or the user's re-iterable.
        single: whether it is one batch.
        sizes: ``[B_i]`` of the batches seen by the last full pass.
    """

    source: Any
    single: bool
    sizes: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], Any]]:
        if self.single:
            self.sizes = [int(self.source[0][0].shape[0])]
            yield self.source
            return
        sizes = []
        for i, batch in enumerate(self.source):
            args, targets = _split(batch, i)
            sizes.append(int(args[0].shape[0]))
            yield args, targets
        if not sizes or sum(sizes) == 0:
            raise ValueError("the fixed data is empty: the iterable of batches yielded no sample")
        self.sizes = sizes

    @property
    def total(self) -> int:
        """``N``, the number of samples (after one pass)."""
        return sum(self.sizes)

    def weights(self, reduction_is_sum: bool) -> list[float]:
        """Per-batch weights of batch means in the mean over all samples (1 for summed losses)."""
        return [1.0] * len(self.sizes) if reduction_is_sum else [
            b / self.total for b in self.sizes]

    def head(self, count: int) -> FixedData:
        """The first ``count`` batches (streamed from this data; ``sizes`` after one pass)."""
        return FixedData(_Range(self, 0, count), single=False)

    def halves(self) -> tuple[FixedData, FixedData] | None:
        """The first and the second half of the batches (the middle one left out for an odd
        count), or ``None`` for a single batch (split that batch instead)."""
        if self.single:
            return None
        count = len(self.sizes) if self.sizes else sum(1 for _ in self)
        half = count // 2
        if half == 0:
            return None
        return (FixedData(_Range(self, 0, half), single=False),
                FixedData(_Range(self, count - half, count), single=False))


class _Range:
    """Batches ``start <= i < stop`` of a re-iterable, streamed from it (one in memory at a
    time; the pass stops after ``stop``)."""

    def __init__(self, source: Any, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.source):
            if i >= self.stop:
                return
            if i >= self.start:
                yield batch


def fixed_data(inputs: Any, targets: Any) -> FixedData:
    """The fixed data from ``(inputs, targets)`` or from an iterable of batches.

    Args:
        inputs: a tensor ``[B, ...]`` or a tuple of tensors (with ``targets``), or a
            re-iterable of ``(inputs, targets)`` batches (with ``targets=None``).
        targets: the targets of a single batch, or ``None``.

    Raises:
        ValueError: a one-shot iterator (it must be iterable several times), a malformed batch.

    Example:
        >>> import torch
        >>> data = fixed_data([(torch.ones(3, 2), torch.zeros(3)), (torch.ones(1, 2), None)],
        ...                   None)
        >>> [a[0].shape[0] for a, _ in data], data.total, data.weights(False)
        ([3, 1], 4, [0.75, 0.25])
    """
    if not is_batch_iterable(inputs, targets):
        args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        return FixedData((args, targets), single=True)
    if not isinstance(inputs, Iterable):
        raise ValueError(f"targets=None needs an iterable of (inputs, targets) batches, got "
                         f"{type(inputs).__name__}")
    if iter(inputs) is inputs:
        raise ValueError(
            "the fixed data is a one-shot iterator (e.g. a generator); curvlens passes over it "
            "several times: pass a list of (inputs, targets) batches or a DataLoader"
        )
    return FixedData(inputs, single=False)
