"""BackPACK backend of :func:`curvlens.kronecker_factors` (``KFAC`` / ``KFLR``).

BackPACK (Dangel, Kunstner & Hennig, ICLR 2020) computes Kronecker factors during its own
backward pass on models it can ``extend``. curvlens runs it on a deep copy of the model so the
user's model keeps no BackPACK hooks or attributes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlens._factor_store import KroneckerFactors
from curvlens.layers import LayerInfo

__all__ = ["backpack_factors"]


def backpack_factors(
    model: nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: Tensor,
    chosen: dict[str, LayerInfo],
    mode: str,
    mc_samples: int,
) -> dict[str, KroneckerFactors]:
    """Factors from BackPACK, rescaled to curvlens's convention (see curvlens.kronecker).

    ``mode`` is a ``FactorMode`` (a string enum), compared by value: ``"fisher"`` (``KFAC``) or
    ``"ggn"`` (``KFLR``). This backend depends on the factor record only, not on
    :mod:`curvlens.kronecker`, which calls it.
    """
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR
    except ImportError as err:  # pragma: no cover - backpack is a dependency
        raise ValueError(
            "backend='backpack' needs backpack-for-pytorch; pip install backpack-for-pytorch"
        ) from err
    if mode == "empirical":
        raise ValueError(
            "BackPACK has no empirical Kronecker factors; use mode='fisher' (KFAC) or "
            "mode='ggn' (KFLR) with backend='backpack', or backend='hooks'"
        )
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)):
        raise ValueError(
            f"backend='backpack' needs an nn.CrossEntropyLoss or nn.MSELoss module, got "
            f"{loss_fn!r}; use backend='hooks'"
        )
    for name, info in chosen.items():
        if (not info.spec.inputs_are_columns or getattr(info.module, "groups", 1) != 1
                or info.spec.attach is not None or info.param != "weight"):
            raise ValueError(
                f"layer {name!r} ({type(info.module).__name__}) has no BackPACK Kronecker factors "
                "(embeddings, attention and grouped convolutions are not supported there); use "
                "backend='hooks' or leave the layer out"
            )
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    try:
        extend(twin)
        loss_twin = extend(copy.deepcopy(loss_fn))
        extension = KFAC(mc_samples=mc_samples) if mode == "fisher" else KFLR()
        weights = [modules[name].weight for name in chosen]
        locations: dict[str, int] = {}
        handles = [
            modules[name].register_forward_hook(_count_locations(name, info, locations))
            for name, info in chosen.items()
        ]
        with backpack(extension), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BackPACK's torch.jit and full-backward-hook notices
            loss = loss_twin(twin(*inputs), targets)
            torch.autograd.backward(loss, inputs=weights)
        for handle in handles:
            handle.remove()
    except Exception as err:
        raise ValueError(
            f"BackPACK could not handle this model ({type(err).__name__}: {err}); BackPACK needs "
            "a model built from modules it knows (e.g. nn.Sequential of Linear/Conv/activations) "
            "- use backend='hooks'"
        ) from err
    attr = "kfac" if mode == "fisher" else "kflr"
    B = int(inputs[0].shape[0])
    out: dict[str, KroneckerFactors] = {}
    for name, info in chosen.items():
        weight = modules[name].weight
        pair = getattr(weight, attr, None)
        if pair is None or len(pair) != 2:
            raise ValueError(
                f"BackPACK returned no {attr.upper()} factors for layer {name!r}; the layer may "
                "not be on BackPACK's graph (custom forward). Use backend='hooks'"
            )
        G, A = pair
        T = locations[name] if info.kind.value == "conv" else 1
        out[name] = KroneckerFactors(A / T, G, B * (mc_samples if attr == "kfac" else 1))
    return out


def _count_locations(name: str, info: LayerInfo, store: dict[str, int]):
    """Forward hook that records a layer's weight applications per sample."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        store[name] = info.spec.locations(module, args[0])

    return hook
