r"""Spectral Newton maths as pure functions (no optimizer state, keyword-only options).

The main paper ("Spectral Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition
of the Curvature Exponent", Calvo, 2026, arXiv:2606.02596) measures, per layer,
``h_k ~ sigma_k^alpha`` for the directional curvature along the gradient's singular directions
``D_k = u_k v_k^T``. A Newton step in that basis divides each singular value by its curvature;
with damping ``d`` this is the transform

.. math::
    T(\sigma; \alpha) = \frac{\sigma}{\sigma^\alpha + d},
    \qquad \Delta W = -\mathrm{lr}\; U \operatorname{diag}(T(\sigma)) V^\top
    \quad\text{for}\quad M = U \operatorname{diag}(\sigma) V^\top .

``alpha = 1, d -> 0`` gives ``U V^T`` (Muon's orthogonalized update); ``alpha = 2`` gives the
ridge-regularized Gauss-Newton-like step ``(M M^T + d I)^{-1} M``; a huge ``d`` gives ``M / d``.

Three kernels compute the same matrix:

* :func:`spectral_update_svd`: the reference, an explicit ``torch.linalg.svd``.
* :func:`spectral_update_cholesky`: ``alpha = 2`` only, one Cholesky solve with the smaller Gram
  matrix ``S = M M^T`` (``m <= n``) or ``M^T M`` (``m > n``):
  ``(M M^T + d I)^{-1} M = M (M^T M + d I)^{-1} = U diag(sigma / (sigma^2 + d)) V^T``.
* :func:`spectral_update_eigh`: any ``alpha``, ``S = Q diag(lambda) Q^T`` and
  ``Q diag(f(lambda)) Q^T M`` with ``f(lambda) = 1 / (lambda^{alpha/2} + d)``, since
  ``T(sigma) / sigma = 1 / (sigma^alpha + d)`` is finite at ``sigma = 0``.

All kernels take ``M: [m, n]`` or a batch ``[B, m, n]`` and compute in float32 when ``M`` is bf16 or
fp16 (float64 stays float64), casting the result back to ``M``'s dtype. Damping is ``"absolute"``
(``d = damping``) or ``"relative"`` (``d = damping * sigma_1^alpha`` per matrix, with ``sigma_1^2``
the top eigenvalue of the Gram matrix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from curvlens.optim._distributed import broadcast_updates

__all__ = [
    "DampingMode",
    "spectral_transform",
    "spectral_update_svd",
    "spectral_update_cholesky",
    "spectral_update_eigh",
    "spectral_update",
    "scale_to_rms",
    "spectral_newton",
    "adamw",
]


class DampingMode(str, Enum):
    """How the damping ``d`` in ``T(sigma) = sigma / (sigma^alpha + d)`` is set."""

    ABSOLUTE = "absolute"  # d = damping
    RELATIVE = "relative"  # d = damping * sigma_1^alpha, per matrix


def _damping_mode(damping_mode: DampingMode | str) -> DampingMode:
    try:
        return DampingMode(damping_mode)
    except ValueError:
        raise ValueError(
            f"damping_mode must be one of {[m.value for m in DampingMode]}, got {damping_mode!r}"
        ) from None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise (float64 references stay exact)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spectral_transform(sigma: Tensor, *, alpha: float, damping: float | Tensor) -> Tensor:
    r"""``T(sigma) = sigma / (sigma^alpha + d)``, elementwise.

    Args:
        sigma: singular values ``[...]``, non-negative.
        alpha: curvature exponent (``h_k ~ sigma_k^alpha``).
        damping: ``d >= 0``; a tensor broadcasts against ``sigma``.

    Example:
        >>> import torch
        >>> spectral_transform(torch.tensor([0.0, 1.0, 2.0]), alpha=2.0, damping=1.0)
        tensor([0.0000, 0.5000, 0.4000])
    """
    return sigma / (sigma.pow(alpha) + damping)


def _resolve_damping(
    top_sq: Tensor, *, alpha: float, damping: float, mode: DampingMode
) -> Tensor | float:
    """``d`` for each matrix: ``[B, 1, 1]`` in relative mode (from ``sigma_1^2 = top_sq [B]``)."""
    if mode is DampingMode.ABSOLUTE:
        return damping
    return (damping * top_sq.clamp_min(0).pow(alpha / 2))[..., None, None]


def spectral_update_svd(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""Reference: ``U diag(T(sigma)) V^T`` from an explicit thin SVD of ``M``.

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        alpha: curvature exponent.
        damping: ``d`` (absolute) or ``delta`` (relative, ``d = delta * sigma_1^alpha``).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    X = M.to(_compute_dtype(M.dtype))
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # U: [..., m, k], S: [..., k]
    d = _resolve_damping(S[..., 0] ** 2, alpha=alpha, damping=damping, mode=mode)
    if isinstance(d, Tensor):
        d = d[..., 0]  # [..., 1] against S [..., k]
    T = spectral_transform(S, alpha=alpha, damping=d)
    return ((U * T.unsqueeze(-2)) @ Vh).to(M.dtype)


def _gram(X: Tensor) -> tuple[Tensor, bool]:
    """The smaller Gram matrix ``[..., k, k]`` and whether it is ``X^T X`` (tall ``X``)."""
    tall = X.shape[-2] > X.shape[-1]
    Xt = X.mT
    return (Xt @ X if tall else X @ Xt), tall


def spectral_update_cholesky(
    M: Tensor,
    *,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""``alpha = 2``: ``(M M^T + d I)^{-1} M`` (or ``M (M^T M + d I)^{-1}`` for tall ``M``).

    One Cholesky factorization of the smaller ``[k, k]`` Gram matrix, ``k = min(m, n)``. Relative
    damping needs ``sigma_1^2``, taken from ``eigvalsh`` of the Gram matrix. Where the factorization
    fails (``d = 0`` with a singular Gram matrix) the matrices are redone by
    :func:`spectral_update_eigh`, which treats zero singular values as a pseudo-inverse does.

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        damping: ``d`` (absolute) or ``delta`` (relative).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``U diag(sigma / (sigma^2 + d)) V^T``, ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    X = M.to(_compute_dtype(M.dtype))
    S, tall = _gram(X)  # [..., k, k]
    top = torch.linalg.eigvalsh(S)[..., -1] if mode is DampingMode.RELATIVE else S.new_zeros(())
    d = _resolve_damping(top, alpha=2.0, damping=damping, mode=mode)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(S + d * eye)
    # Wide X: (S + dI)^{-1} X. Tall X, on the right: X (S + dI)^{-1}. The inverse from the
    # factor (k^3) and one matmul beat cholesky_solve's triangular solves with max(m, n) >> k
    # right-hand sides (~5x on CPU for 64 x 512); d > 0 bounds its condition number.
    failed = info.ne(0)  # [...]: factorization failed (redone below); invert I there
    inv = torch.cholesky_inverse(torch.where(failed[..., None, None], eye, L))  # [..., k, k]
    out = X @ inv if tall else inv @ X
    # cholesky_ex reports failures per matrix without raising; one host sync to check them.
    if failed.any():
        bad = failed
        redo = spectral_update_eigh(X[bad] if X.dim() > 2 else X, alpha=2.0, damping=damping,
                                    damping_mode=mode)
        if X.dim() > 2:
            out[bad] = redo
        else:
            out = redo
    return out.to(M.dtype)


def spectral_update_eigh(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    r"""Any ``alpha``: ``Q diag(1 / (lambda^{alpha/2} + d)) Q^T M`` by ``eigh`` of the Gram matrix.

    With ``S = M M^T = Q diag(lambda) Q^T`` (``lambda = sigma^2``) this is
    ``U diag(sigma / (sigma^alpha + d)) V^T`` (for tall ``M`` the same on the right with ``M^T M``).
    Eigenvalues below ``k * eps * lambda_max`` are rounding noise of zero singular values and are
    set to zero; for ``d = 0`` their factor is set to zero as well (a pseudo-inverse), since the
    matching components of ``M`` vanish.

    Args:
        M: ``[m, n]`` or ``[B, m, n]``.
        alpha: curvature exponent.
        damping: ``d`` (absolute) or ``delta`` (relative).
        damping_mode: ``"absolute"`` or ``"relative"``.

    Returns:
        ``[m, n]`` or ``[B, m, n]``, ``M``'s dtype.
    """
    mode = _damping_mode(damping_mode)
    X = M.to(_compute_dtype(M.dtype))
    S, tall = _gram(X)
    lam, Q = torch.linalg.eigh(S)  # lam: [..., k] ascending, Q: [..., k, k]
    k = lam.shape[-1]
    floor = lam[..., -1:].clamp_min(0) * (k * torch.finfo(lam.dtype).eps)  # [..., 1]
    zero = lam <= floor
    lam = torch.where(zero, torch.zeros_like(lam), lam)
    d = _resolve_damping(lam[..., -1], alpha=alpha, damping=damping, mode=mode)
    if isinstance(d, Tensor):
        d = d[..., 0]  # [..., 1]
    denom = lam.pow(alpha / 2) + d
    f = torch.where(zero & (denom == 0), torch.zeros_like(lam), 1.0 / denom)  # [..., k]
    P = (Q * f.unsqueeze(-2)) @ Q.mT  # [..., k, k]: k^3, then one [k, k] x [k, max(m, n)]
    out = X @ P if tall else P @ X
    return out.to(M.dtype)


def spectral_update(
    M: Tensor,
    *,
    alpha: float,
    damping: float,
    damping_mode: DampingMode | str = DampingMode.ABSOLUTE,
) -> Tensor:
    """Dispatch: Cholesky for ``alpha == 2``, ``eigh`` otherwise (never a full SVD)."""
    if float(alpha) == 2.0:
        return spectral_update_cholesky(M, damping=damping, damping_mode=damping_mode)
    return spectral_update_eigh(M, alpha=alpha, damping=damping, damping_mode=damping_mode)


def scale_to_rms(update: Tensor, *, target: float, eps: float = 1e-12) -> Tensor:
    r"""Rescale each matrix so that its root-mean-square entry is ``target``.

    This is the exact version of Moonlight's ``0.2 * sqrt(max(m, n))`` factor ("Muon is Scalable
    for LLM Training", 2025): that factor gives RMS 0.2 only for an orthogonal full-rank update
    (``alpha = 1, d = 0``), while ``T(sigma)`` is not orthogonal in general, so we measure the RMS.
    With ``target = 0.2`` (AdamW's typical update RMS) AdamW learning rates transfer.

    Args:
        update: ``[m, n]`` or ``[B, m, n]``.
        target: the RMS to reach.
        eps: guards a zero update (which stays zero).
    """
    rms = update.to(_compute_dtype(update.dtype)).pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    return update * (target / rms.clamp_min(eps)).to(update.dtype)


def spectral_newton(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    alphas: Sequence[float],
    *,
    lr: float,
    damping: float,
    damping_mode: DampingMode | str,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    rms_target: float | None,
    batched: bool = True,
    owners: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
) -> None:
    r"""One Spectral Newton step, in place, on matrix parameters (any ``ndim >= 2``).

    For each parameter ``W`` (viewed as ``W.flatten(1)``, ``[m, n]``) with gradient ``G``::

        B <- momentum * B + (1 - momentum) * G     (an EMA: buf.lerp_(G, 1 - momentum))
        M  = (1 - momentum) * G + momentum * B  if nesterov else B   (G.lerp(B, momentum))
        W <- W * (1 - lr * weight_decay)           (decoupled)
        W <- W - lr * U diag(T(sigma; alpha)) V^T  for M = U diag(sigma) V^T

    The buffer follows Muon's convention (KellerJordan/Muon, ``torch.optim.Muon``), on which the
    main paper builds, so that ``M`` has the gradient's scale and the paper's damping values
    (``d = 0.1, 0.01``) mean what they mean there. An SGD-style sum ``b`` (``torch.optim.SGD``)
    is ``b = B / (1 - momentum)``, ``~1/(1 - momentum)`` times larger.

    Args:
        params, grads, momentum_buffers: same-length lists; buffers ``float32`` for half params.
        alphas: per-parameter exponent.
        lr, damping, damping_mode, momentum, nesterov, weight_decay: as in
            :class:`~curvlens.optim.SpectralNewton`.
        rms_target: rescale each update to this RMS (:func:`scale_to_rms`), or ``None``.
        batched: stack parameters with equal matrix shape, dtype and alpha into one kernel call;
            ``False`` is the single-tensor reference path.
        owners: under ``torch.distributed``, the rank that computes each parameter's update
            (:func:`curvlens.optim._distributed.assign_owners`); the updates are then broadcast
            from their owners (:func:`~curvlens.optim._distributed.broadcast_updates`). The
            gradients must already be identical on every rank (all-reduced, as DDP does).
            ``None``: compute everything here.
        rank, world: this process's rank and the number of ranks (with ``owners``).
    """
    mode = _damping_mode(damping_mode)
    grads = [g.to(b.dtype) for g, b in zip(grads, momentum_buffers)]
    if batched:  # multi-tensor kernels: one call per operation, not per parameter
        torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
        Ms = torch._foreach_lerp(grads, momentum_buffers, momentum) if nesterov else list(
            momentum_buffers)
        Ms = [M.flatten(1) for M in Ms]
    else:
        Ms = []
        for g, b in zip(grads, momentum_buffers):
            b.lerp_(g, 1 - momentum)
            Ms.append((g.lerp(b, momentum) if nesterov else b).flatten(1))

    mine = [i for i in range(len(Ms)) if owners is None or owners[i] == rank]
    if batched:
        buckets: dict[tuple, list[int]] = {}
        for i in mine:
            M = Ms[i]
            buckets.setdefault((tuple(M.shape), M.dtype, M.device, float(alphas[i])), []).append(i)
        chunks = [(idx, torch.stack([Ms[i] for i in idx])) for idx in buckets.values()]
    else:
        chunks = [([i], Ms[i].unsqueeze(0)) for i in mine]

    upds: list[Tensor | None] = [None] * len(Ms)
    for idx, stack in chunks:  # stack: [B, m, n]
        upd = spectral_update(stack, alpha=float(alphas[idx[0]]), damping=damping,
                              damping_mode=mode)
        if rms_target is not None:
            upd = scale_to_rms(upd, target=rms_target)
        for j, i in enumerate(idx):
            upds[i] = upd[j]
    if owners is not None and world > 1:
        upds = broadcast_updates(upds, owners, [M.shape for M in Ms], [M.dtype for M in Ms],
                                 rank=rank, world=world, device=Ms[0].device)
    upds = [u.view_as(p).to(p.dtype) for p, u in zip(params, upds)]
    if batched:
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, upds, alpha=-lr)
        return
    for p, u in zip(params, upds):
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.add_(u, alpha=-lr)


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
