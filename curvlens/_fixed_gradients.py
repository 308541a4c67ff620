"""Gradients of the mean loss over the fixed data, per weight matrix, and the half-batch noise.

The first pass of :func:`curvlens.measure.analyze_model`: ``dL/dW`` in each matrix view (a
reason string instead for a matrix the loss does not reach or whose gradient is not finite),
averaged over all samples of the fixed data (one batch or an iterable of batches, see
:mod:`curvlens._batches`), and the noise norm ``||(G1 - G2) / 2||_2`` of two halves of the data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._arrays import all_finite
from curvlens._batches import FixedData
from curvlens._dist import batch_mean
from curvlens.layers import LayerInfo
from curvlens.linalg.svd import gram_singular_values

__all__ = ["gradients_and_halves", "half_batch_noise", "layer_gradients", "mean_gradients",
           "mean_over", "noise_norms"]


def mean_over(data: FixedData, fn: Callable[[tuple, Any], Any]) -> Any:
    """``sum_i w_i fn(args_i, targets_i)`` over the batches (``w_i = B_i / N``), for a tensor or
    a ``{name: tensor or reason}`` result (a reason in any batch wins)."""
    parts = [fn(args, targets) for args, targets in data]
    return _weighted(parts, data.weights(False))


def gradients_and_halves(model: nn.Module, loss_fn: Callable, data: FixedData,
                         found: dict[str, LayerInfo]) -> tuple[dict, tuple[dict, dict] | None]:
    """In one pass over an iterable of batches: :func:`mean_gradients` over all of them and over
    the first and the last ``count // 2`` batches (``None`` for a single batch), the two
    independent halves of the noise floor.

    When the iterable has a ``len()`` (a list, a ``DataLoader``), the three means are running
    sums: three gradient copies in memory whatever the number of batches. Otherwise every
    batch's gradient is held until the count is known."""
    def grads(batches: Any) -> Any:
        return ((layer_gradients(model, loss_fn, a, t, found, "a batch of the fixed data"),
                 int(a[0].shape[0])) for a, t in batches)

    count = _known_count(data)
    if count is None:  # materialize the per-batch gradients to learn the count
        held = list(grads(data))
        count, stream = len(held), iter(held)
    else:
        stream = grads(data)
    half = count // 2
    sums: list[dict] = [{}, {}, {}]  # all batches, the first half, the last half
    seen = [0, 0, 0]
    for i, (g, b) in enumerate(stream):
        for j in (0, 1 if i < half else None, 2 if i >= count - half else None):
            if j is not None:
                _accumulate(sums[j], g, b)
                seen[j] += b
    if len(data.sizes) != count:
        raise ValueError(f"the iterable of batches has len() {count} but yielded "
                         f"{len(data.sizes)} batches; pass a list of the batches")
    means = [{k: v / n if isinstance(v, Tensor) else v for k, v in acc.items()}
             for acc, n in zip(sums, seen)]
    return means[0], (means[1], means[2]) if half else None


def _known_count(data: FixedData) -> int | None:
    """The number of batches, before the pass, when the source has a ``len()``."""
    if data.single:
        return 1
    try:
        return len(data.source)
    except TypeError:
        return None


def _accumulate(acc: dict, grads: dict, size: int) -> None:
    """``acc[k] += size * grads[k]``; a reason (a string) in any batch wins."""
    for k, g in grads.items():
        if not isinstance(g, Tensor):
            acc[k] = acc.get(k) if isinstance(acc.get(k), str) else g
        elif k not in acc:
            acc[k] = size * g
        elif isinstance(acc[k], Tensor):
            acc[k].add_(g, alpha=size)


def _weighted(parts: list, weights: list[float]) -> Any:
    if not isinstance(parts[0], dict):
        return sum(w * p for w, p in zip(weights, parts))
    out = {}
    for k in parts[0]:
        bad = [p[k] for p in parts if not isinstance(p[k], Tensor)]
        out[k] = bad[0] if bad else sum(w * p[k] for w, p in zip(weights, parts))
    return out


def mean_gradients(model: nn.Module, loss_fn: Callable, data: FixedData,
                   found: dict[str, LayerInfo]) -> dict[str, Tensor | str]:
    """``{name: dL/dW [m, n]}`` of the mean loss over all samples of ``data``."""
    what = "the fixed batch" if data.single else "a batch of the fixed data"
    return mean_over(data, lambda a, t: layer_gradients(model, loss_fn, a, t, found, what))


def noise_norms(g1: dict[str, Tensor | str], g2: dict[str, Tensor | str]) -> dict[str, float]:
    """``{name: ||(G1 - G2) / 2||_2}`` (float64) for the matrices with both gradients: the
    largest singular value from the smaller Gram matrix (a full SVD of a 512 x 4608 difference
    cost ten times more)."""
    return {name: float(gram_singular_values((g1[name] - g2[name]).double() / 2, 1)[0])
            for name in g1 if isinstance(g1[name], Tensor) and isinstance(g2[name], Tensor)}


def layer_gradients(model: nn.Module, loss_fn: Callable, args: tuple, targets: Any,
                    found: dict[str, LayerInfo], what: str = "the fixed batch"
                    ) -> dict[str, Tensor | str]:
    """``{name: dL/dW [m, n]}`` of the mean loss; a string (the reason) for a matrix whose
    gradient is missing (unused) or not finite."""
    loss = loss_fn(model(*args), targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(getattr(loss, 'shape', ()))}")
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"the loss on {what} is {float(loss)}; check the inputs, the "
                           "targets and the learning rate")
    params = list({id(i.weight): i.weight for i in found.values()}.values())
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True)))
    out: dict[str, Tensor | str] = {}
    for name, info in found.items():
        g = grads[id(info.weight)]
        if g is None:
            out[name] = (f"layer {name!r} is not used by the loss on {what}; leave it out with "
                         "`layers=`")
            continue
        g = info.extract(g.to_dense() if g.is_sparse else g)  # nn.Embedding(sparse=True)
        if not all_finite(g):
            out[name] = (f"layer {name!r}: the gradient on {what} has NaN or Inf entries; check "
                         "the loss scale, the inputs and the weights")
            continue
        out[name] = batch_mean(g.detach(), int(args[0].shape[0]))
    return out


def half_batch_noise(model: nn.Module, loss_fn: Callable, args: tuple, targets: Any,
                     found: dict[str, LayerInfo]) -> dict[str, float]:
    """``{name: ||(G1 - G2) / 2||_2}`` for the two halves of the batch."""
    half = int(args[0].shape[0]) // 2

    def part(sl: slice) -> tuple[tuple, Any]:
        sub = tuple(a[sl] if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)
        return sub, targets[sl] if isinstance(targets, Tensor) else targets

    g1 = layer_gradients(model, loss_fn, *part(slice(0, half)), found, "the first half-batch")
    g2 = layer_gradients(model, loss_fn, *part(slice(half, 2 * half)), found,
                         "the second half-batch")
    return noise_norms(g1, g2)
