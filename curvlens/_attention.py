"""``nn.MultiheadAttention``: its q, k, v and output matrices, and how to capture their factors.

The module keeps q, k and v as row blocks of one ``in_proj_weight [3E, E]`` (or as separate
``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``), and its forward hands ``out_proj.weight`` to
``F.multi_head_attention_forward`` without calling ``out_proj``, so no module hook sees any of
the four projections. The adapter here observes the projections inside the module's own forward:
while the module runs, a torch-function mode routes ``F.multi_head_attention_forward`` to a copy
of that very function (same code, same numerics) whose ``linear`` calls also hand their input and
output to the capture. Each projection is matched to its matrix by storage and row offset, so
packed, split and separate projections all work, for ``batch_first`` either way.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlens.adapters import LayerKind, LayerSpec, MatrixSlot, register_layer

__all__ = ["attention_slots"]

_QKV = ("q", "k", "v")
_TAPS: list[Callable[[Tensor, Tensor, Tensor], None]] = []


def attention_slots(module: nn.Module) -> list[MatrixSlot]:
    """q, k, v (row blocks of ``in_proj_weight``, or the separate weights) and ``out_proj``."""
    E = module.embed_dim
    if module.in_proj_weight is not None:
        slots = [MatrixSlot("in_proj_weight", f"in_proj_weight.{s}", (i * E, (i + 1) * E),
                            LayerKind.ATTENTION) for i, s in enumerate(_QKV)]
    else:
        slots = [MatrixSlot(f"{s}_proj_weight", f"{s}_proj_weight", None, LayerKind.ATTENTION)
                 for s in _QKV]
    # out_proj stays of kind "linear", as the nn.Linear it is (the optimizer routes by kind)
    return slots + [MatrixSlot("out_proj.weight", "out_proj", None, LayerKind.LINEAR)]


def _tapped_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    out = F.linear(x, w, b)
    if _TAPS:
        _TAPS[-1](x, w, out)
    return out


def _copy_forward() -> Callable[..., Any]:
    """``F.multi_head_attention_forward`` (and the in-projection helpers it calls), re-bound to
    globals whose ``linear`` is :func:`_tapped_linear` and that skip the torch-function check
    (the mode below has already been consulted)."""
    g = dict(vars(F))
    g["linear"] = _tapped_linear
    g["has_torch_function"] = lambda *args: False
    for name in ("multi_head_attention_forward", "_in_projection_packed", "_in_projection"):
        f = getattr(F, name)
        copy = types.FunctionType(f.__code__, g, name, f.__defaults__, f.__closure__)
        copy.__kwdefaults__ = f.__kwdefaults__
        g[name] = copy
    return g["multi_head_attention_forward"]


_FORWARD = _copy_forward()


class _Tap(TorchFunctionMode):
    """Active during one attention forward: sends each projection to ``callback``."""

    def __init__(self, callback: Callable[[Tensor, Tensor, Tensor], None]) -> None:
        super().__init__()
        self.callback = callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        _TAPS.append(self.callback)
        try:
            return _FORWARD(*args, **kwargs)
        finally:
            _TAPS.pop()


def _row_offset(w: Tensor, p: Tensor) -> int | None:
    """The first row of ``p`` that ``w`` views (``w`` a row block of ``p``), else ``None``."""
    if w is p:
        return 0
    if (w.dim() != 2 or w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
            or w.stride() != p.stride()):
        return None
    return (w.storage_offset() - p.storage_offset()) // p.stride(0)


def _attach(module: nn.Module, infos: dict[str, Any], capture: Any) -> list[Any]:
    """Hooks that open a :class:`_Tap` for the module's forward and close it afterwards."""
    modes: list[_Tap] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs["query"]
        batched = query.dim() == 3
        samples = (query.shape[0 if mod.batch_first else 1]) if batched else 1

        def callback(x: Tensor, w: Tensor, out: Tensor) -> None:
            for name, info in infos.items():
                p = info.weight
                offset = _row_offset(w, p)
                if offset is None:
                    continue
                r0, r1 = info.rows or (0, p.shape[0])
                if not offset <= r0 < r1 <= offset + w.shape[0]:
                    continue
                call = capture.save_input(name, x, samples)
                if call is not None:
                    lo, hi = r0 - offset, r1 - offset
                    capture.watch(name, call, out, lambda g, lo=lo, hi=hi: g[..., lo:hi])

        mode = _Tap(callback)
        mode.__enter__()
        modes.append(mode)

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if modes:
            modes.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True)]


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # [tokens, dim]


def _locations(module: nn.Module, x: Tensor) -> int:
    return int(x.numel() // x.shape[-1]) if x.dim() > 1 else 1


_ATTENTION = LayerSpec(
    kind=LayerKind.ATTENTION,
    matrix=lambda module: module.out_proj.weight,
    input_rows=_rows,
    grad_rows=_rows,
    locations=_locations,
    attach=_attach,
)

for _param in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
               "out_proj.weight"):
    register_layer(nn.MultiheadAttention, _ATTENTION, param=_param)
