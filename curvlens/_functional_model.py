"""The loss of a model as a function of some of its parameters, with input checks.

Shared plumbing of :mod:`curvlens.hessian`: the batch's loss ``L = loss_fn(model(*inputs),
targets)`` (a mean over the batch), evaluated either on the module's own
parameters (for double backward) or with some parameters replaced through
``torch.func.functional_call`` (for forward-mode transforms). Tied parameters are handled by
identity: a tensor shared by several modules appears once, and replacing it replaces every use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Inputs",
    "no_fused_attention",
    "as_tuple",
    "check_batch",
    "checked_loss",
    "loss_with",
    "param_name",
    "trainable_parameters",
]

Inputs = Tensor | Sequence[Tensor]


def as_tuple(inputs: Inputs) -> tuple[Any, ...]:
    """``inputs`` as the positional arguments of ``model(*inputs)``."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise TypeError(
        f"inputs must be a tensor or a tuple of tensors (model(*inputs)), got "
        f"{type(inputs).__name__}"
    )


def check_batch(inputs: tuple[Any, ...], where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` for an empty batch (a tensor with 0 rows)."""
    if not inputs:
        raise ValueError(f"{where}: no inputs given; pass the batch as a tensor or a tuple")
    for x in inputs:
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 0:
            raise ValueError(
                f"{where}: empty batch (an input of shape {tuple(x.shape)}); curvature is "
                "measured on at least one sample"
            )


@contextmanager
def no_fused_attention() -> Iterator[None]:
    """Turn off the fused inference kernels of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` (taken when gradients are off, which forward-mode
    differentiation needs): they have no forward-mode derivative, the plain path has."""
    flag = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(flag)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the parameters with ``requires_grad``, each tensor once, in
    ``model.named_parameters()`` order: the layout of flat whole-model vectors ``[P]``."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_name(model: nn.Module, tensor: Tensor, where: str) -> str:
    """The (first) qualified name under which ``tensor`` is a parameter of ``model``."""
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    raise ValueError(f"{where}: the weight is not a parameter of the model")


def loss_with(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: tuple[Any, ...],
    targets: Any,
    replace: dict[str, Tensor] | None = None,
) -> Tensor:
    """``loss_fn(model(*inputs), targets)``, with ``replace``'s tensors standing in for the
    named parameters (tied uses follow), through ``functional_call`` when ``replace`` is given."""
    if replace:
        out = functional_call(model, replace, inputs, tie_weights=True, strict=False)
    else:
        out = model(*inputs)
    return loss_fn(out, targets)


def checked_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: tuple[Any, ...],
    targets: Any,
    where: str,
) -> Tensor:
    """The plain loss (graph attached), raising with ``where`` when it is not a finite scalar."""
    loss = loss_with(model, loss_fn, inputs, targets)
    check_loss(loss, where)
    return loss


def check_loss(loss: Any, where: str) -> None:
    """Raise when ``loss`` is not a finite real scalar tensor."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{where}: loss_fn must return a scalar tensor (the mean loss over the batch), "
            f"got {got}"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise RuntimeError(
            f"{where}: the loss is {float(loss.detach()):g} on this batch; curvature is "
            "undefined. Check the inputs, targets and weights for NaN/Inf or lower the "
            "learning rate"
        )


def check_fixed_batch(inputs: tuple, targets: Any, device: torch.device, dtype: torch.dtype,
                where: str) -> None:
    """Raise when a fixed batch is empty, on another device than ``device``, or has floating
    inputs of another dtype than the model's ``dtype``; messages start with ``where``."""
    for i, x in enumerate((*inputs, targets)):
        what = "targets" if i == len(inputs) else f"inputs[{i}]"
        if not isinstance(x, Tensor):
            continue
        if x.dim() > 0 and x.shape[0] == 0:
            raise ValueError(
                f"{where} got an empty batch ({what} has shape {tuple(x.shape)}); "
                "pass a fixed batch with at least one sample"
            )
        if x.device.type != device.type or (
            device.index is not None and x.device.index not in (None, device.index)
        ):
            raise ValueError(
                f"{where}: {what} is on {x.device} but the model is on {device}; "
                f"move the batch with .to({str(device)!r}) or pass CurvatureLens(device=...)"
            )
        if what != "targets" and x.is_floating_point() and x.dtype != dtype:
            raise TypeError(
                f"{where}: {what} has dtype {x.dtype} but the model's weights are "
                f"{dtype}; convert the batch with .to({dtype})"
            )
