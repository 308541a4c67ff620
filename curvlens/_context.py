"""What every measuring entry point does before it measures: the model, the batch, the notes.

:func:`measuring` resolves the module to measure (the original module of a ``torch.compile``
wrapper; a float32 copy of a half-precision model where the caller allows it), prepares the
batch (inference-mode tensors cloned into ordinary ones, half-precision inputs of an upcast model
converted), enters :func:`curvlens._modes.measurement_mode` and says in words what it changed,
for the report. With ``diagnose=True`` it also checks whether the model's outputs are nearly the
same for every sample under running batch-norm statistics, and names the batch-norm layer whose
running statistics are furthest from the batch's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from curvlens._modes import (
    AUTOCAST_DEVICES,
    STOCHASTIC_MODULES,
    BatchNormPolicy,
    active_policy,
    measurement_mode,
)

__all__ = [
    "HALF_DTYPES",
    "Measurement",
    "check_hooks_fired",
    "hooks_silent_error",
    "is_compiled",
    "measuring",
    "unwrap_compiled",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Relative spread of the outputs over the batch below which they count as constant.
CONSTANT_OUTPUT_SPREAD = 1e-4


@dataclass
class Measurement:
    """The prepared measurement: what to measure, on which batch, and what was changed.

    Attributes:
        model: the module measured (the caller's, its ``_orig_mod``, or a float32 copy).
        inputs: positional inputs of ``model``; targets: passed to the loss.
        policy: the batch-norm policy in force.
        notes: sentences for the report on how it was measured.
        warnings: sentences for the report about a measurement that may mislead.
    """

    model: nn.Module
    inputs: tuple[Any, ...]
    targets: Any
    policy: BatchNormPolicy
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, reports: Iterable[Any]) -> None:
        """Put :attr:`warnings` first in every report's ``warnings`` and issue each once."""
        for rep in reports:
            rep.warnings[:0] = self.warnings
        for message in self.warnings:
            warnings.warn(message, stacklevel=3)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile`` wrapper (``OptimizedModule``), else ``model``.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_compiled(net) is net
        True
    """
    while type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        model = model._orig_mod
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper or holds a module compiled in place."""
    if unwrap_compiled(model) is not model:
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def check_hooks_fired(capture: Any, layers: dict[str, Any], step: int, compiled: bool) -> None:
    """Raise when no hook of ``capture`` (a lens's :class:`~curvlens.hooks.Capture`, or ``None``)
    saw a forward pass although the layers have gradients: the running factors would silently
    stay empty (e.g. a model compiled before the hooks were added)."""
    if capture is None or any(record.inputs for record in capture.records.values()):
        return
    if any(info.weight.grad is not None for info in layers.values()):
        raise hooks_silent_error(list(layers), step, compiled)


def hooks_silent_error(layers: list[str], step: int, compiled: bool) -> RuntimeError:
    """The error of a recording step on which no forward hook fired (see the lens)."""
    cause = (
        "The model is compiled (torch.compile), and torch.compile ignores forward hooks added "
        "after the compiled model first ran: enter `with lens:` before the first call of the "
        "compiled model (the lens may be built before or after compiling), or call "
        "torch.compiler.reset() after entering it so that it recompiles with the hooks"
        if compiled else
        "Run the forward pass inside `with lens:`; if training calls a torch.compile'd version "
        "of the model, enter `with lens:` before its first call (torch.compile ignores hooks "
        "added later) or call torch.compiler.reset() after entering it"
    )
    shown = f"{layers[:3]}{'...' if len(layers) > 3 else ''}"
    return RuntimeError(
        f"CurvatureLens.step() at step {step}: the layers have gradients but no forward hook of "
        f"the lens fired during this step (layers {shown}), so no Kronecker factors can be "
        f"recorded. {cause}. Or pass kronecker='none' to record gradient spectra only"
    )


@contextmanager
def measuring(
    model: nn.Module,
    inputs: tuple[Any, ...],
    targets: Any,
    *,
    where: str,
    batch_norm: BatchNormPolicy | str | None = None,
    upcast: bool = False,
    diagnose: bool = False,
) -> Iterator[Measurement]:
    """Enter the measurement context for ``model`` on one batch (module docstring).

    Args:
        model: the caller's model (a ``torch.compile`` wrapper is unwrapped).
        inputs: positional inputs; targets: the loss's targets.
        where: names the caller in error messages.
        batch_norm: :class:`~curvlens._modes.BatchNormPolicy`, or ``None`` (the enclosing
            measurement's, else ``"eval"``).
        upcast: measure a float32 copy of a model with float16/bfloat16 parameters; otherwise
            such a model raises.
        diagnose: check for batch-constant outputs under running batch-norm statistics.

    Raises:
        TypeError: half-precision parameters and ``upcast=False``.
        RuntimeError: a parameter or buffer that is an inference tensor.
    """
    notes: list[str] = []
    original = model
    model = unwrap_compiled(model)
    if model is not original:
        notes.append("torch.compile'd model: measured on its original module, run eagerly")
    nested = active_policy(model) is not None
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in HALF_DTYPES})
    if half and not upcast:
        raise TypeError(
            f"{where}: the model has {', '.join(half)} parameters; exact curvature needs "
            "float32 or float64 arithmetic. Measure a float32 copy (copy.deepcopy(model).float()"
            ") or use curvlens.analyze_model / CurvatureLens.analyze, which do that themselves"
        )
    _check_no_inference_tensors(model, where)
    if not nested:
        notes += _caller_context_notes()
    if half:
        model = _float32_copy(model, where)
        notes.append(f"the model's {', '.join(half)} parameters were measured on a float32 copy"
                     " of the model (results are float32)")
    with measurement_mode(model, batch_norm=batch_norm):
        policy = active_policy(model)
        args = tuple(_prepare(x, bool(half)) for x in inputs)
        ms = Measurement(model, args, _prepare(targets, False), policy, notes)
        if not nested:
            ms.notes.append(_mode_note(model, policy))
            if diagnose and policy is BatchNormPolicy.EVAL:
                ms.warnings += _batch_norm_diagnosis(model, args)
        yield ms


def _caller_context_notes() -> list[str]:
    notes = []
    on = [f"{d} ({torch.get_autocast_dtype(d)})" for d in AUTOCAST_DEVICES
          if torch.is_autocast_enabled(d)]
    if on:
        notes.append(f"autocast was on at the call ({', '.join(on)}); switched off while "
                     "measuring: measured in the model's own precision")
    if torch.is_inference_mode_enabled():
        notes.append("called under torch.inference_mode(): measured with gradients enabled on "
                     "ordinary copies of the inference-mode inputs")
    elif not torch.is_grad_enabled():
        notes.append("called under torch.no_grad(): gradients enabled while measuring")
    return notes


def _mode_note(model: nn.Module, policy: BatchNormPolicy) -> str:
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _NormBase)})
    drops = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, STOCHASTIC_MODULES)})
    parts = ["dropout off" + (f" ({', '.join(drops)} in eval mode)" if drops else "")]
    if norms and policy is BatchNormPolicy.EVAL:
        parts.append(f"batch-norm in eval mode (batch_norm='eval': {', '.join(norms)} "
                     "normalized with their running statistics)")
    elif norms:
        parts.append(f"batch-norm on batch statistics (batch_norm='batch': {', '.join(norms)} "
                     "normalized with the measured batch's statistics, running statistics not "
                     "updated; samples are coupled through them)")
    return "measured with " + "; ".join(parts)


def _check_no_inference_tensors(model: nn.Module, where: str) -> None:
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_inference():
                raise RuntimeError(
                    f"{where}: {kind} {name!r} is an inference tensor (created or loaded under "
                    "torch.inference_mode()); autograd cannot use it. Create or load the model "
                    "outside torch.inference_mode()"
                )


def _prepare(x: Any, to_float32: bool) -> Any:
    """An ordinary (non-inference) tensor; half floats to float32 for an upcast model."""
    if not isinstance(x, Tensor):
        return x
    if x.is_inference():
        x = x.clone()
    if to_float32 and x.dtype in HALF_DTYPES:
        x = x.float()
    return x


def _float32_copy(model: nn.Module, where: str) -> nn.Module:
    """A deep copy of ``model`` whose float16/bfloat16 parameters and buffers are float32
    (other tensors are shared with ``model``, not copied); tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = (nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                       if p.dtype in HALF_DTYPES else p)
    for b in model.buffers():
        memo[id(b)] = b.float() if b.dtype in HALF_DTYPES else b
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:  # an attribute deepcopy cannot copy
        raise TypeError(
            f"{where}: cannot copy the half-precision model to float32 for measuring "
            f"({type(err).__name__}: {err}); convert it yourself (model.float()) and pass "
            "float32 inputs"
        ) from None


def _batch_norm_diagnosis(model: nn.Module, args: tuple[Any, ...]) -> list[str]:
    """Warn when eval-mode outputs are (nearly) the same for every sample, naming the norm layer
    whose running statistics differ most from the batch's."""
    norms = {n: m for n, m in model.named_modules()
             if isinstance(m, _NormBase) and m.running_var is not None}
    if not norms or not isinstance(args[0], Tensor) or args[0].dim() == 0 or len(args[0]) < 2:
        return []
    ratios: dict[str, float] = {}

    def hook_for(name: str):
        def pre_hook(module: nn.Module, inp: tuple) -> None:
            x = inp[0]
            if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2:
                dims = [d for d in range(x.dim()) if d != 1]
                var = x.detach().double().var(dim=dims, unbiased=False)  # [C]
                ratio = (var + module.eps) / (module.running_var.double() + module.eps)
                ratios[name] = float(ratio.log().abs().max().exp())
        return pre_hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in norms.items()]
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception:  # the measurement itself reports what fails
        return []
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() == 0:
        return []
    out = out.detach().double().reshape(len(out), -1)
    spread = float((out - out.mean(0)).norm() / out.norm().clamp_min(1e-300))
    if not spread < CONSTANT_OUTPUT_SPREAD:
        return []
    worst = max(ratios, key=lambda n: ratios[n]) if ratios else None
    which = "" if worst is None else (
        f"; the largest mismatch is in {worst!r}, where the batch's variance differs from the "
        f"running variance by a factor of up to {ratios[worst]:.3g}")
    return [
        f"the model's outputs are nearly the same for every sample of the batch (relative spread "
        f"{spread:.2g}) with batch-norm in eval mode: the running statistics do not describe "
        f"this data (few training steps, or a small momentum){which}. Gradients and curvatures "
        "are then round-off sized; measure with batch_norm='batch'"
    ]
