"""Which modules curvlens measures, and how each one's weight is seen as a matrix.

A supported layer has a weight that curvlens views as an ``m x n`` matrix ``W``:

===================  =====================================  ==========================
module               matrix view ``W``                       Kronecker sides
===================  =====================================  ==========================
``nn.Linear``        ``weight`` ``[out, in]``                rows: output grads,
                                                             columns: inputs
``nn.Conv{1,2,3}d``  ``weight.flatten(1)``                   rows: output grads per
                     ``[out, in/groups * prod(kernel)]``     location, columns: patches
``nn.Embedding``     ``weight`` ``[num, dim]``               rows: one-hot indices,
                                                             columns: output grads
===================  =====================================  ==========================

New module types are added with :func:`register_layer`; the rest of curvlens looks them up in
the registry and never branches on module types itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch.nn.functional as F
from torch import Tensor, nn

from curvlens._options import parse_option

__all__ = [
    "LayerKind",
    "LayerSpec",
    "LayerInfo",
    "OnUnsupported",
    "register_layer",
    "layer_spec",
    "find_layers",
    "resolve_layer",
    "weight_matrix",
]


class LayerKind(str, Enum):
    """What a layer is, for reports and for routing in the optimizer."""

    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    HEAD = "head"


class OnUnsupported(str, Enum):
    """What to do with trainable parameters that belong to no supported layer."""

    ERROR = "error"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """How curvlens handles one module type.

    The gradient of the matrix view is a sum of outer products of "input-side" rows and
    "gradient-side" rows. For Linear and Conv layers the input side spans the columns
    (``n``) and the gradient side the rows (``m``) of ``W``; for Embedding it is the other way
    round (one-hot indices pick rows of ``W``), which ``inputs_are_columns`` records.

    Attributes:
        kind: the report kind of such layers.
        matrix: ``module -> W [m, n]``, a view of the weight (no copy).
        input_rows: ``(module, input) -> [N, n or m]``: input-side rows, one per weight
            application (conv: one unfolded patch per output location and group).
        grad_rows: ``(module, output_grad) -> [N, m or n]``: gradient-side rows.
        locations: ``(module, input) -> T``, weight applications per sample (conv: output
            locations; sequence inputs: tokens; plain Linear: 1).
        inputs_are_columns: whether the input side is the column (``n``) side of ``W``.
    """

    kind: LayerKind
    matrix: Callable[[nn.Module], Tensor]
    input_rows: Callable[[nn.Module, Tensor], Tensor]
    grad_rows: Callable[[nn.Module, Tensor], Tensor]
    locations: Callable[[nn.Module, Tensor], int]
    inputs_are_columns: bool = True


@dataclass(frozen=True)
class LayerInfo:
    """A supported layer found in a model.

    Attributes:
        name: qualified name from ``model.named_modules()`` (e.g. ``"features.0"``).
        module: the module itself.
        spec: its :class:`LayerSpec`.
        kind: ``spec.kind``, or ``HEAD`` for the model's last Linear layer.
    """

    name: str
    module: nn.Module
    spec: LayerSpec
    kind: LayerKind

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix view."""
        m = self.weight.shape[0]
        return int(m), int(self.weight.numel() // m)

    def matrix(self) -> Tensor:
        """The weight as its ``[m, n]`` matrix view (shares storage with the parameter)."""
        return self.spec.matrix(self.module)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None


_REGISTRY: dict[type[nn.Module], LayerSpec] = {}


def register_layer(module_type: type[nn.Module], spec: LayerSpec) -> None:
    """Teach curvlens a new module type (subclasses of it match too, nearest type first).

    Example:
        >>> import torch
        >>> from curvlens.layers import LayerKind, LayerSpec, register_layer, layer_spec
        >>> class Scale(torch.nn.Linear):
        ...     pass
        >>> layer_spec(Scale(2, 3)).kind.value   # a subclass inherits Linear's handling
        'linear'
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer needs a LayerSpec, got {type(spec).__name__}")
    _REGISTRY[module_type] = spec


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registered spec of ``module``'s type (most derived match), or ``None``."""
    for cls in type(module).__mro__:
        spec = _REGISTRY.get(cls)
        if spec is not None:
            return spec
    return None


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


# --------------------------------------------------------------------------- discovery


def find_layers(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    on_unsupported: OnUnsupported | str = OnUnsupported.WARN,
) -> dict[str, LayerInfo]:
    """The supported layers of ``model``, keyed by qualified name, in module order.

    Args:
        model: any ``nn.Module``.
        layers: restrict to these qualified names (each must be a supported layer).
        on_unsupported: what to do with trainable parameters owned by no supported layer's
            weight or bias (e.g. a LayerNorm, a raw ``nn.Parameter``): ``"error"`` raises,
            ``"warn"`` (default) warns, ``"skip"`` ignores them. Frozen parameters
            (``requires_grad=False``) are never an error; frozen layers are left out.

    Returns:
        ``{name: LayerInfo}``. The last Linear layer in module order is marked ``kind=HEAD``.

    Raises:
        ValueError: an unknown or unsupported name in ``layers``, a frozen layer asked for by
            name, an invalid ``on_unsupported``, or unsupported trainable parameters with
            ``on_unsupported="error"``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> {k: v.kind.value for k, v in find_layers(net).items()}
        {'0': 'linear', '2': 'head'}
    """
    policy = parse_option(OnUnsupported, on_unsupported, "on_unsupported")
    modules = dict(model.named_modules())
    found: dict[str, LayerInfo] = {}
    covered: set[int] = set()
    for name, module in modules.items():
        spec = layer_spec(module)
        weight = getattr(module, "weight", None)
        if spec is None or not isinstance(weight, Tensor):
            continue
        covered.add(id(weight))
        if getattr(module, "bias", None) is not None:
            covered.add(id(module.bias))
        if weight.requires_grad:
            found[name] = LayerInfo(name, module, spec, spec.kind)
    if layers is not None:
        wanted = list(layers)
        for name in wanted:
            if name not in modules:
                raise ValueError(
                    f"layer {name!r} is not a module of the model; known layers: {list(found)}"
                )
            if name not in found:
                module = modules[name]
                if layer_spec(module) is not None and not module.weight.requires_grad:
                    raise ValueError(
                        f"layer {name!r} is frozen (weight.requires_grad=False); unfreeze it "
                        "or leave it out of `layers`"
                    )
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) is not supported; supported "
                    f"types: {sorted(t.__name__ for t in _REGISTRY)} "
                    "(add one with curvlens.register_layer)"
                )
        found = {name: found[name] for name in found if name in set(wanted)}
    elif policy is not OnUnsupported.SKIP:
        stray = [
            pname for pname, p in model.named_parameters()
            if p.requires_grad and id(p) not in covered
        ]
        if stray:
            msg = (
                f"trainable parameters outside supported layers: {stray[:8]}"
                f"{' ...' if len(stray) > 8 else ''}; curvlens measures "
                f"{sorted(t.__name__ for t in _REGISTRY)} weights. Pass on_unsupported='skip' "
                "to ignore them, or register their module type with curvlens.register_layer"
            )
            if policy is OnUnsupported.ERROR:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
    head = _head_name(model, found)
    if head is not None:
        found[head] = LayerInfo(head, found[head].module, found[head].spec, LayerKind.HEAD)
    return found


def _head_name(model: nn.Module, found: Mapping[str, LayerInfo]) -> str | None:
    """The last Linear layer of the whole model, if it is among ``found``."""
    last = None
    for name, module in model.named_modules():
        spec = layer_spec(module)
        if spec is not None and spec.kind is LayerKind.LINEAR:
            last = name
    return last if last in found else None


def resolve_layer(model: nn.Module, layer: str | nn.Module | LayerInfo) -> LayerInfo:
    """A :class:`LayerInfo` for ``layer`` given by qualified name, module or info.

    Raises:
        ValueError: the layer is not a supported module of ``model``.
    """
    if isinstance(layer, LayerInfo):
        return layer
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                layer = name
                break
        else:
            raise ValueError(f"module {type(layer).__name__} is not part of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a name, module or LayerInfo, got {type(layer).__name__}")
    return find_layers(model, [layer])[layer]


def weight_matrix(module: nn.Module) -> Tensor:
    """The ``[m, n]`` matrix view of a supported module's weight.

    Raises:
        ValueError: the module type is not registered.
    """
    spec = layer_spec(module)
    if spec is None:
        raise ValueError(
            f"{type(module).__name__} is not a supported layer; supported types: "
            f"{sorted(t.__name__ for t in _REGISTRY)}"
        )
    return spec.matrix(module)
