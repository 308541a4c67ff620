"""Attach a :class:`~curvlens.lens.CurvatureLens` to a training loop in one line.

* :class:`LensCallback`: a plain callback with the usual hook names (``on_train_begin``,
  ``on_after_backward``, ``on_epoch_end``, ``on_train_end``) for hand-written loops and for
  frameworks whose callbacks can forward to it; it is also a context manager.
* ``LightningLensCallback``: a PyTorch Lightning ``Callback`` (the optional ``lightning`` extra),
  defined on first access when ``lightning`` or ``pytorch_lightning`` imports, so importing
  curvlens never imports Lightning.

Both log every report's per-layer exponents (:func:`report_scalars`): :class:`LensCallback` to
TensorBoard when given ``tensorboard=`` (a ``SummaryWriter`` or a log directory), the Lightning
callback through the trainer's loggers (``TensorBoardLogger`` by default).

The measurements are those of "Spectral Asymptotics of Neural Network Loss Landscapes: An Exact
Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596), see
:mod:`curvlens.lens`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from curvlens.lens import CurvatureLens
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> cb = LensCallback(CurvatureLens(net, loss_fn, top_k=3, every=1, lanczos_k=0,
    ...                                 analyze_options={"bootstrap": 0}), fixed_batch=(x, y))
    >>> cb.on_train_begin()
    >>> loss_fn(net(x), y).backward(); cb.on_after_backward()
    >>> report = cb.on_epoch_end(0)
    >>> cb.on_train_end()
    >>> report.epoch, sorted(report.layers)
    (0, ['0', '2'])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from curvlens.lens import CurvatureLens
from curvlens.report import median_transfer_error
from curvlens.results import Report

__all__ = ["LensCallback", "report_scalars", "SCALAR_FIELDS"]
# LightningLensCallback: module attribute, defined on access

#: Per-layer fields logged by the callbacks, as ``curvlens/<field>/<layer>``.
SCALAR_FIELDS = ("alpha", "gamma", "s_rayleigh", "s_lanczos", "predicted_s",
                 "transfer_error_rayleigh", "transfer_error_lanczos")


def report_scalars(report: Report) -> dict[str, float]:
    """A report's per-layer exponents as flat scalars for loggers (finite values only).

    Keys are ``curvlens/<field>/<layer>`` for every field of :data:`SCALAR_FIELDS` and
    ``curvlens/median_transfer_error`` over the layers; undefined (NaN) values are left out.

    Example:
        >>> from curvlens.results import LayerReport, Report
        >>> rep = Report(layers={"fc": LayerReport(name="fc", alpha=2.0, gamma=0.5)})
        >>> report_scalars(rep)
        {'curvlens/alpha/fc': 2.0, 'curvlens/gamma/fc': 0.5}
    """
    out = {f"curvlens/{field}/{name}": float(getattr(rep, field))
           for field in SCALAR_FIELDS for name, rep in report.layers.items()}
    out["curvlens/median_transfer_error"] = median_transfer_error(report)
    return {k: v for k, v in out.items() if math.isfinite(v)}


class LensCallback:
    """Drive a :class:`CurvatureLens` from callback events.

    Args:
        lens: the lens (not yet entered).
        fixed_batch: ``(inputs, targets)`` analyzed at the end of each epoch (``None``: no
            analysis, ``step()`` recording only).
        analyze_every: analyze every this many epochs (the last epoch is the caller's to add).
        print_table: print the per-layer table after each analysis.
        out_dir: if given, the run (every report so far) is written atomically to
            ``out_dir/run.json`` after each analysis.
        printer: the function that prints tables (default ``print``; a tqdm loop may pass
            ``tqdm.write``).
        tensorboard: log :func:`report_scalars` of every report at its training step: a
            ``torch.utils.tensorboard.SummaryWriter`` (the caller closes it) or a log directory
            (a writer the callback opens at ``on_train_begin`` and closes at ``on_train_end``;
            needs the ``tensorboard`` package).
    """

    def __init__(
        self,
        lens: CurvatureLens,
        fixed_batch: tuple[Tensor | tuple[Tensor, ...], Tensor] | None = None,
        *,
        analyze_every: int = 1,
        print_table: bool = False,
        out_dir: str | os.PathLike | None = None,
        printer: Callable[[str], Any] = print,
        tensorboard: Any | str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(lens, CurvatureLens):
            raise TypeError(f"lens must be a CurvatureLens, got {type(lens).__name__}")
        if fixed_batch is not None and (not isinstance(fixed_batch, Sequence)
                                        or len(fixed_batch) != 2):
            raise ValueError("fixed_batch must be a pair (inputs, targets) or None")
        if isinstance(analyze_every, bool) or not isinstance(analyze_every, int) \
                or analyze_every < 1:
            raise ValueError(f"analyze_every must be an int >= 1, got {analyze_every!r}")
        self.lens = lens
        self.fixed_batch = fixed_batch
        self.analyze_every = analyze_every
        self.print_table = print_table
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.printer = printer
        if tensorboard is not None and not isinstance(tensorboard, (str, os.PathLike)) \
                and not callable(getattr(tensorboard, "add_scalar", None)):
            raise TypeError("tensorboard must be a SummaryWriter or a log directory, got "
                            f"{type(tensorboard).__name__}")
        self.tensorboard = tensorboard
        self._writer: Any = None
        self._own_writer = False

    def on_train_begin(self) -> None:
        """Register the lens's hooks (and open the TensorBoard writer of a log directory)."""
        if isinstance(self.tensorboard, (str, os.PathLike)) and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.fspath(self.tensorboard))
            self._own_writer = True
        elif self.tensorboard is not None:
            self._writer = self.tensorboard
        self.lens.__enter__()

    def on_after_backward(self) -> None:
        """Call after ``loss.backward()``, before the optimizer step."""
        self.lens.step()

    def on_epoch_end(self, epoch: int) -> Any:
        """Analyze the fixed batch (every ``analyze_every`` epochs); returns the report or None."""
        if self.fixed_batch is None or (epoch + 1) % self.analyze_every:
            return None
        inputs, targets = self.fixed_batch
        report = self.lens.analyze(inputs, targets, epoch=epoch)
        if self.print_table:
            from curvlens.report import table

            self.printer(table(report))
        if self.out_dir is not None:
            from curvlens.report import save_reports

            save_reports(self.lens.history, self.out_dir / "run.json")
        if self._writer is not None:
            step = report.step if report.step is not None else epoch
            for tag, value in report_scalars(report).items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        return report

    def on_train_end(self) -> None:
        """Remove the lens's hooks (also call it from an ``except``/``finally``)."""
        self.lens.close()
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer, self._own_writer = None, False

    def __enter__(self) -> LensCallback:
        self.on_train_begin()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.on_train_end()


def _lightning_module() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError(
                "LightningLensCallback needs PyTorch Lightning: pip install lightning "
                "(or curvlens[lightning]); LensCallback works with any loop"
            ) from None
    return pl


def _make_lightning_callback() -> type:
    pl = _lightning_module()

    class LightningLensCallback(pl.Callback):
        """PyTorch Lightning callback running a :class:`CurvatureLens` on the LightningModule.

        The lens is built in ``setup`` on the LightningModule (so ``layers`` are its qualified
        names), entered at ``on_fit_start``, stepped in ``on_after_backward``, used for an
        analysis of ``fixed_batch`` at every ``on_train_epoch_end``, and closed at ``on_fit_end``
        or on an exception. A trainer with a gradient scaler (``precision="16-mixed"``, or a
        ``MixedPrecision`` plugin given one) hands it to the lens unless ``grad_scaler=`` is
        given, so the lens records unscaled gradients and skips the steps the scaler skips.
        Every report's :func:`report_scalars` (``curvlens/alpha/<layer>``,
        ``curvlens/gamma/<layer>``, ...) go to the trainer's loggers through
        ``LightningModule.log_dict`` (with a ``TensorBoardLogger``, to TensorBoard).

        Args:
            loss_fn: the loss of the training step, ``loss_fn(module(*inputs), targets)``.
            fixed_batch: ``(inputs, targets)`` to analyze each epoch, or ``None``.
            print_table: print the table after each analysis.
            **lens_kwargs: keyword arguments of :class:`CurvatureLens`.

        Attributes:
            lens: the lens (``None`` before ``setup``).
        """

        def __init__(self, loss_fn: Callable, fixed_batch: tuple | None = None, *,
                     print_table: bool = False, **lens_kwargs: Any) -> None:
            super().__init__()
            self.loss_fn = loss_fn
            self.fixed_batch = fixed_batch
            self.print_table = print_table
            self.lens_kwargs = lens_kwargs
            self.lens: CurvatureLens | None = None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self.lens is None:
                kwargs = dict(self.lens_kwargs)
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None and kwargs.get("grad_scaler") is None:
                    kwargs["grad_scaler"] = scaler  # the trainer scales the loss: unscale
                self.lens = CurvatureLens(pl_module, self.loss_fn, **kwargs)

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.lens.__enter__()

        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            self.lens.step()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.fixed_batch is None:
                return
            inputs, targets = self.fixed_batch
            device = pl_module.device
            inputs = (tuple(x.to(device) for x in inputs) if isinstance(inputs, tuple)
                      else inputs.to(device))
            with torch.enable_grad():
                report = self.lens.analyze(inputs, targets.to(device),
                                           epoch=trainer.current_epoch)
            pl_module.log_dict(report_scalars(report))
            if self.print_table:
                from curvlens.report import table

                print(table(report))

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.lens.close()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.lens is not None:
                self.lens.close()

    return LightningLensCallback


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "LightningLensCallback":
        if name not in _LAZY:
            _LAZY[name] = _make_lightning_callback()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
