r"""Exact Hessian-vector products of a model's loss: one layer block or all parameters.

Notation: a layer's weight is an ``m x n`` matrix ``W`` (conv: ``flatten(1)``),
``L`` the mean loss over a fixed batch, ``H_WW`` the diagonal Hessian block of ``W`` (all other
parameters held fixed), ``D_k = u_k v_k^T``. The main paper ("Spectral Asymptotics of Neural
Network Loss Landscapes: An Exact Decomposition of the Curvature Exponent", Calvo, 2026,
arXiv:2606.02596) measures the directional curvature ``h_k = vec(D_k)^T H_WW vec(D_k)`` along the
gradient's singular directions; this module computes it exactly, never by finite differences:

* products ``H v`` by double backward: the gradient graph is built once and every product is one
  more backward pass (``is_grads_batched`` for several vectors at once);
* ``h_k`` by forward-over-forward differentiation ``d^2/dt^2 L(W + t D_k)`` at ``t = 0``
  (``torch.func.jvp`` of ``jvp``, vmapped over ``k``), which needs no backward pass and no
  stored activations; the HVP route is the fallback and a cross-check.

Every function measures inside :func:`measurement_mode` (autocast off, gradients on, the math
attention kernel, twice-differentiable stand-ins, dropout off, batch-norm per ``batch_norm``).
Eigenvalues, trace and density of these operators are in :mod:`curvlens.hessian_spectrum`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from curvlens._context import measuring, unwrap_compiled
from curvlens._functional_model import (
    Inputs,
    as_tuple,
    check_batch,
    check_loss,
    loss_with,
    no_fused_attention,
    param_name,
    trainable_parameters,
)
from curvlens._grad_graph import GradGraph, LossFn, hvp_curvature, layer_hvp
from curvlens._modes import BatchNormPolicy, measurement_mode
from curvlens._substitutes import (
    explain_autograd_error,
    watch_forward_unsafe,
)
from curvlens.layers import LayerInfo, resolve_layer

__all__ = [
    "CurvatureMethod",
    "GradGraph",
    "block_hvp",
    "directional_curvature",
    "layer_hvp",
    "measurement_mode",
    "model_hvp",
]


class CurvatureMethod(str, Enum):
    """How :func:`directional_curvature` differentiates."""

    AUTO = "auto"  # forward-over-forward, falling back to HVP for ops without forward AD
    FORWARD = "forward"
    HVP = "hvp"


def _layer(model: nn.Module, layer: str | nn.Module | LayerInfo) -> tuple[LayerInfo, str]:
    info = resolve_layer(model, layer)
    return info, f"layer {info.name!r}"


def _check_tensor(x: Any, shape: tuple[int | None, ...], ref: Tensor, where: str, what: str):
    """Shape (``None`` = any size), device and dtype of ``x`` against the weight ``ref``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {what} must be a tensor, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = "[" + ", ".join("k" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{where}: {what} must have shape {want}, got {list(x.shape)}")
    if x.device != ref.device:
        raise ValueError(
            f"{where}: {what} is on {x.device} but the weight is on {ref.device}; move it with "
            f"{what}.to(weight.device)"
        )
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{where}: {what} has dtype {x.dtype} but the weight has {ref.dtype}; convert it "
            f"with {what}.to(weight.dtype)"
        )


def _check_max_batch(max_batch: int | None) -> None:
    if max_batch is not None and not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")


def block_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    layer: str | nn.Module | LayerInfo,
    V: Tensor,
    *,
    max_batch: int | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> Tensor:
    r"""Exact products ``H_WW V_k`` with the Hessian block of one layer's weight.

    Args:
        model: the model; measured inside :func:`measurement_mode`.
        loss_fn: ``(model(*inputs), targets) -> scalar``, the mean loss over the batch.
        inputs: the batch, a tensor or a tuple of tensors (``model(*inputs)``).
        targets: passed to ``loss_fn`` as is.
        layer: a weight matrix (report name, module or :class:`~curvlens.layers.LayerInfo`).
        V: ``[k, m, n]`` directions in the layer's matrix view, same device and dtype as the
            weight.
        max_batch: at most this many directions per batched backward pass (memory budget);
            ``None`` does all ``k`` at once.
        batch_norm: ``"eval"`` (running statistics) or ``"batch"`` (the batch's statistics,
            running statistics untouched); ``None``: an enclosing measurement's, else ``"eval"``.

    Returns:
        ``[k, m, n]``: ``H_WW V_k`` for each ``k``, in the matrix view.

    Raises:
        ValueError: ``V`` of the wrong shape or device, an empty batch, a non-scalar loss.
        TypeError: ``V`` of another dtype than the weight; a float16/bfloat16 model.
        RuntimeError: the loss is NaN or infinite; an op without a second derivative (named).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> HV = block_hvp(net, nn.MSELoss(), x, y, "0", torch.randn(4, 2, 3, dtype=torch.float64))
        >>> HV.shape
        torch.Size([4, 2, 3])
    """
    model = unwrap_compiled(model)
    info, where = _layer(model, layer)
    m, n = info.matrix_shape
    w = info.weight
    _check_tensor(V, (None, m, n), w, where, "V")
    _check_max_batch(max_batch)
    args = as_tuple(inputs)
    check_batch(args, where)
    k = V.shape[0]
    if k == 0:
        return torch.zeros_like(V)
    with measuring(model, args, targets, where=where, batch_norm=batch_norm) as ms:
        graph = GradGraph(model, loss_fn, ms.inputs, ms.targets, [w], where)
        chunks = [layer_hvp(graph, info, c) for c in V.split(max_batch or k)]
    return torch.cat(chunks)


def directional_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    layer: str | nn.Module | LayerInfo,
    U: Tensor,
    V: Tensor,
    *,
    method: CurvatureMethod | str = CurvatureMethod.AUTO,
    max_batch: int | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> Tensor:
    r"""Exact curvature ``h_k = vec(u_k v_k^T)^T H_WW vec(u_k v_k^T)`` along rank-one directions.

    Args:
        model: the model; measured inside :func:`measurement_mode`.
        loss_fn: ``(model(*inputs), targets) -> scalar`` mean loss.
        inputs: the batch, a tensor or a tuple of tensors.
        targets: passed to ``loss_fn``.
        layer: a weight matrix (report name, module or ``LayerInfo``).
        U: ``[m, k]`` left vectors (e.g. left singular vectors of the gradient).
        V: ``[n, k]`` right vectors.
        method: ``"forward"`` (second directional derivative by forward-over-forward ``jvp``,
            vmapped over ``k``), ``"hvp"`` (double-backward products contracted with ``D_k``), or
            ``"auto"`` (forward, falling back to hvp where an op lacks forward-mode AD or where
            torch's second forward derivative is wrong: layer/instance norm, batch-norm on batch
            statistics).
        max_batch: at most this many directions at once.
        batch_norm: ``"eval"`` (running statistics) or ``"batch"`` (the batch's statistics,
            running statistics untouched); ``None``: an enclosing measurement's, else ``"eval"``.

    Returns:
        ``[k]``: ``h_k`` (may be negative: the Hessian block is indefinite in general).

    Raises:
        ValueError: ``U``/``V`` shapes or devices wrong, bad ``method``, empty batch.
        TypeError: ``U``/``V`` dtype differs from the weight's; a float16/bfloat16 model.
        RuntimeError: NaN/Inf loss; an op without a second derivative (named).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> U, V = torch.eye(2, 1, dtype=torch.float64), torch.eye(3, 1, dtype=torch.float64)
        >>> h = directional_curvature(net, nn.MSELoss(), x, y, "0", U, V)
        >>> bool(torch.isclose(h[0], (x[:, 0] ** 2).mean()))   # MSELoss averages over 2 outputs
        True
    """
    model = unwrap_compiled(model)
    info, where = _layer(model, layer)
    m, n = info.matrix_shape
    w = info.weight
    _check_tensor(U, (m, None), w, where, "U")
    _check_tensor(V, (n, None), w, where, "V")
    if U.shape[1] != V.shape[1]:
        raise ValueError(
            f"{where}: U [m, k] and V [n, k] need the same k, got {U.shape[1]} and {V.shape[1]}"
        )
    try:
        method = CurvatureMethod(method)
    except ValueError:
        raise ValueError(
            f"method must be one of {[c.value for c in CurvatureMethod]}, got {method!r}"
        ) from None
    _check_max_batch(max_batch)
    args = as_tuple(inputs)
    check_batch(args, where)
    step = max_batch or max(1, U.shape[1])  # directions [c, m, n] built a chunk at a time
    chunks = [(U[:, i:i + step], V[:, i:i + step]) for i in range(0, U.shape[1], step)]
    with measuring(model, args, targets, where=where, batch_norm=batch_norm) as ms:
        args, targets = ms.inputs, ms.targets
        if method is not CurvatureMethod.HVP:
            try:
                return _curvature_forward(model, loss_fn, args, targets, info, chunks, where)
            except (RuntimeError, NotImplementedError) as err:
                if method is CurvatureMethod.FORWARD:
                    explained = explain_autograd_error(err, where)
                    if explained is None:
                        raise
                    raise explained from err
        graph = GradGraph(model, loss_fn, args, targets, [w], where)
        return hvp_curvature(graph, info, U, V, step)


def _curvature_forward(
    model: nn.Module,
    loss_fn: LossFn,
    args: tuple[Any, ...],
    targets: Any,
    info: LayerInfo,
    chunks: list[tuple[Tensor, Tensor]],
    where: str,
) -> Tensor:
    """``d^2/dt^2 L(W + t D_k)`` at ``t = 0`` by jvp-of-jvp, vmapped over each chunk of
    directions ``D_k = u_k v_k^T``."""
    w = info.weight
    name = param_name(model, w, where)
    with torch.no_grad(), no_fused_attention():
        with watch_forward_unsafe() as unsafe:
            check_loss(loss_with(model, loss_fn, args, targets), where)
        if unsafe:
            raise RuntimeError(
                f"{where}: forward-over-forward differentiation through {sorted(set(unsafe))} "
                "is wrong in torch (it misses how the normalization statistics move); use "
                "method='hvp' or 'auto' (which then uses exact double-backward products)"
            )
        w0 = w.detach()

        def loss_at(wt: Tensor) -> Tensor:
            return loss_with(model, loss_fn, args, targets, {name: wt})

        def second(d: Tensor) -> Tensor:
            def first(wt: Tensor) -> Tensor:
                return jvp(loss_at, (wt,), (d,))[1]

            return jvp(first, (w0,), (d,))[1]

        # [c, *weight.shape]: a row block sits in its rows
        return torch.cat([vmap(second)(info.embed(torch.einsum("mk,nk->kmn", u, v))).reshape(-1)
                          for u, v in chunks] or [w.new_zeros(0)])


def model_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    v: Tensor,
    *,
    max_batch: int | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> Tensor:
    r"""Exact product of the whole-model Hessian with a flat vector.

    The flat layout is the trainable parameters (``requires_grad``) in
    ``model.named_parameters()`` order, each flattened, tied tensors once; ``P`` is their total
    size.

    Args:
        model: the model; measured inside :func:`measurement_mode`.
        loss_fn: ``(model(*inputs), targets) -> scalar`` mean loss.
        inputs: the batch, a tensor or a tuple of tensors.
        targets: passed to ``loss_fn``.
        v: ``[P]``, or ``[b, P]`` for ``b`` vectors at once.
        max_batch: at most this many vectors per backward pass.
        batch_norm: ``"eval"`` (running statistics) or ``"batch"`` (the batch's statistics,
            running statistics untouched); ``None``: an enclosing measurement's, else ``"eval"``.

    Returns:
        ``H v`` with the shape of ``v``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model_hvp(net, nn.MSELoss(), x, y, torch.ones(4, dtype=torch.float64)).shape
        torch.Size([4])
    """
    model = unwrap_compiled(model)
    params = list(trainable_parameters(model).values())
    where = f"model {type(model).__name__}"
    if not params:
        raise ValueError(f"{where}: no trainable parameters (all have requires_grad=False)")
    P = sum(p.numel() for p in params)
    _check_tensor(v, (P,) if v.dim() == 1 else (None, P), params[0], where, "v")
    _check_max_batch(max_batch)
    args = as_tuple(inputs)
    check_batch(args, where)
    with measuring(model, args, targets, where=where, batch_norm=batch_norm) as ms:
        graph = GradGraph(model, loss_fn, ms.inputs, ms.targets, params, where)
        if v.dim() == 1:
            return flat_hvp(graph, v)
        if len(v) == 0:
            return torch.zeros_like(v)
        return torch.cat([flat_hvp(graph, c) for c in v.split(max_batch or len(v))])


def flat_hvp(graph: GradGraph, v: Tensor) -> Tensor:
    """``H v`` for flat ``v [P]`` or row-batched ``v [b, P]`` over ``graph.params``."""
    batch = v.shape[:-1]
    pieces = v.split([p.numel() for p in graph.params], dim=-1)
    vs = [x.reshape(*batch, *p.shape).to(p.dtype) for x, p in zip(pieces, graph.params)]
    out = graph.hvp(vs, batched=bool(batch))
    return torch.cat([o.reshape(*batch, -1) for o in out], dim=-1).to(v.dtype)
