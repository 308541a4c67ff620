"""What :meth:`curvlens.CurvatureLens.step` records: gradient spectra and running Kronecker factors.

:class:`StepRecorder` holds the training-time state of a lens: the top-K singular values of each
layer's gradient per recorded step (a bounded history of small standalone tensors), and the
running sums that average the captured inputs and output gradients into Kronecker factors. The
lens owns one and calls :meth:`StepRecorder.record` on its recording steps.

Mixed precision: with a :class:`torch.amp.GradScaler` the backward pass runs on the scaled loss
``scale * L``, so the captured output gradients are ``scale * dL/dy`` and, until
``scaler.unscale_(optimizer)``, the weight gradients are ``scale * dL/dW``. Everything is
recorded in the units of ``L``: output gradients are divided by ``scale`` (so ``C_delta`` by
``scale^2``) and the gradient singular values by ``scale`` unless the scaler's per-optimizer
state says the gradients were already unscaled. A step on which the scaler will skip the
optimizer (non-finite gradients) is not recorded; :attr:`StepRecorder.skipped_steps` counts them.
Every check runs before anything is stored. A layer whose recording fails (an allocation the
memory budget refuses, a running factor that would overflow, a numerical failure) is skipped
with one warning and not recorded again, so the training loop never fails inside the lens for
it; misuse (a missing gradient, NaN gradients without a scaler, the scaler's calls in the wrong
order) raises.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvlens.hooks import Capture
from curvlens.kronecker import FactorAccumulator, batch_scale
from curvlens.layers import LayerInfo
from curvlens.linalg.svd import GRAM_LIMIT, gradient_svd, gram_singular_values

__all__ = ["NoCapture", "StepRecorder"]

_CALL_ORDER = ("scaler.scale(loss).backward(); [scaler.unscale_(optimizer);] lens.step(); "
               "scaler.step(optimizer); scaler.update()")


class StepRecorder:
    """Gradient spectra and running Kronecker factors of the recorded training steps.

    Args:
        layers: ``{name: LayerInfo}`` of the measured layers.
        loss_fn: the training loss (its reduction sets the per-sample scale of ``dL/dy``).
        top_k: singular values kept per layer and step.
        check_finite: check the gradients for NaN/Inf before recording.
        history: recorded spectra kept per layer (the oldest are dropped).
        grad_scaler: the training loop's :class:`torch.amp.GradScaler`, or ``None``.
        memory_budget: bytes one dense factor side may take (see :mod:`curvlens._budget`).

    Attributes:
        gradient_spectra: ``{layer: deque([(step, sigma [k]), ...])}``, at most ``history``.
        accumulator: the running factor sums since the last :meth:`reset_running`.
        recorded_factor_steps: recorded steps that added to the running factors.
        skipped_steps: recording steps left out because the scaler skips them (overflow).
        skipped: ``{layer: reason}``: layers whose recording failed; each is warned about once
            and not recorded again.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerInfo],
        loss_fn: Callable,
        *,
        top_k: int,
        check_finite: bool,
        history: int,
        grad_scaler: Any = None,
        memory_budget: int | float | str | None = None,
        reduction: str | None = None,
    ) -> None:
        if grad_scaler is not None and not hasattr(grad_scaler, "_per_optimizer_states"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        self.layers = dict(layers)
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.top_k = top_k
        self.check_finite = check_finite
        self.grad_scaler = grad_scaler
        self.memory_budget = memory_budget
        self.skipped: dict[str, str] = {}
        self.gradient_spectra: dict[str, deque[tuple[int, Tensor]]] = {
            n: deque(maxlen=history) for n in self.layers}
        self.skipped_steps = 0
        self._forward_scale: Tensor | None = None
        self.reset_running()

    def reset_running(self) -> None:
        """Forget the running factor sums (the spectra stay)."""
        kept = {n: i for n, i in self.layers.items() if n not in self.skipped}
        self.accumulator = FactorAccumulator(kept, memory_budget=self.memory_budget)
        self.recorded_factor_steps = 0
        self._grad_trace: dict[str, float] = dict.fromkeys(self.layers, 0.0)

    def running_factors(self) -> dict:
        """The running factors, summed over ``torch.distributed`` processes first."""
        acc = self.accumulator.copy()
        acc.all_reduce()
        return acc.factors(skip_empty=True)

    def meta(self) -> dict[str, int]:
        """What the report's ``meta["lens"]`` says about the recording."""
        return {"recorded_factor_steps": self.recorded_factor_steps,
                "skipped_overflow_steps": self.skipped_steps}

    def _skip(self, name: str, step: int, err: Exception | str, depth: int = 0) -> None:
        """Stop recording ``name`` after a failure: warn once, keep the reason."""
        what = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        reason = (f"layer {name!r}: recording failed at step {step} ({what}); the lens no "
                  "longer records it (training goes on)")
        self.skipped[name] = reason
        self.accumulator.drop(name)
        warnings.warn(reason, RuntimeWarning, stacklevel=4 + depth)  # at the user's lens.step()

    # ----------------------------------------------------------------- loss scaling
    def note_forward(self) -> None:
        """Remember the scaler's state at the first captured forward of a recording step."""
        scaler = self._scaler()
        if scaler is not None and self._forward_scale is None:
            scale = scaler._get_scale_async()
            if scale is None:  # the scaler's first step: scale() will start from these
                self._forward_scale = torch.tensor([float(scaler._init_scale), 0.0],
                                                   dtype=torch.float64)
            else:  # (scale, growth tracker): update() changes one of them
                self._forward_scale = torch.stack(
                    [scale.detach().double(), scaler._growth_tracker.detach().double()])

    def end_step(self) -> None:
        self._forward_scale = None

    def _scaler(self) -> Any:
        scaler = self.grad_scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _scaler_stats(self) -> tuple[Tensor | None, bool, list[Tensor]]:
        """``([scale, update-ran flag] or None, grads already unscaled, found-inf tensors)``."""
        scaler = self._scaler()
        if scaler is None:
            return None, True, []
        scale = scaler._get_scale_async()
        if scale is None:
            raise RuntimeError(
                "lens.step(): the GradScaler given to the lens has not scaled a loss yet; the "
                f"lens expects the order {_CALL_ORDER}"
            )
        stages = {state["stage"].name for state in scaler._per_optimizer_states.values()}
        if "STEPPED" in stages:
            raise RuntimeError(
                "lens.step() was called after scaler.step(optimizer): the gradients it would "
                f"record belong to a finished step. Use the order {_CALL_ORDER}"
            )
        if stages == {"READY", "UNSCALED"}:
            raise RuntimeError(
                "lens.step(): scaler.unscale_ ran for some optimizers but not others, so the "
                "units of the gradients are mixed; unscale every optimizer or none before "
                "lens.step()"
            )
        now = torch.stack([scale.detach().double(), scaler._growth_tracker.detach().double()])
        changed = (torch.zeros((), dtype=torch.float64, device=now.device)
                   if self._forward_scale is None
                   else (now != self._forward_scale.to(now.device)).any().double())
        found = [t.double().sum() for state in scaler._per_optimizer_states.values()
                 for t in state["found_inf_per_device"].values()]
        return torch.stack([now[0], changed]), stages == {"UNSCALED"}, found

    # ----------------------------------------------------------------- recording
    def record(self, step: int, capture: Capture | None) -> None:
        """Record the current gradients (and ``capture``'s pairs, if given) as step ``step``.

        Every check runs first (one host synchronisation): a step that fails one stores
        nothing.

        Raises:
            RuntimeError: a measured layer has no gradient; NaN/Inf in a gradient or an output
                gradient (without a grad scaler); a running factor would overflow; a grad
                scaler used in another order than the one documented. The message names the
                layer.
        """
        grads: dict[str, Tensor] = {}
        for name, info in self.layers.items():
            if name in self.skipped:
                continue
            grad = info.weight.grad
            if grad is None:
                raise RuntimeError(
                    f"layer {name!r} has no gradient at lens.step(): it is frozen or was not "
                    "used in the forward pass. Call lens.step() after loss.backward(), or leave "
                    f"the layer out with CurvatureLens(..., layers=[...])"
                )
            grads[name] = info.extract(grad.detach())  # [m, n]
        scaler_stats, unscaled, found_inf = self._scaler_stats()
        pairs = [(name, record.inputs[c], g, record.samples[c])  # samples as the adapter reads
                 for name, record in (capture.records.items() if capture else ())
                 if name not in self.skipped for c, g in zip(record.calls, record.output_grads)]
        check_grads = self.check_finite or scaler_stats is not None
        # (min, max) per gradient: NaN or Inf in a tensor shows in them, and one aminmax pass
        # is about 20x cheaper than isfinite(g).all() on a 512 x 4608 gradient
        parts = ([torch.stack(torch.aminmax(g)).double() for g in grads.values()]
                 if check_grads else [])
        parts += [torch.linalg.vector_norm(g, dtype=torch.float64).square().reshape(1)
                  for _, _, g, _ in pairs]  # sum of squares: NaN/Inf if any entry is
        parts += [t.reshape(1) for t in found_inf]
        if scaler_stats is not None:
            parts.append(scaler_stats)
        if not parts:
            return self._store(step, grads, pairs, 1.0, unscaled)
        device = parts[0].device  # gather on one device, then a single host sync
        stats = torch.cat([p.to(device, torch.float64) for p in parts]).tolist()
        ranges = 2 * len(grads) if check_grads else 0
        grad_ok = ([_finite(lo) and _finite(hi) for lo, hi in zip(stats[:ranges:2],
                                                                 stats[1:ranges:2])]
                   if check_grads else [True] * len(grads))
        squares = stats[ranges:ranges + len(pairs)]
        overflow = sum(stats[ranges + len(pairs):len(stats) - 2]) > 0 if found_inf else False
        loss_scale = stats[-2] if scaler_stats is not None else 1.0
        if scaler_stats is not None and stats[-1]:
            raise RuntimeError(
                "lens.step(): the GradScaler's scale changed between the forward pass and "
                f"lens.step(), so scaler.update() ran too early; use the order {_CALL_ORDER}"
            )
        bad_grads = [n for n, ok in zip(grads, grad_ok) if not ok]
        bad_outputs = [n for (n, _, _, _), sq in zip(pairs, squares) if not _finite(sq)]
        if scaler_stats is not None and (overflow or bad_grads or bad_outputs):
            self.skipped_steps += 1  # the scaler skips this optimizer step: so does the lens
            return None
        if bad_grads:
            raise RuntimeError(
                f"NaN or Inf in the gradient of layer {bad_grads[0]!r} (all affected: "
                f"{bad_grads}) at step {step}; lower the learning rate, check the loss and the "
                "inputs, or clip gradients (training with a GradScaler? pass it: "
                "CurvatureLens(..., grad_scaler=scaler))"
            )
        for name in dict.fromkeys(bad_outputs):
            self._skip(name, step, "NaN or Inf in the output gradient; check the loss and the "
                       "learning rate before measuring curvature")
        self._check_overflow(step, pairs, squares, loss_scale)
        pairs = [pair for pair in pairs if pair[0] not in self.skipped]
        return self._store(step, grads, pairs, loss_scale, unscaled)

    def _check_overflow(self, step: int, pairs: list, squares: list[float],
                        loss_scale: float) -> None:
        """Skip a layer whose output gradients would overflow its running ``C_delta`` sum.

        The trace of ``sum_i g_i g_i^T`` bounds every entry of it; it is tracked exactly in
        float64 on the host, against the largest value of the dtype the sums are kept in.
        """
        traces = dict(self._grad_trace)
        for (name, _, g, batch), sq in zip(pairs, squares):
            if name in self.skipped:
                continue
            scale = batch_scale(self.loss_fn, batch, self.reduction) / loss_scale
            traces[name] += sq * scale * scale
            limit = torch.finfo(_work_dtype(g)).max
            if traces[name] > limit:
                self._skip(name, step, (
                    f"the running Kronecker factor C_delta would overflow {_work_dtype(g)}: sum "
                    f"of squared per-sample output gradients {traces[name]:.3g} > {limit:.3g}, "
                    "nothing of this step was stored; the gradients are extreme, check the "
                    "loss scale and the learning rate"), depth=1)
        self._grad_trace = traces

    def _store(self, step: int, grads: dict[str, Tensor], pairs: list, loss_scale: float,
               unscaled: bool) -> None:
        divide = 1.0 if unscaled else loss_scale
        for name, G in grads.items():
            if name in self.skipped:
                continue
            try:
                sigma = _top_singular_values(G, self.top_k)
            except Exception as err:  # noqa: BLE001 - never fail the training loop
                self._skip(name, step, err, depth=1)
                continue
            sigma = (sigma / divide) if divide != 1.0 else sigma.clone()  # standalone [k]
            self.gradient_spectra[name].append((step, sigma))
        added = False
        for name, x, g, batch in pairs:
            if name in self.skipped:
                continue
            if g.dtype in (torch.float16, torch.bfloat16):  # sums of squares overflow in half
                x = x.float() if x.is_floating_point() else x
                g = g.float()
            try:
                self.accumulator.add_inputs(name, x)
                scale = batch_scale(self.loss_fn, batch, self.reduction) / loss_scale
                self.accumulator.add_grads(name, g, scale=scale, samples=batch,
                                           check_finite=False)  # record() checked them
            except Exception as err:  # noqa: BLE001 - never fail the training loop
                self._skip(name, step, err, depth=1)
                continue
            added = True
        self.recorded_factor_steps += int(added)


def _work_dtype(g: Tensor) -> torch.dtype:
    return torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


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
