"""SpectralNewton's checks on what it is given: gradients before a step, state dicts on loading.

Everything here only reads; the optimizer changes nothing until these checks have passed, so a
step or a load that fails leaves parameters and state exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlens.optim._kernels import update_bound

__all__ = ["param_label", "check_alpha", "check_gradients", "first_nonfinite", "check_state_dict"]

_ROLE_KEYS = {True: ("momentum_buffer",), False: ("exp_avg", "exp_avg_sq")}


def param_label(group: dict[str, Any], i: int, g: int | None = None) -> str:
    """``"parameter 'fc.weight'"``, or its position where the group has no names."""
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    where = "its param group" if g is None else f"param group {g}"
    return f"parameter #{i} of {where}"


def check_gradients(group: dict[str, Any]) -> tuple[list[int], list[Tensor], list[Tensor]]:
    """``(indices, params, grads)`` of the group's parameters that have a gradient.

    Raises:
        RuntimeError: a sparse or complex gradient, naming the parameter.
    """
    idx, params, grads = [], [], []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"SpectralNewton does not support sparse gradients: "
                               f"{param_label(group, i)}; use torch.optim.SparseAdam for it")
        if torch.is_complex(p) or torch.is_complex(p.grad):
            raise RuntimeError(f"SpectralNewton does not support complex tensors: "
                               f"{param_label(group, i)}; view it as real "
                               "(torch.view_as_real) or optimize it separately")
        if p.grad.shape != p.shape:
            raise RuntimeError(f"{param_label(group, i)} has shape {tuple(p.shape)} but its "
                               f"gradient {tuple(p.grad.shape)}; gradients must match")
        idx.append(i)
        params.append(p)
        grads.append(p.grad)
    return idx, params, grads


def first_nonfinite(
    collected: Sequence[tuple[dict[str, Any], list[int], list[Tensor], list[Tensor]]],
) -> str | None:
    """A message naming the first parameter whose gradient or value has a NaN/Inf, or ``None``.

    One host synchronization for all groups together.
    """
    checks = [torch.isfinite(t).all() for _, _, ps, gs in collected for pair in zip(gs, ps)
              for t in pair]
    if not checks:
        return None
    ok = torch.stack([c.to(device=checks[0].device) for c in checks])
    if bool(ok.all()):
        return None
    bad = int((~ok).nonzero()[0])
    pairs = [(group, i) for group, idx, _, _ in collected for i in idx]
    group, i = pairs[bad // 2]
    what = "gradient" if bad % 2 == 0 else "value"
    return (f"non-finite (NaN/Inf) {what} in {param_label(group, i)}; nothing was updated. "
            "Lower the learning rate, check the loss and inputs, or clip gradients (with "
            "check_finite=False such a gradient counts as zero for that step)")


def check_state_dict(param_groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Check a state dict against the optimizer's parameters before loading it.

    Each saved group must have the same role (``use_spectral``), parameter count and, where
    both are present, block count; each saved state tensor must have its parameter's shape and
    the keys of the group's role (momentum buffer / AdamW moments).

    Raises:
        ValueError: at the first mismatch, naming the group and the parameter.
    """
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("not an optimizer state dict: it needs 'state' (dict) and "
                         "'param_groups' (list)")
    if len(groups) != len(param_groups):
        raise ValueError(f"the state dict has {len(groups)} param groups, this optimizer "
                         f"{len(param_groups)}; build the optimizer the same way as the saved one")
    for g, (saved, group) in enumerate(zip(groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {g}: the state dict has {len(saved['params'])} "
                             f"parameters, this optimizer {len(group['params'])}")
        role = bool(group.get("use_spectral", True))
        if bool(saved.get("use_spectral", True)) != role:
            raise ValueError(
                f"param group {g} ({param_label(group, 0, g)}, ...) is "
                f"{'spectral' if role else 'AdamW'} here but "
                f"{'AdamW' if role else 'spectral'} in the state dict: roles differ")
        if saved.get("blocks", 1) != group.get("blocks", 1):
            raise ValueError(f"param group {g}: blocks={saved.get('blocks', 1)} in the state "
                             f"dict, {group.get('blocks', 1)} here")
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = state.get(pid)
            if not entry:
                continue
            label = param_label(group, i, g)
            missing = [k for k in _ROLE_KEYS[role] if k not in entry]
            if missing:
                raise ValueError(f"{label}: the state dict lacks {missing} (keys "
                                 f"{sorted(entry)}): it was saved for a different role")
            for key, value in entry.items():
                if key in _ROLE_KEYS[role] and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{label} has shape {tuple(p.shape)} but its saved {key!r} has "
                        f"{tuple(value.shape)}: the state dict belongs to another model or "
                        "parameter order")


def check_alpha(value: Any, what: str, damping: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a number ``>= 1`` with a bounded update."""
    if isinstance(value, str) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(f"{what} must be a number >= 1 (below 1 the update grows without "
                         f"bound with the gradient), a {{layer name: alpha}} dict or 'auto', "
                         f"got {value!r}")
    if not math.isfinite(update_bound(float(value), damping)):
        raise ValueError(f"{what}={value!r} with damping={damping!r} has no bounded update "
                         "(it grows without bound as the gradient shrinks); use damping > 0")
