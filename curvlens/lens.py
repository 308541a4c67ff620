r"""CurvatureLens: per-layer curvature measured inside the training loop the user already has.

The lens implements the measurement protocol of "Spectral Asymptotics of Neural Network Loss
Landscapes: An Exact Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596)
as a context manager around training:

* ``with lens:`` registers one forward hook per measured layer (:class:`~curvlens.hooks.Capture`)
  and removes every hook on exit, also when the body raises;
* ``lens.step()`` after ``loss.backward()`` is cheap: every ``every`` steps it records the top-K
  singular values of each layer's gradient and adds the captured inputs and output gradients
  to running Kronecker factors (:mod:`curvlens._recorder`, also for GradScaler loops); on the
  other steps the hooks record nothing and ``step()`` only counts;
* ``lens.analyze(x, y, epoch=...)`` runs the full measurement on a fixed batch
  (:func:`curvlens.measure.analyze_model`: exact HVPs, Lanczos, fits) and appends the
  :class:`~curvlens.analysis.Report` to ``lens.history``.

The lens never changes what training computes: it only reads ``.grad``, its hooks only store
detached tensors, ``analyze`` runs with the parameters' ``.grad`` set aside and restored, with
batch-norm per ``batch_norm`` (:func:`curvlens.measurement_mode`), its capture paused and the
RNGs forked (``torch.random.fork_rng``): a seeded run gives bit-for-bit the same results.

Running factors come from the training backward itself, i.e. the empirical (true-label)
factors averaged over the recorded steps since the last :meth:`CurvatureLens.reset_running`;
``mode`` selects the factors of the fixed-batch analysis.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> lens = CurvatureLens(net, loss_fn, top_k=3, every=2)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with lens:
    ...     for _ in range(4):
    ...         loss_fn(net(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
    ...         lens.step()
    ...         opt.step(); opt.zero_grad()
    >>> lens.num_steps, [s for s, _ in lens.gradient_spectra["0"]]
    (4, [0, 2])
    >>> net[0]._forward_hooks
    OrderedDict()
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._batches import is_batch_iterable, one_batch
from curvlens._budget import resolve_budget
from curvlens._context import check_hooks_fired, is_compiled, unwrap_compiled
from curvlens._losses import LossReduction
from curvlens._losses import loss_reduction as loss_reduction_of
from curvlens._modes import BatchNormPolicy
from curvlens._options import parse_option, positive_int
from curvlens._recorder import NoCapture, StepRecorder
from curvlens.fit import _rank_cut, ols_slope
from curvlens.hooks import Capture
from curvlens.kronecker import FactorMode, KroneckerFactors
from curvlens.layers import LayerInfo, OnUnsupported, find_layers

__all__ = ["CurvatureLens", "KroneckerSource"]


class KroneckerSource(str, Enum):
    """Where the lens gets Kronecker factors.

    ``"hooks"``: running factors from the training steps by curvlens's own hooks, and the
    fixed-batch factors of :meth:`CurvatureLens.analyze` by the hooks backend;
    ``"backpack"``: running factors by hooks, fixed-batch factors by BackPACK;
    ``"none"``: no factors (no hooks at all; the alignment budget is left NaN).
    """

    HOOKS = "hooks"
    BACKPACK = "backpack"
    NONE = "none"


class CurvatureLens:
    """Attach curvature measurements to a training loop.

    Args:
        model: the network being trained.
        loss_fn: ``loss_fn(model(*inputs), targets)``, a scalar mean (or sum) over the batch;
            the same function the training loop uses.
        layers: qualified names of the layers to measure (default: every supported layer with
            a trainable weight).
        top_k: size ``K`` of the singular-value window (clipped per layer to ``min(m, n)``).
        every: ``step()`` records on steps ``0, every, 2*every, ...``.
        kronecker: ``"hooks"``, ``"backpack"`` or ``"none"`` (:class:`KroneckerSource`).
        mode: factors of the fixed-batch analysis: ``"empirical"``, ``"fisher"`` or ``"ggn"``.
        device: device of the fixed batch in :meth:`analyze` (default: the model's).
        on_unsupported: trainable parameters outside supported layers: ``"error"``, ``"warn"``
            or ``"skip"``.
        lanczos_k: Hessian-block eigenvalues per layer in :meth:`analyze` (default: ``top_k``;
            0 skips Lanczos).
        analyze_options: further keyword arguments for
            :func:`curvlens.measure.analyze_model` (e.g. ``{"bootstrap": 0}``).
        check_finite: check the recorded gradients for NaN/Inf (one host sync per record).
        memory_budget: bytes one large allocation may take (a dense factor side, a Lanczos
            basis, a chunk of Hessian-vector-product directions): an int, a string such as
            ``"2GB"``, or ``None`` for a quarter of the available memory capped at 3 GiB (see
            :mod:`curvlens._budget`). Larger factor sides are sketched, larger Lanczos bases
            restarted; what cannot fit at all is refused by name. A layer whose recording fails
            in :meth:`step` is skipped with one warning (reason in :attr:`skipped_layers`).
        grad_scaler: the :class:`torch.amp.GradScaler` of a mixed-precision loop: the lens
            records in unscaled units and leaves out the steps the scaler skips (counted in
            ``meta["lens"]``). Order: ``scaler.scale(loss).backward()``, optionally
            ``scaler.unscale_(opt)``, ``lens.step()``, ``scaler.step(opt)``, ``scaler.update()``.
        spectra_history: recorded spectra kept per layer in :attr:`gradient_spectra` (the
            oldest are dropped first).
        loss_reduction: ``"mean"`` or ``"sum"``, how ``loss_fn`` combines the batch (default:
            read off a torch loss module, else a mean); it scales the per-sample gradients of
            the Kronecker factors.
        batch_norm: :meth:`analyze`'s :class:`~curvlens.BatchNormPolicy`, ``"eval"`` or ``"batch"``.

    Attributes:
        history: every :class:`~curvlens.analysis.Report` of :meth:`analyze`, oldest first.
        gradient_spectra: ``{layer: deque([(step, sigma [k]), ...])}`` recorded by
            :meth:`step`, the latest ``spectra_history`` per layer.
        num_steps: how many times :meth:`step` was called.

    Raises:
        ValueError: an invalid option, or a layer selection :func:`curvlens.find_layers`
            rejects.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        layers: Iterable[str] | None = None,
        top_k: int = 20,
        every: int = 50,
        kronecker: KroneckerSource | str = KroneckerSource.HOOKS,
        mode: FactorMode | str = FactorMode.EMPIRICAL,
        device: torch.device | str | None = None,
        on_unsupported: OnUnsupported | str = OnUnsupported.WARN,
        lanczos_k: int | None = None,
        analyze_options: Mapping[str, Any] | None = None,
        check_finite: bool = True,
        memory_budget: int | float | str | None = None,
        grad_scaler: Any = None,
        spectra_history: int = 1000,
        loss_reduction: LossReduction | str | None = None,
        batch_norm: BatchNormPolicy | str = BatchNormPolicy.EVAL,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.compiled, self.model = is_compiled(model), (model := unwrap_compiled(model))
        self.batch_norm = parse_option(BatchNormPolicy, batch_norm, "batch_norm")
        self.loss_fn = loss_fn
        self.top_k = positive_int(top_k, "top_k")
        self.every = positive_int(every, "every")
        self.kronecker = parse_option(KroneckerSource, kronecker, "kronecker")
        self.mode = parse_option(FactorMode, mode, "mode")
        self.on_unsupported = parse_option(OnUnsupported, on_unsupported, "on_unsupported")
        if lanczos_k is not None and (isinstance(lanczos_k, bool) or not isinstance(lanczos_k, int)
                                      or lanczos_k < 0):
            raise ValueError(f"lanczos_k must be None or an int >= 0, got {lanczos_k!r}")
        self.lanczos_k = lanczos_k
        self.device = None if device is None else torch.device(device)
        self.analyze_options = dict(analyze_options or {})
        self.loss_reduction = loss_reduction_of(loss_fn, loss_reduction)
        self.check_finite = bool(check_finite)
        self.layers: dict[str, LayerInfo] = find_layers(
            model, layers, on_unsupported=self.on_unsupported
        )
        if not self.layers:
            raise ValueError(
                f"no layer to measure in {type(model).__name__}: curvlens measures trainable "
                "parameters with >= 2 dimensions, and the model has none (or `layers` left "
                "them out)"
            )
        self.history: list[Any] = []
        self.num_steps = 0
        self._capture: Capture | NoCapture | None = None
        self._paused = False
        self.memory_budget = memory_budget
        resolve_budget(memory_budget)  # validated at construction
        self._recorder = StepRecorder(
            self.layers, loss_fn, top_k=self.top_k, check_finite=self.check_finite,
            memory_budget=memory_budget, grad_scaler=grad_scaler,
            history=positive_int(spectra_history, "spectra_history"),
            reduction=self.loss_reduction)

    @property
    def skipped_layers(self) -> dict[str, str]:
        """``{layer: reason}`` of layers whose recording failed in :meth:`step` (not recorded
        since; the training loop went on)."""
        return dict(self._recorder.skipped)

    # ----------------------------------------------------------------- context manager
    @property
    def active(self) -> bool:
        """Whether the lens is inside its ``with`` block."""
        return self._capture is not None

    def __enter__(self) -> CurvatureLens:
        if self.active:
            raise RuntimeError("this CurvatureLens is already active; `with lens:` cannot nest")
        if self.kronecker is not KroneckerSource.NONE:
            capture = Capture(self.model, self.layers, enabled=self._recording)
            capture.__enter__()
            self._capture = capture
        else:
            self._capture = NoCapture()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook of the lens and drop captured tensors (safe to call twice)."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.clear()
            capture.remove()

    def _recording(self) -> bool:
        """Called by the capture on every forward: record only on recording steps."""
        if self._paused or self.num_steps % self.every:
            return False
        self._recorder.note_forward()
        return True

    @property
    def recording_step(self) -> bool:
        """Whether the next :meth:`step` records (forward passes before it are captured)."""
        return self.num_steps % self.every == 0

    # ----------------------------------------------------------------- training steps
    def step(self) -> None:
        """Record gradient spectra and Kronecker factors of this step (every ``every`` steps).

        Call it after ``loss.backward()`` and before ``optimizer.step()`` / ``zero_grad()``
        (with a GradScaler: after ``scaler.scale(loss).backward()`` and the optional
        ``scaler.unscale_(optimizer)``, before ``scaler.step(optimizer)``). Gradients,
        parameters and random streams are only read.

        Raises:
            RuntimeError: called outside ``with lens:``; a measured layer has no gradient
                (frozen or unused in the forward pass); NaN/Inf in a layer's gradient (without
                a grad scaler); a running factor would overflow; the grad scaler's calls in
                another order. Each message names the layer. A failed step records nothing.
        """
        if not self.active:
            raise RuntimeError(
                "CurvatureLens.step() was called outside its context: wrap the training loop "
                "in `with lens:` (the hooks that record Kronecker factors live there)"
            )
        try:
            if self.recording_step:
                capture = self._capture if isinstance(self._capture, Capture) else None
                check_hooks_fired(capture, self.layers, self.num_steps, self.compiled)
                self._recorder.record(self.num_steps, capture)
        finally:
            self._capture.clear()
            self._recorder.end_step()
            self.num_steps += 1

    # ----------------------------------------------------------------- running statistics
    @property
    def gradient_spectra(self) -> dict[str, deque[tuple[int, Tensor]]]:
        """``{layer: deque([(step, sigma [k]), ...])}``: the top-K gradient singular values
        recorded by :meth:`step`, oldest first, the latest ``spectra_history`` per layer."""
        return self._recorder.gradient_spectra

    def running_factors(self) -> dict[str, KroneckerFactors]:
        """Kronecker factors averaged over the recorded training steps since the last reset.

        Layers that saw no captured backward are left out. Under ``torch.distributed`` the
        statistics are summed over all processes first (every process must call this), so the
        factors are those of the union of the processes' batches.

        Returns:
            ``{layer: KroneckerFactors}`` with ``C_A [n, n]`` and ``C_delta [m, m]``.
        """
        return self._recorder.running_factors()

    def reset_running(self) -> None:
        """Forget the running Kronecker factors (the gradient spectra history stays)."""
        self._recorder.reset_running()

    def latest_alphas(self) -> dict[str, float]:
        """``{layer: alpha}`` of the latest :meth:`analyze` (empty before the first one).

        This is what :class:`curvlens.SpectralNewton` reads with ``alpha="auto"``; undefined
        exponents are NaN.
        """
        if not self.history:
            return {}
        return {name: float(rep.alpha) for name, rep in self.history[-1].layers.items()}

    def gamma_trace(self) -> dict[str, list[tuple[int, float]]]:
        """``{layer: [(step, gamma), ...]}``: the rank-decay exponent of each recorded spectrum,
        over :meth:`analyze`'s window (``sigma_k > max(m, n) * eps * sigma_1``: no round-off
        values, e.g. a 10-class head's 10th); NaN where fewer than three remain."""
        out: dict[str, list[tuple[int, float]]] = {}
        for name, records in self.gradient_spectra.items():
            size = max(self.layers[name].matrix_shape)
            out[name] = [(step, _rank_slope(S, size)) for step, S in records]
        return out

    # ----------------------------------------------------------------- full analysis
    def analyze(
        self,
        inputs: Tensor | tuple[Tensor, ...] | Iterable[tuple[Any, Any]],
        targets: Tensor | None,
        *,
        epoch: int | None = None,
        step: int | None = None,
    ) -> Any:
        """Full per-layer measurement on a fixed batch; appended to :attr:`history`.

        Runs :func:`curvlens.measure.analyze_model` with the lens's layers, ``top_k``,
        ``mode``, Kronecker backend, ``batch_norm`` and options in measurement mode (whatever the
        caller's context), with the lens's hooks paused, ``.grad`` set aside and restored and the
        RNG state forked: training continues exactly as without it, inside or outside the lens.

        Args:
            inputs: the fixed batch ``[B, ...]`` (a tensor, or a tuple for ``model(*inputs)``),
                or a re-iterable of ``(inputs, targets)`` batches (a list, a ``DataLoader``)
                with ``targets=None``, measured as the mean over all their samples.
            targets: its targets ``[B, ...]``; ``None`` for an iterable of batches.
            epoch: stored in the report.
            step: stored in the report (default: the lens's step count).

        Returns:
            The :class:`~curvlens.analysis.Report`.

        Raises:
            ValueError: empty batch, or inputs on another device than the model.
            TypeError: floating-point inputs of another dtype than the model.
        """
        from curvlens.measure import analyze_model

        device, data = self._device(), inputs
        if not is_batch_iterable(inputs, targets):
            data, targets = one_batch(inputs, targets, device, next(iter(
                self.layers.values())).weight.dtype, move=self.device is not None)
        options: dict[str, Any] = {
            "layers": list(self.layers), "top_k": self.top_k, "kronecker_mode": self.mode.value,
            "loss_reduction": self.loss_reduction.value, "batch_norm": self.batch_norm.value,
            "kronecker_backend": (None if self.kronecker is KroneckerSource.NONE
                                  else self.kronecker.value),
        }
        if self.lanczos_k is not None:
            options["lanczos_k"] = self.lanczos_k
        options["memory_budget"] = self.memory_budget
        options.update(self.analyze_options)
        params = [p for p in self.model.parameters()]
        saved = [p.grad for p in params]
        rng_devices = [device] if device.type == "cuda" else []
        self._paused = True
        try:
            for p in params:
                p.grad = None
            with torch.random.fork_rng(devices=rng_devices):
                report = analyze_model(self.model, self.loss_fn, data, targets, **options)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            self._paused = False
        report.epoch = epoch if epoch is not None else report.epoch
        report.step = step if step is not None else self.num_steps
        report.meta.setdefault("lens", {}).update(self._meta())
        self.history.append(report)
        return report

    def _device(self) -> torch.device:
        return self.device or next(iter(self.layers.values())).weight.device

    def _meta(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k, "every": self.every, "kronecker": self.kronecker.value,
            "mode": self.mode.value, "batch_norm": self.batch_norm.value, "compiled": self.compiled,
            "num_steps": self.num_steps,
            **self._recorder.meta(),
            "train_gamma": {
                name: trace[-1][1] for name, trace in self.gamma_trace().items() if trace
            },
        }

    def __repr__(self) -> str:
        return (
            f"CurvatureLens({type(self.model).__name__}, layers={list(self.layers)}, "
            f"top_k={self.top_k}, every={self.every}, kronecker={self.kronecker.value!r}, "
            f"mode={self.mode.value!r}, active={self.active}, reports={len(self.history)})"
        )


def _rank_slope(S: Tensor, size: int) -> float:
    """``gamma`` of one recorded spectrum over the numerical-rank window of :meth:`analyze`."""
    s = S.detach().to(torch.float64).cpu()
    _, rank = _rank_cut(s, size, torch.finfo(S.dtype).eps)
    s = s[:rank]
    if s.numel() < 3:
        return math.nan
    return -ols_slope(torch.arange(1, s.numel() + 1, dtype=torch.float64).log(), s.log())
