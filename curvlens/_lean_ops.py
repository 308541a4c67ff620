"""Ops whose second derivatives cost only what a Hessian-vector product needs.

torch differentiates a convolution's first derivative (``aten::convolution_backward``) with one
fused op that, whenever the gradient with respect to the input's derivative arrives, also computes
the derivative with respect to the weight, needed or not, and that always forms the derivative
with respect to the input of the weight's gradient. A Hessian-vector product on one weight matrix
of a CNN passes through every later convolution's first derivative, so it computed one unneeded
weight-sized convolution per later layer, and the derivative with respect to the matrix's own
input, which a product on its own block never needs: together about a third of the product on a
ResNet-18 (one CPU thread, batch 64). Likewise the double backward of batch norm with running
statistics (curvlens's default policy) forms every term of the general formula, though the op is
a per-channel affine map: a fifth of what remained.

While :class:`~curvlens._grad_graph.GradGraph` builds a gradient graph (the only place curvlens
keeps first derivatives for a second backward pass, :func:`second_order_graph`), the measurement
function mode replaces

* ``conv1d``/``conv2d``/``conv3d`` by :class:`_LeanConv`: the same forward op, and a first
  derivative written as two ops, a transposed convolution for the input and the weight gradient
  (:class:`_WeightGrad`), each of whose derivatives is formed only where the running backward
  pass will use it (a pass that wants one weight matrix's product forms neither the input's nor
  other weights' derivatives). The values are the same ops on the same tensors (bit-identical in
  the tests); the Hessian, off-diagonal blocks and tied weights included, is unchanged.
* ``batch_norm`` with running statistics by ``x * scale + shift`` with the per-channel scale and
  shift it applies (equal to torch's kernel up to rounding); with batch statistics it stays
  torch's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LEAN_OPS", "second_order_graph", "uses_batch_statistics"]

_STATE = threading.local()


@contextmanager
def second_order_graph() -> Iterator[None]:
    """While active (and the measurement function mode is), convolutions and batch norm with
    running statistics are recorded in the forms above, for a gradient graph that will be
    differentiated again."""
    previous, _STATE.active = getattr(_STATE, "active", False), True
    try:
        yield
    finally:
        _STATE.active = previous


def _pair(value: Any, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims


def _will_use(ctx: Any, index: int) -> bool:
    """Whether the running backward pass uses the derivative for input ``index`` of ``ctx``."""
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # a leaf under autograd.grad, or an older torch
        return True


class _LeanConv(torch.autograd.Function):
    """``aten::convolution`` (not transposed) with a first derivative of two separately
    differentiable ops (module docstring)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
        zeros = [0] * len(stride)
        return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False, zeros, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, b, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, w)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and _will_use(ctx, 0):
            gx = _input_grad(grad, x, w, ctx.conv)
        if ctx.needs_input_grad[1] and _will_use(ctx, 1):
            gw = _WeightGrad.apply(grad, x, w.detach(), stride, padding, dilation, groups)
        if ctx.needs_input_grad[2] and _will_use(ctx, 2):
            gb = grad.sum([0, *range(2, grad.dim())])
        return gx, gw, gb, None, None, None, None


def _input_grad(grad: Tensor, x: Tensor, w: Tensor, conv: tuple) -> Tensor:
    """The gradient ``[*x.shape]`` of ``<grad, conv(x, w)>`` with respect to ``x``: the
    transposed convolution of ``grad`` with ``w`` back to ``x``'s size (``output_padding``
    restores the rows a strided forward dropped); ``conv``: ``(stride, padding, dilation,
    groups)``."""
    stride, padding, dilation, groups = conv
    extra = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                               + dilation[i] * (w.shape[2 + i] - 1) + 1)
             for i in range(len(stride))]
    return torch.ops.aten.convolution(grad, w, None, stride, padding, dilation, True, extra,
                                      groups)


class _WeightGrad(torch.autograd.Function):
    """A convolution's weight gradient ``[*w.shape]`` from the output gradient ``grad`` and the
    input ``x``, whose own derivatives (for ``grad``: the convolution of ``x`` with the incoming
    weight-shaped tensor; for ``x``: its transposed convolution with ``grad``) are formed only
    where the running backward pass uses them (torch's forms the one for ``x`` regardless)."""

    @staticmethod
    def forward(grad: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
        zeros = [0] * len(stride)
        return torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, dilation,
                                                   False, zeros, groups, [False, True, False])[1]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        grad, x, w, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(grad, x)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple:
        grad, x = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        zeros = [0] * len(stride)
        d_grad = d_x = None
        if ctx.needs_input_grad[0] and _will_use(ctx, 0):
            d_grad = torch.ops.aten.convolution(x, gg, None, stride, padding, dilation, False,
                                                zeros, groups)
        if ctx.needs_input_grad[1] and _will_use(ctx, 1):
            d_x = _input_grad(grad, x, gg, ctx.conv)
        return d_grad, d_x, None, None, None, None, None


def _lean(op: Callable[..., Tensor], dims: int) -> Callable[..., Tensor]:
    def stand_in(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
        if not getattr(_STATE, "active", False) or isinstance(padding, str):
            return op(input, weight, bias, stride, padding, dilation, groups)

        def alias(t: Tensor | None) -> Tensor | None:
            # a view gives the backward a non-leaf node to ask the engine about
            return t.view_as(t) if t is not None and t.requires_grad else t

        return _LeanConv.apply(alias(input), alias(weight), alias(bias), _pair(stride, dims),
                               _pair(padding, dims), _pair(dilation, dims), int(groups))

    stand_in.__name__ = stand_in.__qualname__ = op.__name__
    stand_in.__doc__ = f"``{op.__name__}`` with a lean second derivative in a gradient graph."
    return stand_in


def uses_batch_statistics(input: Tensor, running_mean: Tensor | None = None,
                          running_var: Tensor | None = None, *args: Any, **kwargs: Any) -> bool:
    """Whether ``F.batch_norm`` called with these arguments normalizes with the batch's
    statistics (``training``, or no running statistics)."""
    training = kwargs.get("training", args[2] if len(args) > 2 else False)
    return bool(training) or running_mean is None or running_var is None


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm``; with running statistics (not ``training``) inside a gradient graph, the
    per-channel affine map it is, ``x * scale + shift``, as two elementwise ops."""
    if (not getattr(_STATE, "active", False)
            or uses_batch_statistics(input, running_mean, running_var, training=training)):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1, -1] + [1] * (input.dim() - 2)
    return input * scale.view(shape) + shift.view(shape)


#: ``{torch function: stand-in}`` for :data:`curvlens._substitutes.SUBSTITUTES`.
LEAN_OPS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.conv1d: _lean(F.conv1d, 1),
    F.conv2d: _lean(F.conv2d, 2),
    F.conv3d: _lean(F.conv3d, 3),
    F.batch_norm: _batch_norm,
}
