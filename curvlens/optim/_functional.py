r"""SpectralNewton's step as pure functions (no optimizer state, keyword-only options).

:func:`spectral_directions` computes new momentum buffers and the updates without touching its
inputs, so that the optimizer can check everything before it changes anything;
:func:`spectral_newton` is the in-place step built on it; :func:`adamw` is the AdamW part. The
matrix kernels are in :mod:`curvlens.optim._kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlens.optim._distributed import broadcast_updates
from curvlens.optim._kernels import (
    DampingMode,
    _damping_mode,
    scale_to_rms,
    spectral_update,
)

__all__ = ["spectral_directions", "spectral_newton", "adamw", "finite_or_zero"]


def finite_or_zero(grads: Sequence[Tensor]) -> list[Tensor]:
    """Each gradient, or zeros where it has any NaN/Inf (no host sync).

    Example:
        >>> import torch
        >>> finite_or_zero([torch.tensor([1.0, float("nan")]), torch.ones(2)])
        [tensor([0., 0.]), tensor([1., 1.])]
    """
    return [torch.where(torch.isfinite(g).all(), g, torch.zeros_like(g)) for g in grads]


def spectral_directions(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    alphas: Sequence[float],
    *,
    damping: float,
    damping_mode: DampingMode | str,
    momentum: float,
    nesterov: bool,
    rms_target: float | None,
    blocks: int = 1,
    batched: bool = True,
    owners: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[Tensor], list[Tensor]]:
    r"""New momentum buffers and update directions, without changing any input.

    For each gradient ``G`` (viewed as ``G.flatten(1)``, ``[m, n]``, split into ``blocks`` row
    blocks ``[m / blocks, n]``)::

        B' = momentum * B + (1 - momentum) * G      (an EMA: B.lerp(G, 1 - momentum))
        M  = (1 - momentum) * G + momentum * B'  if nesterov else B'
        U  = U_M diag(T(sigma; alpha)) V_M^T        for M = U_M diag(sigma) V_M^T, per block

    The buffer follows Muon's convention (KellerJordan/Muon, ``torch.optim.Muon``), so that ``M``
    has the gradient's scale. An SGD-style sum ``b`` (``torch.optim.SGD``) is
    ``b = B / (1 - momentum)``.

    Args:
        grads, momentum_buffers: same-length lists; buffers ``float32`` for half params.
        alphas: per-parameter exponent.
        damping, damping_mode, momentum, nesterov: as in :class:`~curvlens.optim.SpectralNewton`.
        rms_target: rescale each block's update to this RMS (:func:`scale_to_rms`), or ``None``.
        blocks: row blocks per matrix (3 for a fused query-key-value projection).
        batched: stack matrices with equal shape, dtype and alpha into one kernel call;
            ``False`` is the single-tensor reference path.
        owners: under ``torch.distributed``, the rank that computes each parameter's update
            (:func:`curvlens.optim._distributed.assign_owners`); the updates are then broadcast
            from their owners. The gradients must be identical on every rank. ``None``: compute
            everything here.
        rank, world: this process's rank and the number of ranks (with ``owners``).

    Returns:
        ``(new_buffers, updates)``: buffers in the buffers' dtype, updates shaped as the
        gradients, in the buffers' dtype.
    """
    mode = _damping_mode(damping_mode)
    grads = [g.to(b.dtype) for g, b in zip(grads, momentum_buffers)]
    if batched:  # multi-tensor kernels: one call per operation, not per parameter
        bufs = torch._foreach_lerp(momentum_buffers, grads, 1 - momentum)
        Ms = torch._foreach_lerp(grads, bufs, momentum) if nesterov else list(bufs)
    else:
        bufs = [b.lerp(g, 1 - momentum) for g, b in zip(grads, momentum_buffers)]
        Ms = [g.lerp(b, momentum) if nesterov else b for g, b in zip(grads, bufs)]
    for M in Ms:
        if M.shape[0] % blocks:
            raise ValueError(f"blocks={blocks} does not divide the {M.shape[0]} rows of a matrix")
    Ms = [M.reshape(blocks, M.shape[0] // blocks, -1) for M in Ms]  # [blocks, m / blocks, n]

    mine = [i for i in range(len(Ms)) if owners is None or owners[i] == rank]
    if batched:
        buckets: dict[tuple, list[int]] = {}
        for i in mine:
            M = Ms[i]
            buckets.setdefault((tuple(M.shape), M.dtype, M.device, float(alphas[i])), []).append(i)
        chunks = [(idx, torch.cat([Ms[i] for i in idx])) for idx in buckets.values()]
    else:
        chunks = [([i], Ms[i]) for i in mine]

    upds: list[Tensor | None] = [None] * len(Ms)
    for idx, stack in chunks:  # stack: [len(idx) * blocks, m / blocks, n]
        upd = spectral_update(stack, alpha=float(alphas[idx[0]]), damping=damping,
                              damping_mode=mode)
        if rms_target is not None:
            upd = scale_to_rms(upd, target=rms_target)
        for j, i in enumerate(idx):
            upds[i] = upd[j * blocks:(j + 1) * blocks]
    if owners is not None and world > 1:
        upds = broadcast_updates(upds, owners, [M.shape for M in Ms], [M.dtype for M in Ms],
                                 rank=rank, world=world, device=Ms[0].device)
    return list(bufs), [u.reshape(g.shape) for g, u in zip(grads, upds)]


def spectral_newton(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    alphas: Sequence[float],
    *,
    lr: float,
    weight_decay: float,
    **options,
) -> None:
    r"""One Spectral Newton step, in place, on matrix parameters (any ``ndim >= 2``).

    :func:`spectral_directions` (``**options``: its keyword arguments), then::

        W <- W * (1 - lr * weight_decay) - lr * update        (decoupled weight decay)

    and the buffers are replaced by the new ones.
    """
    bufs, upds = spectral_directions(grads, momentum_buffers, alphas, **options)
    torch._foreach_copy_(list(momentum_buffers), bufs)
    upds = [u.to(p.dtype) for p, u in zip(params, upds)]
    if weight_decay != 0:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)
    torch._foreach_add_(list(params), upds, alpha=-lr)


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    foreach: bool = True,
) -> None:
    r"""AdamW (Loshchilov & Hutter, 2019), in place, the same arithmetic as ``torch.optim.AdamW``.

    ``steps`` are 0-dim float tensors, incremented here; moments may be float32 for half params.
    ``foreach=True`` uses torch's multi-tensor kernels (one call per operation, as
    ``torch.optim.AdamW(foreach=True)``); ``False`` is the single-tensor reference loop.
    """
    if not foreach:
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            g = -g if maximize else g
            g = g.to(m.dtype)
            t += 1
            step = float(t)
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias1 = 1 - beta1**step
            bias2_sqrt = math.sqrt(1 - beta2**step)
            denom = (v.sqrt() / bias2_sqrt).add_(eps)
            if p.dtype == m.dtype:
                p.addcdiv_(m, denom, value=-lr / bias1)
            else:
                p.add_((m / denom).to(p.dtype), alpha=-lr / bias1)
        return
    if not params:
        return
    grads = [(-g if maximize else g).to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step = [float(t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in step])
    torch._foreach_add_(denom, eps)
    step_size = [-lr / (1 - beta1**s) for s in step]
    same = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if p.dtype == m.dtype]
    if same:
        torch._foreach_addcdiv_([params[i] for i in same], [exp_avgs[i] for i in same],
                                [denom[i] for i in same], [step_size[i] for i in same])
    for i in sorted(set(range(len(params))) - set(same)):  # half params, float32 moments
        params[i].add_((exp_avgs[i] / denom[i]).to(params[i].dtype), alpha=step_size[i])
