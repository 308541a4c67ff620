"""Capture adapters: how a parameter's Kronecker factors are read off its module.

Everything curvlens measures from the parameter alone (gradient spectra, exact curvatures,
Hessian-block eigenvalues, the fits) works for every weight matrix of a model. The Kronecker
factors (and with them the alignment budget) also need what flowed through the parameter: its
input-side rows and its per-sample output gradients. A :class:`LayerSpec` says how to read those
for one ``(module type, parameter)`` pair; :func:`register_layer` adds one:

* ``nn.Linear`` ``weight`` ``[out, in]``: rows are output gradients, columns inputs;
* ``nn.Conv{1,2,3}d`` ``weight.flatten(1)`` ``[out, in/groups * prod(kernel)]``: rows are output
  gradients per location, columns unfolded patches;
* ``nn.Embedding`` ``weight`` ``[num, dim]``: rows are one-hot indices, columns output gradients;
* ``nn.MultiheadAttention``: the q, k and v row blocks of ``in_proj_weight`` (or the separate
  ``q_proj_weight``, ... when ``kdim``/``vdim`` differ) and ``out_proj.weight``, as
  ``nn.Linear``, read inside the module's own forward (:mod:`curvlens._attention`).

A matrix whose parameter has no adapter (an ``nn.LSTM`` weight, a bare ``nn.Parameter``) is
still measured; its budget is NaN with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from curvlens._conv_moments import conv2d_patch_moments

__all__ = [
    "LayerKind",
    "LayerSpec",
    "MatrixSlot",
    "layer_spec",
    "register_layer",
    "registered_adapters",
]


class LayerKind(str, Enum):
    """What a weight matrix is, for reports and for routing in the optimizer."""

    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    HEAD = "head"
    ATTENTION = "attention"
    RECURRENT = "recurrent"
    MATRIX = "matrix"


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """How curvlens captures the Kronecker factors of one ``(module type, parameter)``.

    The gradient of the matrix view is a sum of outer products of "input-side" rows and
    "gradient-side" rows. For Linear and Conv layers the input side spans the columns
    (``n``) and the gradient side the rows (``m``) of ``W``; for Embedding it is the other way
    round (one-hot indices pick rows of ``W``), which ``inputs_are_columns`` records.

    Attributes:
        kind: the report kind of such matrices.
        matrix: ``module -> W [m, n]``, a view of the weight (no copy).
        input_rows: ``(module, input) -> [N, n or m]``: input-side rows, one per weight
            application (conv: one unfolded patch per output location and group).
        grad_rows: ``(module, output_grad) -> [N, m or n]``: gradient-side rows.
        locations: ``(module, input) -> T``, weight applications per sample (conv: output
            locations; sequence inputs: tokens; plain Linear: 1).
        inputs_are_columns: whether the input side is the column (``n``) side of ``W``.
        attach: ``None`` for a module whose forward hook sees the parameter's input
            (``args[0]``) and output; else ``(module, {name: LayerInfo}, capture) -> handles``,
            which registers its own hooks and feeds ``capture.save_input(name, x, samples)``
            and ``capture.watch(name, call, y, select)`` (see :class:`curvlens.hooks.Capture`).
        input_moments: optional ``(module, input) -> PatchMoments or None``: a cheaper exact
            route to the input side's sum of ``r r^T`` than ``input_rows`` (``None``: not for
            this module or input); its ``add(out)`` adds the sum into a dense ``out [d, d]``
            in place (at least its upper triangle), rows and columns in its ``order``, and
            returns the number of rows (see
            :func:`curvlens._conv_moments.conv2d_patch_moments`).
    """

    kind: LayerKind
    matrix: Callable[[nn.Module], Tensor]
    input_rows: Callable[[nn.Module, Tensor], Tensor]
    grad_rows: Callable[[nn.Module, Tensor], Tensor]
    locations: Callable[[nn.Module, Tensor], int]
    inputs_are_columns: bool = True
    attach: Callable[..., list[Any]] | None = None
    input_moments: Callable[[nn.Module, Tensor], Any] | None = None


@dataclass(frozen=True)
class MatrixSlot:
    """One matrix a module exposes (what a matrix-view function returns).

    Attributes:
        param: the parameter's attribute path inside the module (``"in_proj_weight"``).
        label: the report name relative to the module (``""``: the module's own name).
        rows: ``(start, stop)`` rows of the parameter's 2-D view, or ``None`` for all.
        kind: the report kind (``None``: the adapter's kind, else ``matrix``).
    """

    param: str
    label: str
    rows: tuple[int, int] | None = None
    kind: LayerKind | None = None


_ADAPTERS: dict[tuple[type[nn.Module], str], LayerSpec] = {}


def register_layer(module_type: type[nn.Module], spec: LayerSpec, *, param: str = "weight") -> None:
    """Teach curvlens how to capture Kronecker factors for ``module_type``'s parameter ``param``.

    Subclasses of ``module_type`` match too (nearest type first). ``param`` is the parameter's
    attribute path inside the module (``"weight"``, ``"W_hh"``, ``"out_proj.weight"``); any
    trainable parameter with at least two dimensions is measured anyway, the adapter adds its
    Kronecker factors.

    Example:
        >>> import torch
        >>> from curvlens.adapters import LayerKind, LayerSpec, register_layer, layer_spec
        >>> class Scale(torch.nn.Linear):
        ...     pass
        >>> layer_spec(Scale(2, 3)).kind.value   # a subclass inherits Linear's handling
        'linear'
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer needs a LayerSpec, got {type(spec).__name__}")
    if not isinstance(param, str) or not param:
        raise ValueError(f"register_layer: param must be a parameter's attribute path, got "
                         f"{param!r}")
    _ADAPTERS[(module_type, param)] = spec


def layer_spec(module: nn.Module, param: str = "weight") -> LayerSpec | None:
    """The registered adapter of ``module``'s ``param`` (most derived type first), or ``None``."""
    for cls in type(module).__mro__:
        spec = _ADAPTERS.get((cls, param))
        if spec is not None:
            return spec
    return None


def registered_adapters() -> list[str]:
    """``["Linear.weight", ...]``: every registered (module type, parameter), for messages."""
    return sorted(f"{t.__name__}.{p}" for t, p in _ADAPTERS)


# --------------------------------------------------------------------------- built-in handlers


def _flat_matrix(module: nn.Module) -> Tensor:
    return module.weight.flatten(1)


def _linear_inputs(module: nn.Module, x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # [B*..., in]


def _last_dim_rows(module: nn.Module, g: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1])  # [B*..., out]


def _linear_locations(module: nn.Module, x: Tensor) -> int:
    return int(x[0].numel() // x.shape[-1]) if x.dim() > 1 else 1


def _conv_dim(module: nn.Module) -> int:
    return module.weight.dim() - 2


def _unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Patches of a conv input, ``[B, in * prod(kernel), T]`` in ``weight.flatten(1)`` order."""
    d = _conv_dim(module)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * d
    elif isinstance(module.padding, str):
        padding = _same_padding(module, x) if module.padding == "same" else (0,) * d
        if module.padding == "same":
            x = F.pad(x, padding)
            padding = (0,) * d
    else:
        padding = module.padding
    if d == 2:
        return F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    # 1d and 3d: unfold each spatial dimension with Tensor.unfold.
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    B, C = x.shape[:2]
    for i in range(d):
        k, s, dil = module.kernel_size[i], module.stride[i], module.dilation[i]
        span = dil * (k - 1) + 1
        x = x.unfold(2 + i, span, s)[..., ::dil]  # new trailing dim of size k
    # x: [B, C, L1..Ld, k1..kd] -> [B, C*k1..kd, L1*..*Ld]
    x = x.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))
    return x.reshape(B, C * math.prod(module.kernel_size), -1)


def _same_padding(module: nn.Module, x: Tensor) -> tuple[int, ...]:
    """Explicit ``F.pad`` amounts for ``padding="same"`` (stride 1), last dim first."""
    pads: list[int] = []
    for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = dil * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _conv_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Patch rows ``[B * T * groups, in/groups * prod(kernel)]``; groups stack as extra rows."""
    patches = _unfold(module, x)  # [B, in*K, T]
    B, _, T = patches.shape
    G = module.groups
    patches = patches.reshape(B, G, -1, T)  # [B, G, in/G*K, T]
    return patches.permute(0, 3, 1, 2).reshape(B * T * G, -1)


def _conv_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output-gradient rows ``[B * T, out]``."""
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def _conv_locations(module: nn.Module, x: Tensor) -> int:
    return int(_unfold(module, x[:1]).shape[-1])


def _embedding_onehot(module: nn.Module, x: Tensor) -> Tensor:
    onehot = F.one_hot(x.reshape(-1), module.num_embeddings)  # [B*..., num]
    return onehot.to(module.weight.dtype)


def _embedding_locations(module: nn.Module, x: Tensor) -> int:
    return int(x[0].numel()) if x.dim() > 1 else 1


_LINEAR = LayerSpec(
    kind=LayerKind.LINEAR,
    matrix=_flat_matrix,
    input_rows=_linear_inputs,
    grad_rows=_last_dim_rows,
    locations=_linear_locations,
)
_CONV = LayerSpec(
    kind=LayerKind.CONV,
    matrix=_flat_matrix,
    input_rows=_conv_inputs,
    grad_rows=_conv_grads,
    locations=_conv_locations,
    input_moments=conv2d_patch_moments,
)
_EMBEDDING = LayerSpec(
    kind=LayerKind.EMBEDDING,
    matrix=lambda module: module.weight,
    input_rows=_embedding_onehot,
    grad_rows=_last_dim_rows,
    locations=_embedding_locations,
    inputs_are_columns=False,
)

for _t, _s in ((nn.Linear, _LINEAR), (nn.Conv1d, _CONV), (nn.Conv2d, _CONV), (nn.Conv3d, _CONV),
               (nn.Embedding, _EMBEDDING)):
    register_layer(_t, _s)
