"""Twice-differentiable stand-ins for torch ops while curvlens measures, and clear errors.

Exact curvature needs second derivatives of the loss. A few torch ops have a first derivative
whose own derivative is not implemented (``aten::hardsigmoid_backward``: torchvision's
MobileNetV3 squeeze-excitation gate). While curvlens measures, :class:`MeasurementFunctionMode`
(a ``torch.overrides.TorchFunctionMode``) replaces such ops by equal-valued compositions of ops
that do have second derivatives (the module or functional call site is unchanged), and switches
off functional dropout (``F.dropout(..., training=True)`` in a custom module, the ``dropout_p``
of ``F.scaled_dot_product_attention``), so that the measured function is deterministic. Inside
a gradient graph built for Hessian-vector products it also records convolutions and batch norm
with running statistics in forms whose second derivatives skip unneeded work
(:mod:`curvlens._lean_ops`).

Where no substitute exists, :func:`explain_autograd_error` turns torch's "derivative for
aten::X is not implemented" into a message naming the op and the layer being measured.

torch's forward-over-forward derivatives of ``layer_norm``, ``instance_norm`` and ``batch_norm``
with batch statistics are wrong (the second-order tangent misses the dependence of the mean and
variance on the input; double backward is right). The mode records these calls inside
:func:`watch_forward_unsafe`, so that forward-mode curvature is never used through them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvlens._lean_ops import LEAN_OPS, uses_batch_statistics

__all__ = [
    "FORWARD_UNSAFE",
    "SUBSTITUTES",
    "MeasurementFunctionMode",
    "NoDerivativeError",
    "explain_autograd_error",
    "watch_forward_unsafe",
]


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(x + 3) / 6``: torch's hardsigmoid kernel computes exactly this (same values, same
    first derivative), and ``relu6`` has a second derivative (zero almost everywhere)."""
    out = F.relu6(input + 3.0) / 6.0
    return input.copy_(out) if inplace else out


def _identity_dropout(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Dropout switched off: the input itself (also for ``inplace=True``)."""
    return input


def _sdpa_without_dropout(query: Tensor, key: Tensor, value: Tensor, *args: Any,
                          **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` with ``dropout_p = 0``."""
    if args:  # (attn_mask, dropout_p, is_causal, scale, enable_gqa) positionally
        args = (args[0], 0.0, *args[2:]) if len(args) > 1 else args
    if "dropout_p" in kwargs:
        kwargs = {**kwargs, "dropout_p": 0.0}
    return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)  # mode popped here


#: ``{torch function: stand-in}`` applied while measuring. Each stand-in takes the function's
#: arguments and returns what the function returns, computed by twice-differentiable ops (or
#: with the randomness of dropout switched off).
SUBSTITUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.hardsigmoid: _hardsigmoid,
    F.dropout: _identity_dropout,
    F.dropout1d: _identity_dropout,
    F.dropout2d: _identity_dropout,
    F.dropout3d: _identity_dropout,
    F.alpha_dropout: _identity_dropout,
    F.feature_alpha_dropout: _identity_dropout,
    F.scaled_dot_product_attention: _sdpa_without_dropout,
    **LEAN_OPS,  # same values; leaner second derivatives inside a gradient graph
}


def _normalizes_over_samples(*args: Any, **kwargs: Any) -> bool:
    return True


#: ``{torch function: predicate on its arguments}``: calls whose forward-over-forward
#: derivative torch computes wrongly (module docstring).
FORWARD_UNSAFE: dict[Callable[..., Any], Callable[..., bool]] = {
    F.layer_norm: _normalizes_over_samples,
    torch.layer_norm: _normalizes_over_samples,
    torch.native_layer_norm: _normalizes_over_samples,
    F.instance_norm: _normalizes_over_samples,
    torch.instance_norm: _normalizes_over_samples,
    F.batch_norm: uses_batch_statistics,
}

_WATCH = threading.local()


@contextmanager
def watch_forward_unsafe() -> Iterator[list[str]]:
    """Collect the names of :data:`FORWARD_UNSAFE` calls made in the block (while the
    measurement function mode is active)."""
    previous, _WATCH.seen = getattr(_WATCH, "seen", None), []
    try:
        yield _WATCH.seen
    finally:
        _WATCH.seen = previous


class MeasurementFunctionMode(TorchFunctionMode):
    """Replaces the functions in :data:`SUBSTITUTES` by their stand-ins while active.

    Calls made from inside a Python-level torch function that the mode handles (e.g.
    ``F.multi_head_attention_forward``) are not seen again, as for every torch function mode;
    the dropout of ``nn.MultiheadAttention`` is switched off by its ``training`` flag instead.

    Example:
        >>> import torch
        >>> x = torch.linspace(-4, 4, 9, requires_grad=True)
        >>> with MeasurementFunctionMode():
        ...     y = torch.nn.functional.hardsigmoid(x)
        ...     g, = torch.autograd.grad(y.sum(), x, create_graph=True)
        >>> torch.autograd.grad(g.sum(), x)[0].abs().sum().item()  # a second derivative exists
        0.0
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in SUBSTITUTES and func not in FORWARD_UNSAFE:  # nearly every call
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        seen = getattr(_WATCH, "seen", None)
        unsafe = FORWARD_UNSAFE.get(func)
        if seen is not None and unsafe is not None and unsafe(*args, **kwargs):
            seen.append(getattr(func, "__name__", str(func)))
        stand_in = SUBSTITUTES.get(func)
        if stand_in is not None:
            return stand_in(*args, **kwargs)
        return func(*args, **kwargs)


_NO_DERIVATIVE = re.compile(r"derivative for (\S+?) is not implemented")
_NO_FORWARD_AD = re.compile(r"forward AD with (\S+?) that does not support it")


class NoDerivativeError(RuntimeError):
    """An op in the measured function lacks the derivative that exact curvature needs."""


def explain_autograd_error(err: BaseException, where: str) -> NoDerivativeError | None:
    """A :class:`NoDerivativeError` naming the op and ``where``, for torch's errors about an op
    without a second (or forward-mode) derivative; ``None`` for any other error.

    Example:
        >>> e = RuntimeError("derivative for aten::foo_backward is not implemented")
        >>> print(explain_autograd_error(e, "layer 'conv1'"))  # doctest: +ELLIPSIS
        layer 'conv1': the op aten::foo_backward ... has no second derivative in torch...
    """
    if isinstance(err, NoDerivativeError):
        return err
    text = str(err)
    backward, forward = _NO_DERIVATIVE.search(text), _NO_FORWARD_AD.search(text)
    if backward is None and forward is None:
        return None
    op = (backward or forward).group(1).rstrip(".,")
    stand_ins = sorted(f.__name__ for f in SUBSTITUTES if f not in LEAN_OPS)
    what = ("has no second derivative in torch, so the exact Hessian products curvlens needs "
            "cannot be formed" if backward is not None else
            "has no forward-mode derivative in torch (use method='hvp' or 'auto')")
    return NoDerivativeError(
        f"{where}: the op {op} (used in the model's forward pass or its first derivative) "
        f"{what}; replace that op by a twice-differentiable form of it, or leave this layer out "
        f"(curvlens itself substitutes {stand_ins} while "
        "measuring)"
    )
