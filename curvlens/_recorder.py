"""What :meth:`curvlens.CurvatureLens.step` records: gradient spectra and running Kronecker factors.

:class:`StepRecorder` holds the training-time state of a lens: the top-K singular values of each
layer's gradient per recorded step, and the running sums that average the captured inputs and
output gradients into Kronecker factors. The lens owns one and calls :meth:`StepRecorder.record`
on its recording steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from curvlens.hooks import Capture
from curvlens.kronecker import FactorAccumulator, batch_scale
from curvlens.layers import LayerInfo
from curvlens.linalg.svd import GRAM_LIMIT, gradient_svd, gram_singular_values

__all__ = ["StepRecorder"]


class StepRecorder:
    """Gradient spectra and running Kronecker factors of the recorded training steps.

    Args:
        layers: ``{name: LayerInfo}`` of the measured layers.
        loss_fn: the training loss (its reduction sets the per-sample scale of ``dL/dy``).
        top_k: singular values kept per layer and step.
        check_finite: check the gradients for NaN/Inf before recording.

    Attributes:
        gradient_spectra: ``{layer: [(step, sigma [k]), ...]}``.
        accumulator: the running factor sums since the last :meth:`reset_running`.
        recorded_factor_steps: recorded steps that added to the running factors.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerInfo],
        loss_fn: Callable,
        *,
        top_k: int,
        check_finite: bool,
    ) -> None:
        self.layers = dict(layers)
        self.loss_fn = loss_fn
        self.top_k = top_k
        self.check_finite = check_finite
        self.gradient_spectra: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in self.layers}
        self.accumulator = FactorAccumulator(self.layers)
        self.recorded_factor_steps = 0

    def reset_running(self) -> None:
        """Forget the running factor sums (the spectra stay)."""
        self.accumulator = FactorAccumulator(self.layers)
        self.recorded_factor_steps = 0

    def record(self, step: int, capture: Capture | None) -> None:
        """Record the current gradients (and ``capture``'s pairs, if given) as step ``step``.

        Raises:
            RuntimeError: a measured layer has no gradient, or NaN/Inf in a gradient; the
                message names the layer.
        """
        grads: dict[str, Tensor] = {}
        for name, info in self.layers.items():
            grad = info.weight.grad
            if grad is None:
                raise RuntimeError(
                    f"layer {name!r} has no gradient at lens.step(): it is frozen or was not "
                    "used in the forward pass. Call lens.step() after loss.backward(), or leave "
                    f"the layer out with CurvatureLens(..., layers=[...])"
                )
            grads[name] = grad.detach().reshape(grad.shape[0], -1)  # [m, n]
        if self.check_finite:
            finite = torch.stack([torch.isfinite(g).all() for g in grads.values()])
            if not bool(finite.all()):  # one host sync per recording step
                bad = [n for n, ok in zip(grads, finite.tolist()) if not ok]
                raise RuntimeError(
                    f"NaN or Inf in the gradient of layer {bad[0]!r} (all affected: {bad}) at "
                    f"step {step}; lower the learning rate, check the loss and the "
                    "inputs, or clip gradients"
                )
        for name, G in grads.items():
            self.gradient_spectra[name].append((step, _top_singular_values(G, self.top_k)))
        if capture is not None:
            self._accumulate(capture, step)

    def _accumulate(self, capture: Capture, step: int) -> None:
        added = False
        for name, record in capture.records.items():
            for x, g in record.pairs():
                batch = int(x.shape[0]) if x.dim() > 0 else 1
                if g.dtype in (torch.float16, torch.bfloat16):  # sums of squares overflow in half
                    x = x.float() if x.is_floating_point() else x
                    g = g.float()
                self.accumulator.add_inputs(name, x)
                try:
                    self.accumulator.add_grads(
                        name, g, scale=batch_scale(self.loss_fn, batch), samples=batch
                    )
                except RuntimeError as err:
                    raise RuntimeError(f"{err} (at training step {step})") from None
                added = True
        self.recorded_factor_steps += int(added)


class NoCapture:
    """Stand-in capture for ``kronecker="none"``: no hooks, nothing recorded."""

    def clear(self) -> None:
        pass

    def remove(self) -> None:
        pass


def _top_singular_values(G: Tensor, k: int) -> Tensor:
    """Top-``k`` singular values ``[min(k, m, n)]`` of ``G [m, n]``, descending.

    Only the values are kept during training: up to :data:`~curvlens.linalg.svd.GRAM_LIMIT` on
    the smaller side they come from the smaller Gram matrix
    (:func:`~curvlens.linalg.svd.gram_singular_values`, about ``1e-5`` relative accuracy; a
    ``512 x 4608`` gradient costs a ``512 x 512`` eigendecomposition instead of an SVD); larger
    ones from the truncated :func:`~curvlens.linalg.svd.gradient_svd`.
    """
    k = min(k, *G.shape)
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    if min(G.shape) <= GRAM_LIMIT:
        return gram_singular_values(work, k).clone()
    return gradient_svd(work, k, method="subspace" if 4 * k < min(G.shape) else "dense")[1]
