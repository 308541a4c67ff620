"""Collect a module's outputs as a feature matrix (forward hook owned by a context manager)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def resolve_module(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` for a qualified name or a module of ``model`` (any module type)."""
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            raise ValueError(
                f"layer {layer!r} is not a module of the model; known modules: "
                f"{[k for k in modules if k][:20]}"
            )
        return layer, modules[layer]
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(f"module {type(layer).__name__} is not part of the model")
    raise TypeError(f"layer must be a name or a module, got {type(layer).__name__}")


@torch.no_grad()
def layer_features(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor | Iterable[Tensor],
) -> Tensor:
    """The outputs of ``layer``, flattened per sample, over all ``inputs``.

    Args:
        model: the network (run in eval mode here; its mode is restored afterwards).
        layer: qualified module name or module; its forward output is recorded.
        inputs: one batch ``[N, ...]`` or an iterable of batches.

    Returns:
        ``[N, features]`` float64 on the CPU.
    """
    name, module = resolve_module(model, layer)
    chunks: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
        chunks.append(out.detach().flatten(1).to("cpu", torch.float64))

    batches = [inputs] if isinstance(inputs, Tensor) else inputs
    was_training = model.training
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for batch in batches:
            model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    if not chunks:
        raise ValueError(f"no data reached layer {name!r}; pass a non-empty batch")
    return torch.cat(chunks)
