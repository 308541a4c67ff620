r"""Rank-profile models of a spectrum, compared by BIC: power law, exponential, log-normal.

After "Spectral Asymptotics of Neural Network Loss Landscapes: An Exact
Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596), whose model-fit
comparison asks whether the gradient's singular values decay like a power of the rank at all:

.. math::
    \log v_k \sim [1, \log k] \;(\text{power law}), \quad [1, k] \;(\text{exponential}),
    \quad [1, \log k, (\log k)^2] \;(\text{log-normal in rank}),

fitted by OLS, scored by :math:`\mathrm{BIC} = n \log(\mathrm{RSS}/n) + p \log n` (and AIC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from curvlens._arrays import _as_f64

__all__ = ["RankModel", "RankModelFit", "RankModelComparison", "compare_rank_models"]

_NAN = float("nan")


class RankModel(str, Enum):
    """Models of a rank profile ``log v_k`` (OLS design matrices in brackets)."""

    POWER_LAW = "power_law"  # [1, log k]
    EXPONENTIAL = "exponential"  # [1, k]
    LOGNORMAL = "lognormal"  # [1, log k, (log k)^2]


@dataclass(frozen=True)
class RankModelFit:
    """One rank-profile model fitted by OLS to ``log v_k``.

    Attributes:
        model: which model.
        params: the coefficients, named as in the paper's data: power law ``gamma`` (minus the
            slope on ``log k``) and ``log_c``; exponential ``beta`` (minus the slope on ``k``)
            and ``log_c``; log-normal ``a`` (coefficient of ``(log k)^2``), ``b`` (of ``log k``),
            ``log_c``.
        rss: residual sum of squares in ``log v``.
        n: number of points; p: number of coefficients.
        aic: ``n log(RSS/n) + 2p``; bic: ``n log(RSS/n) + p log n`` (NaN when ``n <= p`` or
            ``RSS = 0``).
        valid: whether aic/bic are defined.
    """

    model: RankModel
    params: dict[str, float]
    rss: float
    n: int
    p: int
    aic: float
    bic: float
    valid: bool


@dataclass(frozen=True)
class RankModelComparison:
    """The three rank models and the BIC winner.

    Attributes:
        fits: ``{model name: RankModelFit}``.
        best: name of the model with the lowest BIC (``""`` when none is valid).
        warnings: reasons for invalid fits or dropped points.
    """

    fits: dict[str, RankModelFit]
    best: str
    warnings: tuple[str, ...] = ()

    @property
    def bic(self) -> dict[str, float]:
        return {name: f.bic for name, f in self.fits.items()}

    @property
    def aic(self) -> dict[str, float]:
        return {name: f.aic for name, f in self.fits.items()}


def compare_rank_models(values: Tensor | Sequence[float]) -> RankModelComparison:
    r"""Compare power-law, exponential and log-normal rank profiles of ``values`` by BIC.

    OLS of :math:`\log v_k` on :math:`[1, \log k]`, :math:`[1, k]` and
    :math:`[1, \log k, (\log k)^2]` over ranks ``k = 1..n`` as given (non-positive values are
    left out, keeping the others' ranks). :math:`\mathrm{BIC} = n \log(\mathrm{RSS}/n) + p \log n`,
    :math:`\mathrm{AIC} = n \log(\mathrm{RSS}/n) + 2p`; the lowest BIC wins.

    Args:
        values: [n] e.g. gradient singular values.

    Returns:
        A :class:`RankModelComparison`.

    Example:
        >>> k = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        >>> compare_rank_models([2.0 ** -x * (1 + 0.01 * (-1) ** x) for x in k]).best
        'exponential'
    """
    v = _as_f64(values, "values")
    k = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
    keep = torch.isfinite(v) & (v > 0)
    notes: list[str] = []
    if not bool(keep.all()):
        notes.append(
            f"rank models: dropped {int((~keep).sum())} non-positive or non-finite value(s)"
        )
    k, y = k[keep], v[keep].log()
    n = int(y.numel())
    lk = k.log()
    one = torch.ones_like(k)
    designs = {
        RankModel.POWER_LAW: (torch.stack([one, lk], 1), ("log_c", "gamma"), (1.0, -1.0)),
        RankModel.EXPONENTIAL: (torch.stack([one, k], 1), ("log_c", "beta"), (1.0, -1.0)),
        RankModel.LOGNORMAL: (
            torch.stack([one, lk, lk * lk], 1), ("log_c", "b", "a"), (1.0, 1.0, 1.0)
        ),
    }
    fits: dict[str, RankModelFit] = {}
    for model, (X, names, signs) in designs.items():
        p = X.shape[1]
        if n <= p:
            notes.append(f"rank models: {model.value} needs more than {p} positive values, got {n}")
            fits[model.value] = RankModelFit(
                model, {nm: _NAN for nm in names}, _NAN, n, p, _NAN, _NAN, False
            )
            continue
        coef = torch.linalg.lstsq(X, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        resid = y - X @ coef
        rss = float((resid * resid).sum())
        params = {nm: sg * float(c) for nm, sg, c in zip(names, signs, coef)}
        if rss <= 0.0:
            notes.append(f"rank models: {model.value} fits exactly (RSS = 0), AIC/BIC undefined")
            fits[model.value] = RankModelFit(model, params, rss, n, p, _NAN, _NAN, False)
            continue
        base = n * math.log(rss / n)
        fits[model.value] = RankModelFit(
            model, params, rss, n, p, base + 2 * p, base + p * math.log(n), True
        )
    valid = {name: f.bic for name, f in fits.items() if f.valid}
    best = min(valid, key=valid.__getitem__) if valid else ""
    if not valid:
        notes.append("rank models: no model could be scored, no BIC winner")
    return RankModelComparison(fits=fits, best=best, warnings=tuple(notes))
