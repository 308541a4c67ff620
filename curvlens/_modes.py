"""The measurement context: one exact, deterministic function whatever the caller's context.

Curvature is measured on a fixed batch with a fixed function, in the model's own float32 or
float64 arithmetic. Every curvlens entry point that measures (the HVP functions, Lanczos, trace,
density, Kronecker factors, the end-to-end analysis) runs inside :func:`measurement_mode`, which
for the duration of the block

* switches autocast off (on every device type where it is on) and enables gradients, also when
  the caller is under ``torch.no_grad()`` or ``torch.inference_mode()``;
* selects the math backend of ``F.scaled_dot_product_attention`` (the fused CPU and GPU kernels
  have no second derivative);
* substitutes twice-differentiable, equal-valued forms for ops without a second derivative and
  switches functional dropout off (:mod:`curvlens._substitutes`);
* puts dropout modules and ``nn.MultiheadAttention`` in eval mode, and batch/instance norm per
  :class:`BatchNormPolicy` (running statistics, or the measured batch's statistics with the
  running statistics left untouched);
* runs modules compiled in place (``module.compile()``) eagerly;
* silences torch's own ``torch.jit.script`` deprecation warning, which forward-mode AD triggers.

Everything is restored on exit, also when the block raises. Entering it again for a model already
being measured (one entry point calling another) changes nothing.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from curvlens._options import parse_option
from curvlens._substitutes import MeasurementFunctionMode

__all__ = [
    "AUTOCAST_DEVICES",
    "STOCHASTIC_MODULES",
    "BatchNormPolicy",
    "active_policy",
    "measurement_mode",
]

#: Module types put in eval mode during measurement: dropout of every kind and attention modules
#: whose dropout depends on ``training``. Normalization follows :class:`BatchNormPolicy`.
STOCHASTIC_MODULES: tuple[type[nn.Module], ...] = (
    _DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MultiheadAttention,
)

#: Device types whose autocast state is checked and switched off.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


class BatchNormPolicy(str, Enum):
    """How batch (and instance) normalization layers normalize while curvlens measures.

    ``"eval"``: with their running statistics, the function the model computes at inference
    time (the default). ``"batch"``: with the statistics of the measured batch, the function the
    model computes in training; the running statistics and ``num_batches_tracked`` are not
    updated. Use ``"batch"`` when the running statistics do not describe the data yet (few
    steps, or a small BN momentum such as MobileNetV3's 0.01).
    """

    EVAL = "eval"
    BATCH = "batch"


_ACTIVE = threading.local()


def active_policy(model: nn.Module) -> BatchNormPolicy | None:
    """The batch-norm policy of the measurement now active for ``model``, or ``None``."""
    for m, policy in reversed(getattr(_ACTIVE, "stack", [])):
        if m is model:
            return policy
    return None


@contextmanager
def measurement_mode(
    model: nn.Module,
    *,
    batch_norm: BatchNormPolicy | str | None = None,
    extra_types: tuple[type[nn.Module], ...] = (),
) -> Iterator[nn.Module]:
    """Measure ``model`` exactly for the block's duration (module docstring), then restore.

    Args:
        model: the model to measure.
        batch_norm: ``"eval"`` or ``"batch"`` (:class:`BatchNormPolicy`); ``None`` keeps the
            policy of an enclosing measurement of the same model, else ``"eval"``.
        extra_types: further module types to put in eval mode (e.g. a custom stochastic layer).

    Yields:
        ``model`` itself.

    Raises:
        ValueError: an unknown ``batch_norm``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
        >>> with torch.no_grad(), measurement_mode(net):
        ...     [m.training for m in net], torch.is_grad_enabled()
        ([True, False, False], True)
        >>> [m.training for m in net]
        [True, True, True]
    """
    policy = (None if batch_norm is None
              else parse_option(BatchNormPolicy, batch_norm, "batch_norm"))
    outer = active_policy(model)
    if outer is not None and policy in (None, outer) and not extra_types:
        yield model  # a nested entry point: the enclosing measurement holds
        return
    policy = policy or outer or BatchNormPolicy.EVAL
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    with ExitStack() as ctx:
        if torch.is_inference_mode_enabled():
            ctx.enter_context(torch.inference_mode(False))
        ctx.enter_context(torch.enable_grad())
        for device in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                ctx.enter_context(torch.autocast(device, enabled=False))
        ctx.enter_context(sdpa_kernel(SDPBackend.MATH))
        ctx.enter_context(MeasurementFunctionMode())
        ctx.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)
        ctx.enter_context(_module_state(model, policy, tuple(extra_types)))
        stack.append((model, policy))
        ctx.callback(stack.pop)
        yield model


@contextmanager
def _module_state(
    model: nn.Module, policy: BatchNormPolicy, extra_types: tuple[type[nn.Module], ...]
) -> Iterator[None]:
    """Set ``training`` (and ``track_running_stats`` under the batch policy) of the modules
    whose behaviour depends on it, and detach in-place compiled calls; restore all on exit."""
    stochastic = STOCHASTIC_MODULES + extra_types
    saved: list[tuple[nn.Module, str, object]] = []

    def put(module: nn.Module, attr: str, value: object) -> None:
        saved.append((module, attr, module.__dict__.get(attr, getattr(module, attr))))
        setattr(module, attr, value)

    try:
        for m in model.modules():
            if isinstance(m, _NormBase):
                if policy is BatchNormPolicy.BATCH:
                    put(m, "training", True)
                    put(m, "track_running_stats", False)  # batch statistics, no update
                else:
                    put(m, "training", False)
            elif isinstance(m, stochastic):
                put(m, "training", False)
            if getattr(m, "_compiled_call_impl", None) is not None:
                put(m, "_compiled_call_impl", None)  # module.compile(): measure eagerly
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
