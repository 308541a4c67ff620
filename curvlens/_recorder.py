"""What :meth:`curvlens.CurvatureLens.step` records: gradient spectra and running Kronecker factors.

:class:`StepRecorder` holds the training-time state of a lens: the top-K singular values of each
layer's gradient per recorded step, and the running sums that average the captured inputs and
output gradients into Kronecker factors. The lens owns one and calls :meth:`StepRecorder.record`
on its recording steps.
"""

from __future__ import annotations

import warnings
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
        memory_budget: bytes one dense factor side may take (see :mod:`curvlens._budget`).

    Attributes:
        gradient_spectra: ``{layer: [(step, sigma [k]), ...]}``.
        accumulator: the running factor sums since the last :meth:`reset_running`.
        recorded_factor_steps: recorded steps that added to the running factors.
        skipped: ``{layer: reason}``: layers whose recording failed (an allocation the memory
            budget refused, a numerical failure); each is warned about once and not recorded
            again, so the training loop never fails inside the lens for them.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerInfo],
        loss_fn: Callable,
        *,
        top_k: int,
        check_finite: bool,
        memory_budget: int | float | str | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.loss_fn = loss_fn
        self.top_k = top_k
        self.check_finite = check_finite
        self.memory_budget = memory_budget
        self.gradient_spectra: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in self.layers}
        self.skipped: dict[str, str] = {}
        self.reset_running()

    def reset_running(self) -> None:
        """Forget the running factor sums (the spectra stay)."""
        kept = {n: i for n, i in self.layers.items() if n not in self.skipped}
        self.accumulator = FactorAccumulator(kept, memory_budget=self.memory_budget)
        self.recorded_factor_steps = 0

    def _skip(self, name: str, step: int, err: Exception) -> None:
        """Stop recording ``name`` after a failure: warn once, keep the reason."""
        reason = (f"layer {name!r}: recording failed at step {step} ({type(err).__name__}: "
                  f"{err}); the lens no longer records it (training goes on)")
        self.skipped[name] = reason
        self.accumulator.drop(name)
        warnings.warn(reason, RuntimeWarning, stacklevel=4)

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
            if name in self.skipped:
                continue
            try:
                self.gradient_spectra[name].append((step, _top_singular_values(G, self.top_k)))
            except Exception as err:  # noqa: BLE001 - never fail the training loop
                self._skip(name, step, err)
        if capture is not None:
            self._accumulate(capture, step)

    def _accumulate(self, capture: Capture, step: int) -> None:
        added = False
        for name, record in capture.records.items():
            if name in self.skipped:
                continue
            try:
                for x, g in record.pairs():
                    batch = int(x.shape[0]) if x.dim() > 0 else 1
                    if g.dtype in (torch.float16, torch.bfloat16):  # squares overflow in half
                        x = x.float() if x.is_floating_point() else x
                        g = g.float()
                    self.accumulator.add_inputs(name, x)
                    self.accumulator.add_grads(
                        name, g, scale=batch_scale(self.loss_fn, batch), samples=batch
                    )
                    added = True
            except Exception as err:  # noqa: BLE001 - never fail the training loop
                self._skip(name, step, err)
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
        return gram_singular_values(work, k)
    return gradient_svd(work, k, method="subspace" if 4 * k < min(G.shape) else "dense")[1]
