"""What curvlens measures: every trainable weight matrix of a model, found by its parameters.

The unit of measurement is a trainable parameter with at least two dimensions, seen as an
``m x n`` matrix (:class:`LayerInfo`): its report name, the parameter, a view to ``[m, n]`` (a
reshape, optionally a block of rows), every name under which the model shares it (tied weights are
measured once), its kind and its owning module. :func:`find_layers` walks
``model.named_parameters()`` module by module; a module type may describe its parameters through
:func:`register_matrix_view` (``nn.MultiheadAttention`` splits ``in_proj_weight`` into the rows
of q, k and v; recurrent weights are of kind ``recurrent``); every other parameter is viewed as
``weight.flatten(1)`` after dropping leading dimensions of size one.

Naming: a ``weight`` with a capture adapter (:mod:`curvlens.adapters`) is reported under its
module's name (``"features.0"``); every other matrix under its parameter's qualified name
(``"lstm.weight_hh_l0"``), row blocks with a suffix (``"attn.in_proj_weight.q"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch.nn.functional as F
from torch import Tensor, nn

from curvlens import _attention  # noqa: F401  (registers the attention view and adapter)
from curvlens._options import parse_option
from curvlens.adapters import (
    LayerKind,
    LayerSpec,
    MatrixSlot,
    layer_spec,
    register_layer,
    registered_adapters,
)

__all__ = [
    "LayerKind",
    "LayerSpec",
    "LayerInfo",
    "MatrixSlot",
    "OnUnsupported",
    "register_layer",
    "register_matrix_view",
    "layer_spec",
    "find_layers",
    "resolve_layer",
    "weight_matrix",
]


class OnUnsupported(str, Enum):
    """What to do with trainable parameters that no measured matrix covers (e.g. norm scales)."""

    ERROR = "error"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True, eq=False)
class LayerInfo:
    """A measured weight matrix.

    Attributes:
        name: report name (module name for adapted ``weight`` parameters, else the
            parameter's qualified name, with a suffix for a row block).
        module: the module that owns the matrix (for ``nn.MultiheadAttention``'s ``out_proj``:
            the attention module, whose forward uses it).
        spec: the capture adapter (:class:`LayerSpec`), or ``None`` when the Kronecker factors
            cannot be captured (``reason`` says why).
        kind: report kind (``HEAD`` for the model's last Linear layer).
        param: the parameter's attribute path inside ``module``.
        rows: ``(start, stop)`` rows of the parameter's 2-D view, or ``None`` for all rows.
        aliases: every qualified parameter name that refers to this tensor (tied weights).
        reason: why there is no adapter (empty when ``spec`` is set).
    """

    name: str
    module: nn.Module
    spec: LayerSpec | None
    kind: LayerKind
    param: str = "weight"
    rows: tuple[int, int] | None = None
    aliases: tuple[str, ...] = ()
    reason: str = ""

    @property
    def weight(self) -> nn.Parameter:
        """The whole parameter (for a row block: the parameter that holds it)."""
        return self.module.get_parameter(self.param)

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(M, n)`` of the whole parameter's 2-D view."""
        return _matrix_dims(self.weight.shape) or (1, self.weight.numel())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix view."""
        M, n = self.full_shape
        return (M if self.rows is None else self.rows[1] - self.rows[0]), n

    def matrix(self) -> Tensor:
        """The weight as its ``[m, n]`` matrix view (shares storage with the parameter)."""
        return self.extract(self.weight)

    def extract(self, full: Tensor) -> Tensor:
        """``[..., m, n]`` block of a parameter-shaped tensor ``[..., *weight.shape]``."""
        M, n = self.full_shape
        lead = full.shape[: full.dim() - self.weight.dim()]
        view = full.reshape(*lead, M, n)
        return view if self.rows is None else view[..., self.rows[0]:self.rows[1], :]

    def embed(self, D: Tensor) -> Tensor:
        """``[..., *weight.shape]``: ``D [..., m, n]`` placed in its rows, zeros elsewhere."""
        M, _ = self.full_shape
        if self.rows is not None:
            D = F.pad(D, (0, 0, self.rows[0], M - self.rows[1]))
        return D.reshape(*D.shape[:-2], *self.weight.shape)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None


def _matrix_dims(shape: tuple[int, ...] | Iterable[int]) -> tuple[int, int] | None:
    """``(M, n)`` of ``flatten(1)`` after dropping leading size-one dims; ``None``: a vector."""
    dims = list(shape)
    if len(dims) < 2:
        return None
    while len(dims) > 2 and dims[0] == 1:
        dims.pop(0)
    return int(dims[0]), int(math.prod(dims[1:]))


# --------------------------------------------------------------------------- matrix views

_VIEWS: dict[type[nn.Module], Callable[[nn.Module], list[MatrixSlot]]] = {}


def register_matrix_view(
    module_type: type[nn.Module], view: Callable[[nn.Module], list[MatrixSlot]]
) -> None:
    """Say which matrices a module type exposes (e.g. one parameter split into row blocks).

    ``view(module)`` returns :class:`MatrixSlot` s; parameters of a submodule may be claimed with
    a dotted path (``"out_proj.weight"``). Parameters no slot names fall back to the default
    view. Subclasses match too.

    Example:
        >>> from torch import nn
        >>> from curvlens.layers import MatrixSlot, find_layers, register_matrix_view
        >>> class Pair(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(nn.init.eye_(torch.empty(4, 3)))
        >>> register_matrix_view(Pair, lambda m: [MatrixSlot("w", "top", (0, 2)),
        ...                                       MatrixSlot("w", "bottom", (2, 4))])
        >>> import torch
        >>> {k: v.matrix_shape for k, v in find_layers(nn.Sequential(Pair())).items()}
        {'0.top': (2, 3), '0.bottom': (2, 3)}
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_matrix_view needs an nn.Module subclass, got {module_type!r}")
    if not callable(view):
        raise TypeError(f"register_matrix_view needs a callable, got {type(view).__name__}")
    _VIEWS[module_type] = view


def _default_slots(module: nn.Module) -> list[MatrixSlot]:
    """Every direct parameter of ``module`` with a matrix view."""
    slots = []
    for attr, p in module.named_parameters(recurse=False):
        adapted = layer_spec(module, attr) is not None
        if _matrix_dims(p.shape) is None or (not adapted and sum(d > 1 for d in p.shape) < 2):
            continue  # a vector, or a bare parameter like a [1, 1, d] token
        slots.append(MatrixSlot(attr, "" if adapted and attr == "weight" else attr))
    return slots


def _recurrent_slots(module: nn.Module) -> list[MatrixSlot]:
    return [MatrixSlot(s.param, s.label, s.rows, LayerKind.RECURRENT)
            for s in _default_slots(module)]


def _slots(module: nn.Module) -> list[MatrixSlot]:
    for cls in type(module).__mro__:
        view = _VIEWS.get(cls)
        if view is not None:
            claimed = view(module)
            named = {s.param for s in claimed}
            return claimed + [s for s in _default_slots(module) if s.param not in named]
    return _default_slots(module)


register_matrix_view(nn.RNNBase, _recurrent_slots)
register_matrix_view(nn.MultiheadAttention, _attention.attention_slots)


# --------------------------------------------------------------------------- discovery


def _all_matrices(model: nn.Module) -> tuple[dict[str, LayerInfo], set[int], dict[str, list]]:
    """Every matrix (trainable or not) in module order, the ids of the parameters that measured
    matrices cover, and ``{module name: [matrix names]}``."""
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    seen: set[tuple[int, tuple[int, int] | None]] = set()
    found: dict[str, LayerInfo] = {}
    covered: set[int] = set()
    by_module: dict[str, list[str]] = {}
    for mname, module in model.named_modules():
        for slot in _slots(module):
            p = module.get_parameter(slot.param)
            key = (id(p), slot.rows)
            if key in seen:
                continue
            seen.add(key)
            aliases = tuple(names.get(id(p), ()))
            name = ".".join(x for x in (mname, slot.label) if x)
            spec = layer_spec(module, slot.param)
            reason = ""
            if spec is None:
                reason = (f"no capture adapter for {type(module).__name__}.{slot.param} "
                          f"(adapters: {registered_adapters()}); add one with "
                          "curvlens.register_layer(..., param=...)")
            elif len(aliases) > 1:
                spec, reason = None, (f"tied weight (shared as {list(aliases)}): its gradient "
                                      "sums several uses, so its Hessian block is no single "
                                      "Kronecker product")
            adapter = layer_spec(module, slot.param)
            kind = slot.kind or (adapter.kind if adapter is not None else LayerKind.MATRIX)
            found[name] = LayerInfo(name, module, spec, kind, slot.param, slot.rows, aliases,
                                    reason)
            by_module.setdefault(mname, []).append(name)
            if p.requires_grad:
                owner, _, _ = slot.param.rpartition(".")
                holder = module.get_submodule(owner) if owner else module
                covered.update(id(q) for q in holder.parameters(recurse=False))
    return found, covered, by_module


def find_layers(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    on_unsupported: OnUnsupported | str = OnUnsupported.WARN,
) -> dict[str, LayerInfo]:
    """The trainable weight matrices of ``model``, keyed by report name, in module order.

    Args:
        model: any ``nn.Module``.
        layers: restrict to these names: a matrix's report name, a module name (all its
            matrices) or a qualified parameter name.
        on_unsupported: what to do with trainable parameters that no measured matrix covers
            (a vector outside any measured module, e.g. a LayerNorm scale): ``"error"``
            raises, ``"warn"`` (default) warns, ``"skip"`` ignores them. Biases and other
            parameters of a module with a measured matrix count as covered. Frozen parameters
            (``requires_grad=False``) are never an error; frozen matrices are left out.

    Returns:
        ``{name: LayerInfo}``. The last Linear layer in module order is marked ``kind=HEAD``.

    Raises:
        ValueError: an unknown name in ``layers``, a frozen matrix asked for by name, an
            invalid ``on_unsupported``, or uncovered trainable parameters with
            ``on_unsupported="error"``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> {k: v.kind.value for k, v in find_layers(net).items()}
        {'0': 'linear', '2': 'head'}
    """
    policy = parse_option(OnUnsupported, on_unsupported, "on_unsupported")
    every, covered, by_module = _all_matrices(model)
    found = {n: i for n, i in every.items() if i.weight.requires_grad}
    if layers is not None:
        found = _select(model, list(layers), every, found, by_module)
    elif policy is not OnUnsupported.SKIP:
        stray = [pname for pname, p in model.named_parameters()
                 if p.requires_grad and id(p) not in covered]
        if stray:
            msg = (
                f"trainable parameters outside supported layers: {stray[:8]}"
                f"{' ...' if len(stray) > 8 else ''}; curvlens measures every trainable "
                "parameter with >= 2 dimensions and leaves these vectors out. Pass "
                "on_unsupported='skip' to ignore them"
            )
            if policy is OnUnsupported.ERROR:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
    linear = [n for n, m in model.named_modules()
              if (spec := layer_spec(m)) is not None and spec.kind is LayerKind.LINEAR]
    if (linear and linear[-1] in found  # the last Linear module, unless its weight is tied
            and found[linear[-1]].kind is LayerKind.LINEAR):
        info = found[linear[-1]]
        found[info.name] = LayerInfo(info.name, info.module, info.spec, LayerKind.HEAD,
                                     info.param, info.rows, info.aliases, info.reason)
    return found


def _select(model: nn.Module, wanted: list[str], every: dict[str, LayerInfo],
            found: dict[str, LayerInfo], by_module: dict[str, list[str]]) -> dict[str, LayerInfo]:
    """The matrices ``wanted`` names (report, module or parameter names), in module order."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for name in wanted:
        if name in every:
            hits = [name]
        elif name in by_module:
            hits = by_module[name]
        else:  # a parameter name, or a module whose matrix is tied to one found earlier
            own = {name} | ({f"{name}.{attr}" for attr, _ in
                             modules[name].named_parameters(recurse=False)}
                            if name in modules else set())
            hits = [n for n, i in every.items() if own & set(i.aliases)]
        if not hits:
            if name not in modules:
                raise ValueError(
                    f"layer {name!r} is not a module of the model; known layers: {list(found)}"
                )
            raise ValueError(
                f"layer {name!r} ({type(modules[name]).__name__}) is not supported: it has no "
                "trainable parameter with >= 2 dimensions to measure"
            )
        frozen = [h for h in hits if h not in found]
        if len(frozen) == len(hits):
            raise ValueError(
                f"layer {name!r} is frozen (weight.requires_grad=False); unfreeze it "
                "or leave it out of `layers`"
            )
        chosen.update(h for h in hits if h in found)
    return {n: i for n, i in found.items() if n in chosen}


def resolve_layer(model: nn.Module, layer: str | nn.Module | LayerInfo) -> LayerInfo:
    """A :class:`LayerInfo` for ``layer`` given by name, module (owning one matrix) or info.

    Raises:
        ValueError: the layer is not a measured matrix of ``model``, or the module owns several
            matrices (pass one of their names).
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
    found = find_layers(model, [layer])
    if layer in found:
        return found[layer]
    if len(found) == 1:
        return next(iter(found.values()))
    raise ValueError(f"layer {layer!r} holds several matrices {list(found)}; pass one of them")


def weight_matrix(module: nn.Module) -> Tensor:
    """The ``[m, n]`` matrix view of a module's ``weight`` (adapter's view, else flatten(1)).

    Raises:
        ValueError: the module has no ``weight`` parameter with >= 2 dimensions.
    """
    spec = layer_spec(module)
    if spec is not None:
        return spec.matrix(module)
    weight = getattr(module, "weight", None)
    dims = None if not isinstance(weight, Tensor) else _matrix_dims(weight.shape)
    if dims is None:
        raise ValueError(
            f"{type(module).__name__} has no weight matrix; adapters exist for "
            f"{registered_adapters()}"
        )
    return weight.reshape(dims)
