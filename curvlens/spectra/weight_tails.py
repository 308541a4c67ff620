r"""Heavy tails of weight spectra (empirical spectral densities, ESDs) of trained layers.

Martin & Mahoney's heavy-tailed self-regularization (as implemented in WeightWatcher) reads a
layer's quality from the tail of the ESD of its weight matrix; "Scaling Laws and Spectra of Shallow
Neural Networks in the Feature Learning Regime" (Defilippis, Xu, Girardin, Troiani, Erba,
Zdeborová, Loureiro & Krzakala, 2025, arXiv:2509.24882) derives when such power-law tails
emerge and how they track generalization. This module measures them.

ESD and normalization:
    The ESD of ``W`` ``[m, n]`` (conv: ``weight.flatten(1)``, i.e. ``[out, in/groups*prod(k)]``,
    one matrix per layer, *not* WeightWatcher's per-kernel-position slices) is the set of the
    ``min(m, n)`` squared singular values. ``normalization="raw"`` keeps
    :math:`\lambda_i = \sigma_i^2`; ``normalization="ww"`` uses WeightWatcher's
    :math:`\lambda_i = \sigma_i^2 / N` with :math:`N = \max(m, n)`, the eigenvalues of
    :math:`W^T W / N`. The tail exponent ``alpha``, the stable rank and the spectral entropy do not
    depend on the choice; norms, ``alpha_weighted`` and the Marchenko-Pastur edge do.

The tail exponent is the Clauset-Shalizi-Newman fit of
:mod:`curvlens.spectra.power_law_tail`.

WeightWatcher's layer metrics (logs are base 10, as there): ``alpha_weighted = alpha *
log10(lambda_max)``, ``log_spectral_norm = log10(lambda_max)``, ``log_frobenius_norm =
log10(sum lambda) = log10 ||W||_F^2``, ``stable_rank = sum lambda / lambda_max``,
``spectral_entropy = -sum p ln p / ln r`` with :math:`p = \lambda / \sum\lambda` over the
:math:`r` nonzero eigenvalues (1 for a flat spectrum, 0 for rank one).

Marchenko-Pastur bulk: for i.i.d. entries of variance :math:`s^2` the raw ESD has its bulk edge at
:math:`\lambda_+ = s^2 (\sqrt m + \sqrt n)^2` (divide by :math:`N` for ``"ww"``); by default
:math:`s^2 = \|W\|_F^2 / (mn)` (the mean square entry, which heavy tails and spikes inflate; pass
``mp_variance`` to override). At finite size the top bulk eigenvalue fluctuates around the edge
on the Tracy-Widom scale :math:`\tau = s^2 (\sqrt m + \sqrt n)(m^{-1/2} + n^{-1/2})^{1/3}`
(Johnstone 2001), so ``n_spikes`` counts eigenvalues above :math:`\lambda_+ + 2\tau` (about the
99% Tracy-Widom quantile: a pure-noise matrix shows a spurious spike ~1% of the time).

The main paper's corollary checked in reports: ``alpha_weight < s`` for each layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn

from curvlens._arrays import all_finite
from curvlens._options import parse_option
from curvlens.layers import find_layers
from curvlens.spectra.power_law_tail import PowerLawTail, fit_powerlaw_tail, hill_estimator

__all__ = [
    "Normalization",
    "PowerLawTail",
    "WeightTailStats",
    "esd",
    "fit_powerlaw_tail",
    "hill_estimator",
    "weight_tail_stats",
    "model_weight_tails",
    "format_weight_tails",
]


class Normalization(str, Enum):
    """How the ESD is scaled: raw squared singular values, or WeightWatcher's ``/ max(m, n)``."""

    RAW = "raw"
    WW = "ww"


def _normalization(value: Normalization | str) -> Normalization:
    return parse_option(Normalization, value, "normalization")


def _as_matrix(weight: Tensor | np.ndarray, name: str = "weight") -> Tensor:
    w = torch.as_tensor(weight)
    if w.dim() < 2:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}; an ESD needs a matrix (conv weights are "
            "viewed as weight.flatten(1))"
        )
    if not torch.is_floating_point(w):
        raise TypeError(f"{name} must be a floating tensor, got dtype {w.dtype}")
    w = w.detach().flatten(1).to(device="cpu", dtype=torch.float64)
    if not all_finite(w):
        raise ValueError(f"{name} contains NaN or Inf entries; its ESD is undefined")
    return w


def esd(weight: Tensor | np.ndarray, normalization: Normalization | str = "raw") -> Tensor:
    """Empirical spectral density of a weight matrix: its squared singular values.

    Args:
        weight: ``[m, n]`` or a conv weight ``[out, in/groups, *kernel]`` (viewed as
            ``flatten(1)``).
        normalization: ``"raw"`` (squared singular values) or ``"ww"`` (divided by
            ``max(m, n)``).

    Returns:
        ``[min(m, n)]`` float64 eigenvalues, descending.

    Example:
        >>> import torch
        >>> esd(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([9., 1.], dtype=torch.float64)
    """
    norm = _normalization(normalization)
    w = _as_matrix(weight)
    # the eigenvalues of the smaller Gram matrix (float64) ARE the ESD: a 512 x 4608 conv weight
    # costs one 512 x 512 eigendecomposition instead of an SVD of the whole matrix
    a = w if w.shape[0] <= w.shape[1] else w.mT
    lam = torch.linalg.eigvalsh(a @ a.mT).flip(0).clamp_min(0)
    if norm is Normalization.WW:
        lam = lam / max(w.shape)
    return lam


@dataclass(frozen=True)
class WeightTailStats:
    """Tail and norm metrics of one weight matrix's ESD (see the module docstring).

    ``alpha`` etc. are NaN (with a message in ``warnings``) when the ESD is too short to fit.
    """

    shape: tuple[int, int]
    normalization: str
    n_eigs: int
    lambda_max: float
    alpha: float
    alpha_sigma: float
    xmin: float
    n_tail: int
    ks_distance: float
    alpha_hill: float
    alpha_weighted: float
    log_spectral_norm: float
    log_frobenius_norm: float
    stable_rank: float
    spectral_entropy: float
    mp_variance: float
    mp_edge: float
    tw_scale: float
    n_spikes: int
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """A JSON-friendly dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["warnings"] = list(self.warnings)
        return d


def weight_tail_stats(
    weight: Tensor | np.ndarray,
    *,
    normalization: Normalization | str = "raw",
    xmin: float | None = None,
    min_tail: int = 10,
    mp_variance: float | None = None,
    name: str = "weight",
) -> WeightTailStats:
    """All ESD tail and norm metrics of one weight matrix.

    Args:
        weight: ``[m, n]`` or a conv weight (viewed as ``flatten(1)``).
        normalization: ``"raw"`` or ``"ww"`` (see the module docstring).
        xmin: fix the power-law cutoff (default: chosen by minimal KS distance).
        min_tail: smallest tail the CSN fit may choose.
        mp_variance: entry variance for the Marchenko-Pastur edge (default: mean square entry).
        name: used in messages.

    Returns:
        A :class:`WeightTailStats`; ``alpha_hill`` is Hill's ``1 + 1/H_k`` on the same tail
        (``k = n_tail - 1``, threshold ``xmin``).

    Example:
        >>> import torch
        >>> s = weight_tail_stats(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)))
        >>> s.shape, s.n_eigs, s.n_spikes
        ((300, 200), 200, 0)
    """
    norm = _normalization(normalization)
    w = _as_matrix(weight, name)
    m, n = w.shape
    lam_all = esd(w, norm)
    lam_max = float(lam_all[0])
    tol = lam_max * max(m, n) * torch.finfo(torch.float64).eps
    lam = lam_all[lam_all > tol].numpy()
    total = float(lam.sum())
    msgs: list[str] = []
    if lam.size == 0:
        raise ValueError(f"{name} is zero; its ESD is empty")
    p = lam / total
    entropy = float(-(p * np.log(p)).sum() / math.log(lam.size)) if lam.size > 1 else 0.0
    scale = 1.0 if norm is Normalization.RAW else 1.0 / max(m, n)
    s2 = float(mp_variance) if mp_variance is not None else float((w**2).mean())
    edge = s2 * (math.sqrt(m) + math.sqrt(n)) ** 2 * scale
    tw = s2 * (math.sqrt(m) + math.sqrt(n)) * (m**-0.5 + n**-0.5) ** (1 / 3) * scale
    nan = float("nan")
    alpha = sigma = x0 = ks = hill = nan
    k_tail = 0
    try:
        fit = fit_powerlaw_tail(lam, xmin=xmin, min_tail=min_tail)
        alpha, sigma, x0, k_tail, ks = fit.alpha, fit.sigma, fit.xmin, fit.n_tail, fit.ks_distance
        if k_tail >= 2:
            hill = 1.0 + 1.0 / hill_estimator(lam, k_tail - 1)
    except ValueError as err:
        msgs.append(f"{name}: power-law fit undefined ({err})")
    for msg in msgs:
        warnings.warn(msg, stacklevel=2)
    return WeightTailStats(
        shape=(int(m), int(n)),
        normalization=norm.value,
        n_eigs=int(lam_all.numel()),
        lambda_max=lam_max,
        alpha=alpha,
        alpha_sigma=sigma,
        xmin=x0,
        n_tail=int(k_tail),
        ks_distance=ks,
        alpha_hill=hill,
        alpha_weighted=alpha * math.log10(lam_max),
        log_spectral_norm=math.log10(lam_max),
        log_frobenius_norm=math.log10(total),
        stable_rank=total / lam_max,
        spectral_entropy=entropy,
        mp_variance=s2,
        mp_edge=edge,
        tw_scale=tw,
        n_spikes=int((lam_all > edge + 2 * tw).sum()),
        warnings=tuple(msgs),
    )


def model_weight_tails(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    normalization: Normalization | str = "raw",
    min_tail: int = 10,
    on_unsupported: str = "skip",
) -> dict[str, WeightTailStats]:
    """:func:`weight_tail_stats` for every supported layer of ``model`` (module order).

    Args:
        model: any model; layers are found with :func:`curvlens.layers.find_layers`.
        layers: restrict to these qualified names.
        normalization, min_tail: as in :func:`weight_tail_stats`.
        on_unsupported: passed to ``find_layers`` (default ``"skip"``: weights only).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> list(model_weight_tails(net, min_tail=5))
        ['0', '2']
    """
    found = find_layers(model, layers, on_unsupported=on_unsupported)
    return {
        name: weight_tail_stats(info.matrix(), normalization=normalization, min_tail=min_tail,
                                name=name)
        for name, info in found.items()
    }


def format_weight_tails(results: dict[str, WeightTailStats]) -> str:
    """A plain-text table of per-layer weight-tail metrics."""
    head = (f"{'layer':<24} {'shape':>12} {'alpha':>7} {'+-':>6} {'n_tail':>6} {'hill':>7} "
            f"{'a_w':>7} {'log|W|2':>8} {'logF':>7} {'srank':>7} {'entropy':>7} {'spikes':>6}")
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        shape = f"{s.shape[0]}x{s.shape[1]}"
        lines.append(
            f"{name:<24} {shape:>12} {s.alpha:7.3f} {s.alpha_sigma:6.3f} {s.n_tail:6d} "
            f"{s.alpha_hill:7.3f} {s.alpha_weighted:7.3f} {s.log_spectral_norm:8.3f} "
            f"{s.log_frobenius_norm:7.3f} {s.stable_rank:7.2f} {s.spectral_entropy:7.3f} "
            f"{s.n_spikes:6d}"
        )
    return "\n".join(lines)
