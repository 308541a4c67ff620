r"""The paper's per-layer quantities: exponents, the transfer identity, the alpha budget.

Implements the measurement protocol of "Spectral Asymptotics of Neural Network Loss Landscapes:
An Exact Decomposition of the Curvature Exponent" (Calvo, 2026, arXiv:2606.02596). Over the
top-``K`` window of the gradient's singular values ``sigma_k`` and the exact directional curvatures
``h_k``:

* ``alpha``: slope of ``log h_k`` on ``log sigma_k`` (k with ``h_k > 0``); also over ``k >= 2``
  (``h_1`` has high leverage), Theil-Sen, a confidence interval, and above the half-batch noise
  floor;
* ``gamma``: minus the slope of ``log sigma_k`` on ``log k``;
* ``s_rayleigh``: minus the slope of ``log h`` (positive, sorted descending) on ``log rank``;
  ``s_lanczos``: the same for the top Hessian-block eigenvalues (independent check);
* the transfer identity ``s = alpha * gamma``: ``predicted_s`` and ``|s - alpha gamma| / s``;
* ``Psi_k = h_k / sigma_k^2`` with ``alpha = 2 + b(Psi)``, and the alignment budget of
  :mod:`curvlens.alignment`;
* participation ratios, the zeta bound, BIC rank-profile models.

**Paper-compatible mode.** By default the window stops at the gradient's numerical rank
(``sigma_k > tol * sigma_1``, ``tol = max(m, n) * eps`` of the input's dtype), because a zero
singular value has no logarithm and a round-off one (1e-8 for a 10-class head, whose gradient has
rank 9) dominates a log-log fit. ``paper_compatible=True`` keeps every ``k`` of the window, as the
paper did; it reproduces the paper's published per-layer results
(``tests/data/spectral_alignment``) to 1e-9.

**The two s, intervals, trust.** What each ``s`` means and what a gap between them implies, the
confidence intervals and the trust flags: see :mod:`curvlens.trust` and :mod:`curvlens.fit`.

Every undefined quantity is NaN with its reason in ``LayerReport.nan_reasons`` and ``warnings``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlens._layer_fields import (
    _alignment,
    _alignment_score,
    _curvature_noise,
    _eps_of,
    _Explain,
    _finish,
    _fit_fields,
    _lanczos,
    _noise_floor,
    _rank_models,
    _transfer_error,
    _trust,
    _two_s,
    _vector,
    _weight_corollary,
    _weight_tail,
    _zero_gradient,
    _zeta,
)
from curvlens.alignment import log_slope
from curvlens.fit import Interval, _fit_log_log, _participation, _rank_cut
from curvlens.results import LayerReport, Report
from curvlens.trust import TrustPolicy

__all__ = ["LayerReport", "Report", "analyze_layer"]

_NAN = float("nan")


def analyze_layer(
    sigma: Tensor | Sequence[float],
    h: Tensor | Sequence[float],
    *,
    name: str = "",
    shape: tuple[int, int] | None = None,
    kind: str | None = None,
    C_A: Tensor | None = None,
    C_delta: Tensor | None = None,
    U: Tensor | None = None,
    V: Tensor | None = None,
    lambda_top: Tensor | Sequence[float] | None = None,
    noise_norm: float | None = None,
    weight: Tensor | None = None,
    window: int | None = None,
    paper_compatible: bool = False,
    rank_tol: float | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
    notes: Sequence[str] = (),
    n_samples: int | None = None,
    ritz_vectors: Tensor | None = None,
    interval: Interval | str = Interval.STUDENTIZED,
    level: float = 0.95,
    trust: TrustPolicy | None = None,
    h_halves: tuple[Tensor, Tensor] | None = None,
) -> LayerReport:
    """All of the paper's per-layer quantities from one layer's measurements.

    Args:
        sigma: [K] gradient singular values, descending.
        h: [K] directional curvatures ``h_k = vec(u_k v_k^T)^T H_WW vec(u_k v_k^T)``.
        name: layer name (for messages and the report).
        shape: ``(m, n)`` matrix shape (default: taken from ``U``/``V``, else unknown).
        kind: layer kind (``"conv"``, ``"linear"``, ...).
        C_A: [n, n] and C_delta: [m, m] Kronecker factors; U: [m, K], V: [n, K] singular
            vectors of the gradient. All four are needed for ``h_kron`` and the alpha budget.
        lambda_top: top eigenvalues of the Hessian block ``H_WW`` (any order).
        weight: the layer's weight ``[m, n]`` (matrix view); gives ``weight_alpha``, the
            heavy-tail exponent of its ESD (:func:`curvlens.spectra.weight_tail_stats`), and the
            check of the paper's corollary ``weight_alpha < s``.
        noise_norm: ``||(G1 - G2) / 2||_2`` of two half-batch gradients; the noise floor keeps
            ``sigma_k > 2 * noise_norm``.
        window: use only the first ``window`` entries (default: all ``K``).
        paper_compatible: keep numerically zero singular values in the window (module docstring).
        rank_tol: relative tolerance of the numerical rank (default ``max(m, n) * eps``).
        bootstrap: resamples of every CI when ``interval="bootstrap"``; seed: their seed.
        notes: measurement notes to carry into the report.
        n_samples: samples in the fixed data (gives ``samples_needed``).
        ritz_vectors: [r, m, n] top eigenvectors of ``H_WW`` (``block_eigenvalues(...,
            return_vectors=True)``); with ``U``, ``V`` they give ``alignment_score``.
        interval: ``"studentized"`` (default) or ``"bootstrap"``; level: confidence level of
            every ``*_ci`` (see :mod:`curvlens.fit`).
        trust: thresholds of the trust flags (default :class:`~curvlens.trust.TrustPolicy`).
        h_halves: ``h_k`` measured on two disjoint halves of the samples (e.g. of the
            curvature batches); gives ``curvature_noise`` and its trust flag.

    Returns:
        A :class:`LayerReport`; NaN fields are explained in ``nan_reasons`` and ``warnings``.

    Raises:
        ValueError: empty, mismatched, unsorted, negative or non-finite inputs, bad window, or
            factor shapes that do not match ``U``/``V``.

    Example:
        >>> k = torch.arange(1, 21, dtype=torch.float64)
        >>> rep = analyze_layer(k ** -1.0, k ** -2.0, name="toy", bootstrap=0)
        >>> round(rep.alpha, 12), round(rep.gamma, 12), round(rep.s_rayleigh, 12)
        (2.0, 1.0, 2.0)
        >>> abs(rep.transfer_error_rayleigh) < 1e-12, abs(rep.psi_slope) < 1e-12
        (True, True)
    """
    sig = _vector(sigma, "sigma", name)
    hh = _vector(h, "h", name)
    if sig.numel() == 0:
        raise ValueError(f"layer {name!r}: sigma is empty; pass at least 3 singular values")
    if hh.numel() != sig.numel():
        raise ValueError(f"layer {name!r}: sigma and h need the same length, got "
                         f"{sig.numel()} and {hh.numel()}")
    if window is not None:
        if not isinstance(window, int) or not 1 <= window <= sig.numel():
            raise ValueError(f"layer {name!r}: window must be an int in [1, {sig.numel()}], "
                             f"got {window!r}")
        sig, hh = sig[:window], hh[:window]
    if bool((sig < 0).any()) or bool((sig[1:] > sig[:-1]).any()):
        raise ValueError(f"layer {name!r}: sigma must be non-negative and sorted descending "
                         "(as gradient_svd returns it)")
    K = sig.numel()
    if shape is None and U is not None and V is not None:
        shape = (int(U.shape[0]), int(V.shape[0]))
    ex = _Explain()
    v: dict[str, Any] = {
        "name": name, "shape": tuple(shape) if shape is not None else (0, 0),
        "kind": str(getattr(kind, "value", kind) or ""), "top_k": K,
        "sigma": sig.tolist(), "h": hh.tolist(), "notes": list(notes),
        "n_negative_h": int((hh <= 0).sum()),
    }
    _weight_tail(v, ex, weight, name)
    if v["n_negative_h"]:
        bad = torch.nonzero(hh <= 0).flatten().add(1).tolist()
        ex.warn(f"{v['n_negative_h']} of {K} directions have h_k <= 0 (k={bad}); they are "
                "kept in h and left out of the log fits")

    # Window: numerically nonzero singular values (all of them in paper-compatible mode).
    if float(sig[0]) == 0.0:
        v["rank"] = 0
        _zero_gradient(v, ex)
        return _finish(v, ex)
    tol, rank = _rank_cut(sig, max(shape or (K,)), _eps_of(sigma), rank_tol)
    v["rank"] = rank
    keep = torch.ones(K, dtype=torch.bool) if paper_compatible else torch.arange(K) < rank
    if rank < K:
        ex.warn(f"rank {rank} < K={K}: sigma_k <= {tol:.2g} * sigma_1 for k > {rank}; " + (
            "kept in the fits (paper-compatible mode)" if paper_compatible
            else "the fits use k <= rank"))
    ks = torch.arange(1, K + 1)
    pos = keep & (hh > 0) & (sig > 0)
    sk, hk = sig[keep], hh[keep]
    fit = dict(bootstrap=bootstrap, seed=seed, interval=interval, level=level)

    alpha = _fit_log_log(sk, hk, sign=1.0, what="alpha fit", **fit)
    _fit_fields(v, ex, "alpha", alpha)
    v["alpha_theil_sen"], v["alpha_n"] = alpha.theil_sen, alpha.n
    if not alpha.ok:
        ex.nan(["alpha_theil_sen"], ex.reasons["alpha"])
    k2 = _fit_log_log(sig[keep & (ks >= 2)], hh[keep & (ks >= 2)], sign=1.0,
                      what="alpha fit over k >= 2", bootstrap=0, seed=seed)
    v["alpha_k2"] = k2.exponent
    if not k2.ok:
        ex.nan(["alpha_k2"], "; ".join(k2.warnings))
    ranks = torch.arange(1, int(keep.sum()) + 1, dtype=torch.float64)
    gamma = _fit_log_log(ranks, sk, sign=-1.0, what="gamma fit", **fit)
    _fit_fields(v, ex, "gamma", gamma)
    v["gamma_theil_sen"] = gamma.theil_sen
    if not gamma.ok:
        ex.nan(["gamma_theil_sen"], ex.reasons["gamma"])
    h_sorted = hh[pos].sort(descending=True).values
    s_r = _fit_log_log(torch.arange(1, h_sorted.numel() + 1, dtype=torch.float64), h_sorted,
                       sign=-1.0, what="s_rayleigh fit", **fit)
    _fit_fields(v, ex, "s_rayleigh", s_r)
    v["psi_slope"] = log_slope(sig, hh / sig.square(), pos) if alpha.ok else _NAN
    if not alpha.ok:
        ex.nan(["psi_slope"], ex.reasons["alpha"])
    v["predicted_s"] = alpha.exponent * gamma.exponent
    if math.isnan(v["predicted_s"]):
        ex.nan(["predicted_s"], "alpha or gamma is undefined")
    v["transfer_error_rayleigh"] = _transfer_error(s_r.exponent, v["predicted_s"], ex, "rayleigh")
    if h_sorted.numel():
        v["pr_h"] = _participation(h_sorted)
    else:
        ex.nan(["pr_h"], "no direction with h_k > 0")
    v["zeta_bound"] = _zeta(s_r.exponent, "zeta_bound", "s_rayleigh", ex)

    _lanczos(v, ex, lambda_top, fit, name)
    _two_s(v, ex, h_sorted, fit)
    _alignment_score(v, ex, U, V, ritz_vectors)
    _noise_floor(v, ex, noise_norm, sig, hh, keep, name)
    _curvature_noise(v, ex, h_halves, keep, name)
    _trust(v, ex, trust or TrustPolicy(), int(keep.sum()), n_samples)
    _rank_models(v, ex, sk)
    _alignment(v, ex, sig, hh, keep, C_A, C_delta, U, V)
    _weight_corollary(v, ex)
    return _finish(v, ex)


