"""A loss gradient kept with its graph, for repeated exact Hessian-vector products.

:class:`GradGraph` builds the gradient once (``create_graph=True``); every product ``H v`` is one
more backward pass through it. :func:`layer_hvp` reads a weight matrix's block product off it,
and :func:`hvp_curvature` contracts such products with rank-one directions
``D_k = u_k v_k^T`` into the directional curvatures ``h_k = <D_k, H_WW D_k>``. Used by
:mod:`curvlens.hessian` (one matrix, one batch) and by :mod:`curvlens._matrix_run` (one graph over
every measured weight, shared by their blocks through :meth:`GradGraph.restricted`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._functional_model import checked_loss
from curvlens._lean_ops import second_order_graph
from curvlens._substitutes import NoDerivativeError, explain_autograd_error
from curvlens.layers import LayerInfo

__all__ = ["GradGraph", "LossFn", "hvp_curvature", "layer_hvp"]

LossFn = Callable[[Any, Any], Tensor]


class GradGraph:
    """The loss gradient w.r.t. ``params`` with its graph kept, for repeated exact HVPs.

    Args:
        model: the model (already in the wanted train/eval state).
        loss_fn: ``(outputs, targets) -> scalar`` mean loss.
        inputs: positional inputs of the model.
        targets: passed to ``loss_fn``.
        params: the parameters ``theta`` of the Hessian block ``d^2 L / d theta^2``.
        where: names the layer (or the model) in error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: tuple[Any, ...],
        targets: Any,
        params: Sequence[Tensor],
        where: str,
    ) -> None:
        self.params = list(params)
        self.where = where
        with torch.enable_grad(), second_order_graph():
            loss = checked_loss(model, loss_fn, inputs, targets, where)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        self.grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        self._live = [i for i, g in enumerate(self.grads) if g.requires_grad]

    def hvp(self, vs: Sequence[Tensor], batched: bool = False) -> list[Tensor]:
        """``H v`` for one vector per parameter (``[*p.shape]``, or ``[b, *p.shape]`` batched)."""
        outs: list[Tensor | None] = [None] * len(self.params)
        if self._live:
            grads = [self.grads[i] for i in self._live]
            tangents = [vs[i] for i in self._live]
            try:
                outs = list(self._grad(grads, tangents, batched))
            except NoDerivativeError:
                raise
            except RuntimeError:
                if not batched:
                    raise
                # an op without a batching rule: one backward per vector (same exact result)
                cols = [self._grad(grads, [t[j] for t in tangents], False)
                        for j in range(tangents[0].shape[0])]
                outs = [None if c[0] is None else torch.stack(c) for c in zip(*cols)]
        return [torch.zeros_like(v) if o is None else o for o, v in zip(outs, vs)]

    def restricted(self, weight: Tensor, where: str | None = None) -> GradGraph:
        """The same graph seen as one over ``weight`` alone (one of :attr:`params`): its
        products are that weight's Hessian block, nothing is recomputed. ``where`` names it in
        errors (default: as this graph)."""
        index = next((i for i, p in enumerate(self.params) if p is weight), None)
        if index is None:
            raise ValueError(f"{where or self.where}: the weight is not one of this graph's "
                             "parameters")
        view = object.__new__(GradGraph)
        view.params, view.where, view.loss = [weight], where or self.where, self.loss
        view.grads = [self.grads[index]]
        view._live = [0] if view.grads[0].requires_grad else []
        return view

    def _grad(self, grads: list[Tensor], tangents: list[Tensor], batched: bool):
        try:
            with torch.enable_grad():
                return torch.autograd.grad(
                    grads, self.params, tangents, retain_graph=True, allow_unused=True,
                    is_grads_batched=batched,
                )
        except RuntimeError as err:
            explained = explain_autograd_error(err, self.where)
            if explained is None:
                raise
            raise explained from err


def layer_hvp(graph: GradGraph, info: LayerInfo, D: Tensor) -> Tensor:
    """``H_WW D_j`` for ``D [b, m, n]`` in ``info``'s matrix view; ``graph`` is over
    ``[info.weight]``. A row block is embedded into its whole parameter (zeros elsewhere) and
    the product read back from the same rows, which is the block's own Hessian. One direction
    (``b = 1``, every product of Lanczos and of ``h_k`` on the CPU) goes through a plain
    backward pass: ``is_grads_batched``'s batching costs about a tenth more on convolutions."""
    tangent = info.embed(D)
    if D.shape[0] == 1:
        return info.extract(graph.hvp([tangent[0]])[0][None])
    return info.extract(graph.hvp([tangent], batched=True)[0])


def hvp_curvature(graph: GradGraph, info: LayerInfo, U: Tensor, V: Tensor, chunk: int,
                  progress: Callable[[int], Any] | None = None) -> Tensor:
    """``h_k = <D_k, H_WW D_k>`` for ``D_k = u_k v_k^T`` by exact products on ``graph`` (over
    ``[info.weight]``), the directions ``[chunk, m, n]`` built ``chunk`` at a time (ten of a
    38.6M-entry block would take 1.5 GB); ``progress(count)`` after each chunk.

    Returns:
        ``[k]`` for ``U [m, k]``, ``V [n, k]``.
    """
    out = [U.new_zeros(0)]
    for start in range(0, U.shape[1], max(1, chunk)):
        D = torch.einsum("mk,nk->kmn", U[:, start:start + chunk], V[:, start:start + chunk])
        out.append((D * layer_hvp(graph, info, D)).sum((1, 2)))
        if progress is not None:
            progress(D.shape[0])
    return torch.cat(out)
