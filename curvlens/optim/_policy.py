r"""SpectralNewton's default policy: per-layer settings from what curvlens knows about a layer.

A user who passes only a model and a learning rate gets, for each trainable parameter, a
:class:`LayerChoice` from :func:`choose` -- from the layer's role (its kind in
:func:`curvlens.layers.find_layers` and, for attention projections, its name), its shape and, when
a lens is attached, the curvature exponent measured for it (with its confidence interval).

==================================  =========  ======  =======  ====================================
role                                update     alpha   blocks   why
==================================  =========  ======  =======  ====================================
conv (``weight.flatten(1)``)        spectral   2       1        convolutions measure ``alpha ~ 2``
hidden linear                       spectral   2       1        Gauss-Newton regime, ``alpha ~ 2``
attention q / k / v / out           spectral   2       1        as hidden linear layers
fused q-k-v (``qkv``, ``c_attn``)   spectral   2       3        three blocks with their own spectra
``MultiheadAttention.in_proj``      spectral   2       3        its packed q, k, v row blocks
embedding, head, 1-D, other         AdamW      --      --       not a hidden linear map (as Muon)
==================================  =========  ======  =======  ====================================

Every spectral layer uses relative (scale-free) damping ``delta = 0.01`` and has its update
rescaled to root-mean-square ``POLICY_RMS * lr = 0.05 * lr``, while the AdamW part moves at
``lr``: one learning rate serves every layer, every shape and the AdamW part, whatever the
gradients' scale. (Moonlight's rule, "Muon is Scalable for LLM Training", Liu et al., 2025,
arXiv:2502.16982, matches AdamW's update RMS with ``0.2``; ``rms_scale=True`` gives that.) Every
part gets decoupled weight decay ``POLICY_DECAY / lr`` (:func:`policy_weight_decay`): each step
removes the fraction ``3e-4`` of the weights at the lr given, so the decay's timescale
``1 / (lr * weight_decay)`` (about 3300 steps) does not move when lr is tuned ("How to set AdamW's
weight decay as you scale model and dataset size", Wang & Aitchison, 2024, arXiv:2405.13698); a
scheduler scales it with the lr. With a lens, a layer's measured exponent replaces the role's when
it is finite, its 95% interval is narrower than ``1`` and the report trusts it, clipped to
``[1, 3]``; a packed matrix the lens measures as row blocks (``nn.MultiheadAttention``'s
``in_proj_weight``) gets the mean of its blocks' usable exponents.

Evidence (``benchmarks/bench_optim.py``; the benchmark's table is in the optimizer guide). Pilot
runs at each task's chosen lr, mean final *validation* loss over seeds (8 on the ViT, 3 on the
character transformer): the previous policy (RMS ``0.1 lr``, weight decay ``0.01``) trained the
ViT fastest but settled highest, 0.116 against Muon's 0.082; RMS ``0.05 lr`` alone gave 0.082
(4 seeds), the decay alone (``3e-4`` per step) 0.119, both 0.073. On the character transformer
both together gave 1.924 (previous policy 1.900, Muon 1.937), and the digits CNN's 0.0375 (seed
0; previous 0.037, Muon 0.057). Not adopted: RMS ``0.07 lr`` (ViT 0.107, 4 seeds), a fixed weight
decay ``0.1`` (character transformer 1.949, seed 0: at its lr ``0.03`` that is ``3e-3`` per
step), no decay on the AdamW part (ViT 0.095) or decay on its head or position embedding alone
(0.088, 0.098); against the previous policy's 0.116: damping ``0.1`` (0.105, 3 seeds),
``alpha = 1`` (0.106, 4 seeds), the AdamW part at a third of ``lr`` (0.112, 3 seeds).
Absolute damping had lost on the transformer (1.93-1.99 against 1.76), whose gradient singular
values lie far below ``sqrt(d)``; relative damping and the RMS rule make the update independent
of the gradients' scale.

The main paper is "Spectral Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition
of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor, nn

from curvlens.layers import LayerKind, find_layers

__all__ = [
    "Role", "LayerChoice", "roles", "choose", "measured_alpha", "latest_reports",
    "split_parameters", "split_groups", "group_alpha", "layer_name", "DEFAULT_ALPHA",
    "POLICY_ALPHA_RANGE", "POLICY_RMS", "POLICY_DECAY", "policy_weight_decay",
]

DEFAULT_ALPHA = 2.0
"""The exponent used where none is given or measured (conv layers measure ~2 in the paper)."""

POLICY_RMS = 0.05
"""Each spectral update's root-mean-square entry, per unit learning rate, under the policy (the
AdamW part moves at ``lr`` itself). A quarter of Moonlight's ``0.2``: see the module docstring."""

POLICY_DECAY = 3e-4
"""Under the policy, the fraction of every weight that decoupled weight decay removes per step at
the learning rate given (``lr * weight_decay``, for the spectral and the AdamW part alike): the
decay's timescale, ``1 / (lr * weight_decay)`` ~ 3300 steps, stays put when only ``lr`` is tuned.
See the module docstring."""


def policy_weight_decay(lr: float) -> float:
    """The policy's decoupled weight decay for a part that runs at ``lr``: ``POLICY_DECAY / lr``.

    Example:
        >>> round(policy_weight_decay(3e-3), 12), policy_weight_decay(0.03), policy_weight_decay(0)
        (0.1, 0.01, 0.0)
    """
    return POLICY_DECAY / lr if lr > 0 else 0.0


POLICY_ALPHA_RANGE = (1.0, 3.0)
"""Measured exponents are clipped to this range (below 1 the update would grow with sigma)."""
_MAX_CI_WIDTH = 1.0


class Role(str, Enum):
    """What a parameter is, for the policy."""

    CONV = "conv"
    HIDDEN = "hidden"
    ATTN_QKV = "attention_qkv"  # one matrix holding the query, key and value projections
    ATTN_Q = "attention_q"
    ATTN_K = "attention_k"
    ATTN_V = "attention_v"
    ATTN_OUT = "attention_out"
    EMBEDDING = "embedding"
    HEAD = "head"
    VECTOR = "vector"  # biases, norm weights: ndim < 2
    OTHER = "other"  # matrices of unsupported modules


# The last component of a layer's name -> its attention role (common naming: nanoGPT, GPT-2,
# Hugging Face Llama/BERT/GPT-NeoX). Out-projections count only beside a q/k/v sibling.
_ATTENTION_NAMES: dict[str, Role] = {
    "qkv": Role.ATTN_QKV, "c_attn": Role.ATTN_QKV, "query_key_value": Role.ATTN_QKV,
    "wqkv": Role.ATTN_QKV, "in_proj": Role.ATTN_QKV,
    "q_proj": Role.ATTN_Q, "query": Role.ATTN_Q, "wq": Role.ATTN_Q, "q": Role.ATTN_Q,
    "k_proj": Role.ATTN_K, "key": Role.ATTN_K, "wk": Role.ATTN_K, "k": Role.ATTN_K,
    "v_proj": Role.ATTN_V, "value": Role.ATTN_V, "wv": Role.ATTN_V, "v": Role.ATTN_V,
}
_OUT_NAMES = {"proj", "c_proj", "o_proj", "out_proj", "wo", "dense", "out"}


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """The settings the policy gives one parameter.

    Attributes:
        role: what the parameter is.
        use_spectral: spectral update (``True``) or AdamW.
        alpha: curvature exponent of the transform (spectral only).
        damping: ``delta`` of relative damping.
        damping_mode: ``"relative"`` (scale-free).
        rms_target: the update is rescaled to this RMS (times ``lr``): the per-layer
            learning-rate scaling, exact for every shape and spectrum.
        blocks: the matrix ``[m, n]`` is treated as ``blocks`` matrices ``[m / blocks, n]``.
    """

    role: Role
    use_spectral: bool
    alpha: float = 2.0
    damping: float = 0.01
    damping_mode: str = "relative"
    rms_target: float | None = POLICY_RMS
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.alpha < 1:
            raise ValueError(f"invalid LayerChoice {self!r}")


def _attention_role(name: str, siblings: set[str]) -> Role | None:
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf in _ATTENTION_NAMES:
        return _ATTENTION_NAMES[leaf]
    if leaf in _OUT_NAMES and siblings & set(_ATTENTION_NAMES):
        return Role.ATTN_OUT
    return None


def roles(model: nn.Module) -> dict[str, Role]:
    """``{parameter name: Role}`` for every trainable parameter of ``model``, in model order.

    Example:
        >>> from torch import Tensor, nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
        >>> {k: v.value for k, v in roles(net).items()}  # doctest: +NORMALIZE_WHITESPACE
        {'0.weight': 'conv', '0.bias': 'vector', '2.weight': 'hidden', '2.bias': 'vector',
         '3.weight': 'head', '3.bias': 'vector'}
    """
    layers = find_layers(model, on_unsupported="skip")
    children: dict[str, set[str]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        children.setdefault(parent, set()).add(leaf.lower())
    embeddings = {id(i.weight) for i in layers.values() if i.kind is LayerKind.EMBEDDING}
    # a module with attention-kind matrices (nn.MultiheadAttention): its linear slot is the output
    attention_modules = {id(i.module) for i in layers.values() if i.kind is LayerKind.ATTENTION}
    by_weight: dict[int, Role] = {}
    for name, info in layers.items():
        if info.kind is LayerKind.CONV:
            role = Role.CONV
        elif info.kind is LayerKind.EMBEDDING:
            role = Role.EMBEDDING
        elif info.kind is LayerKind.HEAD:
            role = Role.HEAD
        elif info.kind is LayerKind.ATTENTION:  # row blocks of one packed matrix, or q/k/v alone
            role = Role.ATTN_QKV if info.rows is not None else _attention_role(
                info.param.removesuffix("_weight"), set()) or Role.HIDDEN
        elif id(info.module) in attention_modules:
            role = Role.ATTN_OUT
        else:
            siblings = children.get(name.rpartition(".")[0], set())
            role = _attention_role(name, siblings) or Role.HIDDEN
        if id(info.weight) in embeddings:  # a head tied to an embedding stays an embedding
            role = Role.EMBEDDING
        by_weight.setdefault(id(info.weight), role)
    return {
        name: Role.VECTOR if p.ndim < 2 else by_weight.get(id(p), Role.OTHER)
        for name, p in model.named_parameters() if p.requires_grad
    }


_MATRIX_ROLES = {Role.CONV, Role.HIDDEN, Role.ATTN_QKV, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V,
                   Role.ATTN_OUT}


def choose(role: Role, shape: tuple[int, ...], *, head_to_adamw: bool = True) -> LayerChoice:
    """The policy's settings for a parameter of ``role`` and ``shape`` (see the module table).

    Example:
        >>> choose(Role.ATTN_QKV, (96, 32)).blocks
        3
        >>> choose(Role.HEAD, (10, 64)).use_spectral
        False
    """
    spectral = role in _MATRIX_ROLES or (role is Role.HEAD and not head_to_adamw)
    if not spectral or len(shape) < 2:
        return LayerChoice(role=role, use_spectral=False)
    blocks = 3 if role is Role.ATTN_QKV and shape[0] % 3 == 0 else 1
    return LayerChoice(role=role, use_spectral=True, alpha=2.0, blocks=blocks)


def measured_alpha(report: Any, default: float) -> float:
    """The exponent to use given a layer's report (``alpha``, optional ``alpha_ci``, ``trusted``).

    A finite ``alpha`` whose 95% interval is finite and narrower than ``1``, and that the report
    does not flag as untrusted (``report.trusted("alpha")`` where reports carry trust flags), is
    clipped to ``[1, 3]``; anything else (no fit, a wide interval, a flag) keeps ``default``. A
    bare number (from ``lens.latest_alphas()``) is a point estimate without an interval: clipped.

    Example:
        >>> from types import SimpleNamespace as R
        >>> measured_alpha(R(alpha=2.4, alpha_ci=(2.2, 2.6)), 2.0)
        2.4
        >>> measured_alpha(R(alpha=7.0, alpha_ci=(3.0, 11.0)), 2.0)  # too uncertain
        2.0
    """
    lo, hi = POLICY_ALPHA_RANGE
    if isinstance(report, (int, float)):
        value, ci = float(report), None
    else:
        value, ci = float(getattr(report, "alpha", math.nan)), getattr(report, "alpha_ci", None)
    trusted = getattr(report, "trusted", None)
    if not math.isfinite(value) or (callable(trusted) and not trusted("alpha")):
        return default
    if ci is not None and not isinstance(report, (int, float)):
        a, b = (float(v) for v in ci)
        if not (math.isfinite(a) and math.isfinite(b)) or b - a > _MAX_CI_WIDTH:
            return default
    return min(max(value, lo), hi)


def latest_reports(lens: Any) -> Mapping[str, Any]:
    """``{layer: report}`` from a lens's latest analysis, or its ``latest_alphas()`` numbers."""
    history = getattr(lens, "history", None)
    if history:
        return dict(history[-1].layers)
    return dict(lens.latest_alphas() or {})


def split_parameters(
    model: nn.Module,
    *,
    head_to_adamw: bool = True,
    extra_adamw: Iterable[str] = (),
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Route a model's trainable parameters to the spectral update or to AdamW, by name.

    Spectral: the ``weight`` of every hidden ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (and any registered
    layer of kind linear/conv/attention) found by :func:`curvlens.layers.find_layers`; conv weights
    are updated as their ``weight.flatten(1)`` matrix; ``nn.MultiheadAttention``'s packed
    ``in_proj_weight`` as its three q, k, v row blocks (the optimizer's ``blocks=3``). AdamW:
    everything else -- biases, norm weights, embeddings (also when tied to a head), unsupported
    modules' parameters, the output head (the model's last Linear) unless ``head_to_adamw=False``,
    and whatever ``extra_adamw`` names.
    Frozen parameters (``requires_grad=False``) are left out of both.

    Args:
        model: the model.
        head_to_adamw: send the output head's weight to AdamW (default), as Muon recommends.
        extra_adamw: layer names (``"features.0"``) or parameter names (``"features.0.weight"``)
            to force into AdamW.

    Returns:
        ``(spectral, adamw)``: two ``{parameter name: parameter}`` dicts in model order.

    Raises:
        ValueError: a name in ``extra_adamw`` that is neither a module nor a parameter of ``model``.

    Example:
        >>> from torch import Tensor, nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
        >>> spectral, other = split_parameters(net)
        >>> list(spectral), list(other)
        (['0.weight', '2.weight'], ['0.bias', '2.bias', '3.weight', '3.bias'])
    """
    extra = set(extra_adamw)
    params = dict(model.named_parameters())
    unknown = extra - set(params) - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(
            f"extra_adamw names {sorted(unknown)} are neither modules nor parameters of the model"
        )
    layers = find_layers(model, on_unsupported="skip")
    eligible = {LayerKind.LINEAR, LayerKind.CONV, LayerKind.ATTENTION}
    if not head_to_adamw:
        eligible.add(LayerKind.HEAD)
    spectral_ids = {
        id(info.weight) for name, info in layers.items()
        if info.kind in eligible and name not in extra and f"{name}.weight" not in extra
    }
    spectral_ids -= {id(i.weight) for i in layers.values() if i.kind is LayerKind.EMBEDDING}
    spectral: dict[str, nn.Parameter] = {}
    other: dict[str, nn.Parameter] = {}
    for name, p in params.items():
        if p.requires_grad:
            (spectral if id(p) in spectral_ids and name not in extra else other)[name] = p
    return spectral, other


def split_groups(params: Iterable[Any], adamw_overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Param groups from parameters, ``(name, parameter)`` pairs or group dicts: groups that do
    not set ``use_spectral`` are split, ``ndim >= 2`` to the spectral update, the rest to AdamW
    (with ``adamw_overrides``)."""
    if isinstance(params, Tensor):
        raise TypeError("params should be an iterable of Tensors, not a Tensor")
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    groups: list[dict[str, Any]] = []
    for group in items:
        if "use_spectral" in group:
            groups.append(dict(group))
            continue
        plist = group["params"]
        plist = [plist] if isinstance(plist, Tensor) else list(plist)
        tensor = (lambda e: e[1]) if plist and isinstance(plist[0], tuple) else (lambda e: e)
        rest = {k: v for k, v in group.items() if k != "params"}
        mats = [e for e in plist if tensor(e).ndim >= 2]
        vecs = [e for e in plist if tensor(e).ndim < 2]
        if mats or not vecs:
            groups.append({**rest, "params": mats, "use_spectral": True})
        if vecs:
            groups.append({**rest, "params": vecs, "use_spectral": False,
                           **adamw_overrides})
    return groups


def layer_name(param_name: str) -> str:
    """``"fc.weight"`` -> ``"fc"``."""
    return param_name.removesuffix(".weight")


def group_alpha(group: dict[str, Any], i: int, state: Mapping[str, Any], step: int,
                measured: Mapping[str, Any] | None) -> tuple[float, dict[str, Any]]:
    """The exponent of parameter ``i`` of a spectral ``group`` at ``step`` (a number, a
    ``{layer: alpha}`` dict or ``"auto"`` from ``measured`` reports every ``auto_every`` steps),
    and the state entries to commit with the step."""
    alpha = group["alpha"]
    if isinstance(alpha, Mapping):
        pname = group["param_names"][i]
        return float(alpha.get(layer_name(pname), alpha.get(pname, DEFAULT_ALPHA))), {}
    if alpha != "auto":
        return float(alpha), {}
    current = float(state.get("alpha", DEFAULT_ALPHA))
    due = step % group["auto_every"] == 0 or not state.get("alpha_measured")
    name = layer_name(group["param_names"][i])
    measured = measured or {}
    # a packed matrix the lens measures as row blocks (``attn.in_proj_weight.q``, ``.k``, ``.v``)
    reports = [measured[name]] if name in measured else [
        r for k, r in measured.items() if k.startswith(name + ".") and "." not in k[len(name) + 1:]]
    if not due or not reports:
        return current, {"alpha": current}
    lo, hi = group["alpha_range"]
    usable = [v for v in (measured_alpha(r, math.nan) for r in reports) if math.isfinite(v)]
    value = sum(usable) / len(usable) if usable else math.nan  # one exponent for all blocks
    if not math.isfinite(value):
        return current, {"alpha": current}
    value = min(max(value, lo), hi)
    return value, {"alpha": value, "alpha_measured": True}
