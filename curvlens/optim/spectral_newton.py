r"""SpectralNewton: ``T(sigma; alpha)`` applied in the singular basis of the momentum, per layer.

Implements the optimizer proposed in "Spectral Asymptotics of Neural Network Loss Landscapes: An
Exact Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596): for a layer whose
directional curvature scales as ``h_k ~ sigma_k^alpha``, a damped Newton step in the gradient's
singular basis is ``U diag(sigma / (sigma^alpha + d)) V^T``. The kernels are in
:mod:`curvlens.optim._kernels`, the step in :mod:`curvlens.optim._functional`, the default
per-layer policy in :mod:`curvlens.optim._policy` and the checks in :mod:`curvlens.optim._state`;
this module holds the ``torch.optim.Optimizer`` around them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlens import _dist
from curvlens.optim._distributed import assign_owners
from curvlens.optim._functional import adamw, finite_or_zero, spectral_directions
from curvlens.optim._kernels import DampingMode, _damping_mode
from curvlens.optim._policy import (
    DEFAULT_ALPHA,
    POLICY_RMS,
    choose,
    group_alpha,
    latest_reports,
    layer_name,
    policy_weight_decay,
    roles,
    split_groups,
    split_parameters,
)
from curvlens.optim._state import (
    check_alpha,
    check_gradients,
    check_state_dict,
    first_nonfinite,
    param_label,
)

__all__ = ["SpectralNewton", "split_parameters", "DEFAULT_ALPHA"]

_HALF = (torch.float16, torch.bfloat16)


class SpectralNewton(torch.optim.Optimizer):
    r"""Spectral Newton for hidden matrices, AdamW for everything else, in one optimizer.

    For each matrix parameter ``W`` (conv: ``W.flatten(1)``, ``[m, n]``) with gradient ``G``::

        B <- momentum * B + (1 - momentum) * G;   M = (1 - momentum) * G + momentum * B
                                                      (nesterov) or M = B
        W <- (1 - lr * weight_decay) W - lr * U diag(T(sigma)) V^T,  M = U S V^T

    with ``T(sigma) = sigma / (sigma^alpha + d)`` (absolute damping) or ``T`` of
    ``sigma / sigma_1`` (relative, scale-free), computed without an SVD (Cholesky for
    ``alpha = 2``, ``eigh`` otherwise, on the smaller Gram matrix, in float32 for half-precision
    parameters). All other parameters get AdamW, implemented here so that one ``state_dict``
    holds everything and LR schedulers see every group (its arithmetic is torch.optim.AdamW's).

    **Default policy** (given a model and nothing else but ``lr``; see
    :mod:`curvlens.optim._policy`): hidden Linear and Conv weights (attention projections
    included; a fused query-key-value matrix as three blocks) get the spectral update with
    ``alpha = 2``, relative damping ``delta = 0.01`` and their update rescaled to RMS
    ``0.05 * lr``; embeddings, the output head, biases and norm weights get AdamW at the same
    ``lr``; every part has decoupled weight decay ``3e-4 / lr`` (each step removes the fraction
    ``3e-4`` of the weights, whatever lr is tuned to). One learning rate for everything, whatever
    the gradients' scale (relative damping and the RMS rule make the update independent of it).
    With ``lens=`` a layer's measured
    exponent replaces 2 when its 95% interval is narrower than 1 (clipped to ``[1, 3]``). The
    evidence (``benchmarks/bench_optim.py``, three tasks, lr tuned per method on a validation
    split) is in :mod:`curvlens.optim._policy`. Explicit ``alpha``, ``damping``,
    ``damping_mode``, ``rms_scale``, ``adamw_lr`` and the weight decays override the policy.

    **Bounded updates.** Every singular value of ``U diag(T(sigma)) V^T`` is at most
    ``c = update_bound(alpha, damping)`` (``1 / (2 sqrt(d))`` for ``alpha = 2``, ``1`` for
    ``alpha = 1``) for every finite gradient, tiny, huge or zero: ``||W_new - (1 - lr wd) W||_2
    <= lr * c`` and ``||.||_F <= lr * c * sqrt(min(m, n))``; with ``rms_scale`` the update's RMS
    is exactly ``lr * rms_target`` (zero for a zero gradient). Hence ``alpha >= 1`` and, unless
    ``alpha == 1``, ``damping > 0`` are required.

    **Atomic steps.** Everything is checked before anything changes: with ``check_finite=True`` a
    NaN/Inf in any gradient or parameter of any group raises a ``RuntimeError`` naming it, and
    parameters and state stay exactly as before. With ``check_finite=False`` (no host sync) a
    parameter whose gradient has a NaN/Inf is stepped as if its gradient were zero, so nothing
    is ever poisoned. ``load_state_dict`` checks roles, counts and shapes and names the first
    mismatch.

    Reductions (tested): ``alpha = 1``, relative ``delta -> 0`` is Muon's ``U V^T``; absolute
    ``d -> inf`` gives ``-(lr / d) M``, SGD with Nesterov momentum at ``lr (1 - momentum) / d``.

    Args:
        params_or_model: an ``nn.Module`` (the policy routes its parameters), or an iterable of
            parameters, of ``(name, parameter)`` pairs, or of param-group dicts. Without a
            module, groups that do not set ``use_spectral`` are split: ``ndim >= 2`` parameters
            go to the spectral update, the rest to AdamW.
        lr: learning rate (the policy's RMS rule makes it comparable to an AdamW learning rate).
        alpha: ``None`` (policy: 2, or measured with ``lens``), a number ``>= 1``,
            ``{layer name: alpha}`` (others 2; needs names) or ``"auto"`` (measured, needs
            ``lens``): re-read every ``auto_every`` steps, clipped to ``alpha_range``, kept at the
            last usable value when a measurement is NaN or too uncertain.
        damping: ``d`` (absolute) or ``delta`` (relative).
        damping_mode: ``"relative"`` (default, scale-free) or ``"absolute"``.
        momentum: momentum factor ``mu`` of the (Muon-style, averaging) buffer.
        nesterov: Nesterov momentum.
        weight_decay: decoupled weight decay of the spectral parameters (``W *= 1 - lr * wd``);
            ``None`` (policy): ``3e-4 / lr``, so that each step at the given lr removes the
            fraction ``3e-4`` whatever lr is tuned to (:func:`~curvlens.optim.policy_weight_decay`).
        adamw_lr: the AdamW part's learning rate (``None``: ``lr``).
        adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part (``adamw_weight_decay=None``:
            ``3e-4 / adamw_lr``, as above).
        rms_scale: ``None`` (policy: 0.05), ``False``, ``True`` (0.2, Moonlight's) or a float:
            rescale each spectral update to that RMS (:func:`~curvlens.optim.scale_to_rms`).
        lens: a ``CurvatureLens`` (or an object with ``latest_alphas()``) for measured alphas.
        alpha_range: clip measured exponents to ``[lo, hi]``, ``lo >= 1``.
        auto_every: steps between reads of the lens.
        head_to_adamw: with a model, send its output head to AdamW (as Muon recommends).
        extra_adamw: with a model, more layer/parameter names to send to AdamW.
        check_finite: raise on NaN/Inf before changing anything (one host sync per step).
        distributed: under ``torch.distributed`` with more than one process, compute each
            spectral update on one owner rank and broadcast it (gradients must already be
            all-reduced, as DDP does).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> opt = SpectralNewton(net, lr=0.01)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = lambda: nn.functional.cross_entropy(net(x), y)
        >>> before = loss_fn().item()
        >>> for _ in range(20):
        ...     opt.zero_grad(); loss_fn().backward(); opt.step()
        >>> loss_fn().item() < before
        True
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        lr: float = 3e-3,
        alpha: float | Mapping[str, float] | str | None = None,
        damping: float = 0.01,
        damping_mode: DampingMode | str = DampingMode.RELATIVE,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        rms_scale: bool | float | None = None,
        lens: Any = None,
        alpha_range: tuple[float, float] = (1.0, 3.0),
        auto_every: int = 50,
        head_to_adamw: bool = True,
        extra_adamw: Iterable[str] = (),
        check_finite: bool = True,
        distributed: bool = True,
    ) -> None:
        adamw_lr = lr if adamw_lr is None else adamw_lr
        if weight_decay is None:
            weight_decay = policy_weight_decay(lr)
        if adamw_weight_decay is None:
            adamw_weight_decay = policy_weight_decay(adamw_lr)
        for key, value in (("lr", lr), ("damping", damping), ("momentum", momentum),
                           ("weight_decay", weight_decay), ("adamw_lr", adamw_lr),
                           ("adamw_eps", adamw_eps), ("adamw_weight_decay", adamw_weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if not all(0.0 <= b < 1.0 for b in adamw_betas) or len(adamw_betas) != 2:
            raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {adamw_betas!r}")
        lo, hi = alpha_range
        if not 1 <= lo <= hi:
            raise ValueError(f"alpha_range must satisfy 1 <= lo <= hi, got {alpha_range!r} "
                             "(below 1 the update grows with the gradient without bound)")
        if not (isinstance(auto_every, int) and auto_every >= 1):
            raise ValueError(f"auto_every must be an int >= 1, got {auto_every!r}")
        if rms_scale is None:
            rms_target = POLICY_RMS
        elif rms_scale is True:
            rms_target = 0.2
        elif rms_scale is False:
            rms_target = None
        elif isinstance(rms_scale, (int, float)) and rms_scale > 0:
            rms_target = float(rms_scale)
        else:
            raise ValueError(f"rms_scale must be None, False, True or a positive float, got "
                             f"{rms_scale!r}")
        if alpha is None:
            alpha = "auto" if lens is not None else DEFAULT_ALPHA
        if alpha == "auto" and not callable(getattr(lens, "latest_alphas", None)):
            raise ValueError(
                "alpha='auto' needs lens=<an object with latest_alphas()>, e.g. a "
                f"curvlens.CurvatureLens attached to the model; got lens={lens!r}"
            )
        self.lens = lens
        self._adamw_overrides = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
        defaults = dict(
            lr=lr, alpha=alpha, damping=damping, damping_mode=_damping_mode(damping_mode).value,
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, rms_target=rms_target,
            betas=tuple(adamw_betas), eps=adamw_eps, alpha_range=(float(lo), float(hi)),
            auto_every=auto_every, check_finite=check_finite, use_spectral=True,
            distributed=bool(distributed), blocks=1,
        )
        if isinstance(params_or_model, nn.Module):
            groups = self._policy_groups(params_or_model, head_to_adamw, extra_adamw)
        else:
            groups = split_groups(params_or_model, self._adamw_overrides)
        if not groups:
            raise ValueError("SpectralNewton got no trainable parameters")
        super().__init__(groups, defaults)
        self._check_alpha_names()

    # ------------------------------------------------------------------ construction helpers

    def _policy_groups(self, model: nn.Module, head_to_adamw: bool,
                       extra_adamw: Iterable[str]) -> list[dict[str, Any]]:
        spectral, other = split_parameters(model, head_to_adamw=head_to_adamw,
                                           extra_adamw=extra_adamw)
        role = roles(model)
        by_blocks: dict[int, list] = {}
        for name, p in spectral.items():
            blocks = choose(role[name], tuple(p.shape), head_to_adamw=False).blocks
            by_blocks.setdefault(blocks, []).append((name, p))
        groups = [{"params": ps, "use_spectral": True, "blocks": b}
                  for b, ps in sorted(by_blocks.items())]
        if other:
            groups.append({"params": list(other.items()), "use_spectral": False,
                           **self._adamw_overrides})
        return groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("use_spectral") is False:
            for key, value in self._adamw_overrides.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["damping_mode"] = _damping_mode(group["damping_mode"]).value
        if not group["use_spectral"]:
            return
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                raise ValueError(
                    f"{param_label(group, i)} has shape {tuple(p.shape)}: the spectral update "
                    "needs ndim >= 2; put it in a group with use_spectral=False (AdamW)"
                )
        alpha = group["alpha"]
        if isinstance(alpha, Mapping) or alpha == "auto":
            if "param_names" not in group:
                raise ValueError(
                    f"alpha={'a dict' if isinstance(alpha, Mapping) else repr(alpha)} needs "
                    "parameter names: pass the model, or model.named_parameters(), instead of "
                    "bare parameters"
                )
            for name, value in (alpha.items() if isinstance(alpha, Mapping) else ()):
                check_alpha(value, f"alpha[{name!r}]", group["damping"])
        else:
            check_alpha(alpha, "alpha", group["damping"])
        if alpha == "auto" and group["damping"] <= 0:
            raise ValueError(f"alpha='auto' needs damping > 0, got {group['damping']!r}: with "
                             "d = 0 the update grows without bound as the gradient shrinks")

    def _check_alpha_names(self) -> None:
        known: set[str] = set()
        for g in self.param_groups:
            if g["use_spectral"] and "param_names" in g:
                known |= {n for pn in g["param_names"] for n in (pn, layer_name(pn))}
        for g in self.param_groups:
            if g["use_spectral"] and isinstance(g["alpha"], Mapping):
                unknown = set(g["alpha"]) - known
                if unknown:
                    raise ValueError(
                        f"alpha given for {sorted(unknown)}, which are not spectral layers of this "
                        f"optimizer; spectral layers: {sorted(set(map(layer_name, known)))}"
                    )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("lens", None)
        self.__dict__.setdefault("_adamw_overrides", {})
        for group in self.param_groups:
            group.setdefault("use_spectral", True)
            group.setdefault("rms_target", None)
            group.setdefault("damping_mode", DampingMode.ABSOLUTE.value)
            group.setdefault("alpha_range", (1.0, 3.0))
            group.setdefault("auto_every", 50)
            group.setdefault("check_finite", True)
            group.setdefault("distributed", True)
            group.setdefault("blocks", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, after checking roles, counts and shapes against
        this optimizer's parameters (``ValueError`` naming the first mismatch); float32 buffers
        of half-precision parameters stay float32 (torch would cast them to the parameter's
        dtype)."""
        check_state_dict(self.param_groups, state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {
            p: {k: v for k, v in saved[i].items() if k != "step" and isinstance(v, Tensor)}
            for i, p in zip(ids, params) if p.dtype in _HALF and i in saved
        }
        super().load_state_dict(state_dict)
        for p, values in keep.items():
            for k, v in values.items():
                self.state[p][k] = v.to(device=p.device, copy=True)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step for every group; ``closure`` re-evaluates the loss under ``enable_grad``.

        Nothing changes unless every check passes and every update has been computed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measured = None
        if any(g["use_spectral"] and g["alpha"] == "auto" for g in self.param_groups):
            if self.lens is None:
                raise RuntimeError("alpha='auto' but this optimizer has no lens (it is not saved "
                                   "in state_dict): set opt.lens = <CurvatureLens> after loading")
            measured = latest_reports(self.lens)
        collected = [(g, *check_gradients(g)) for g in self.param_groups]
        collected = [c for c in collected if c[2]]
        if any(g["check_finite"] for g, *_ in collected):
            message = first_nonfinite([c for c in collected if c[0]["check_finite"]])
            if message is not None:
                raise RuntimeError(message)
        plans = []
        for group, idx, params, grads in collected:
            if not group["check_finite"]:
                grads = finite_or_zero(grads)
            fresh = {p: self._new_state(group, p) for p in params if not self.state.get(p)}
            states = [self.state[p] if p not in fresh else fresh[p] for p in params]
            plan = {"group": group, "params": params, "grads": grads, "states": states,
                    "fresh": fresh}
            if group["use_spectral"]:
                self._spectral_plan(plan, idx, measured)
            plans.append(plan)
        for plan in plans:  # commit: nothing below can fail on checked inputs
            self._commit(plan)
        return loss

    @staticmethod
    def _new_state(group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        dtype = torch.float32 if p.dtype in _HALF else p.dtype
        if group["use_spectral"]:
            return {"step": torch.tensor(0.0), "momentum_buffer": torch.zeros_like(p, dtype=dtype)}
        return {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=dtype),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype)}

    def _spectral_plan(self, plan: dict[str, Any], idx: list[int],
                       measured: Mapping[str, Any] | None) -> None:
        group, states = plan["group"], plan["states"]
        picked = [group_alpha(group, i, st, int(st["step"]), measured)
                  for i, st in zip(idx, states)]
        owners, rank, world = None, 0, 1
        if group["distributed"] and _dist.is_distributed():
            world = _dist.world_size()
            rank = torch.distributed.get_rank()
            owners = assign_owners([p.numel() for p in plan["params"]], world)
        try:
            bufs, upds = spectral_directions(
                plan["grads"], [st["momentum_buffer"] for st in states], [a for a, _ in picked],
                damping=group["damping"], damping_mode=group["damping_mode"],
                momentum=group["momentum"], nesterov=group["nesterov"],
                rms_target=group["rms_target"], blocks=group["blocks"], owners=owners,
                rank=rank, world=world,
            )
        except RuntimeError as err:  # e.g. a linear-algebra failure: name the parameters
            names = ", ".join(param_label(group, i) for i in idx)
            raise RuntimeError(f"SpectralNewton: the spectral update of {names} failed "
                               f"({err}); nothing was updated") from err
        plan.update(bufs=bufs, upds=upds, alpha_state=[s for _, s in picked])

    def _commit(self, plan: dict[str, Any]) -> None:
        group, params, states = plan["group"], plan["params"], plan["states"]
        for p, st in plan["fresh"].items():
            self.state[p] = st
        if not group["use_spectral"]:
            beta1, beta2 = group["betas"]
            adamw(params, plan["grads"], [st["exp_avg"] for st in states],
                  [st["exp_avg_sq"] for st in states], [st["step"] for st in states],
                  lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"])
            return
        lr, wd = group["lr"], group["weight_decay"]
        torch._foreach_copy_([st["momentum_buffer"] for st in states], plan["bufs"])
        for st, extra in zip(states, plan["alpha_state"]):
            st["step"] += 1
            st.update(extra)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, plan["upds"])],
                            alpha=-lr)
