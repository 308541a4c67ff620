"""Private helpers of :func:`curvlens.analysis.analyze_layer`: one function per report section.

Each helper fills its fields of the report under construction (a dict ``v``) and records, in an
:class:`_Explain`, why any of them is NaN. See :mod:`curvlens.analysis` for the definitions.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlens.alignment import alignment_budget
from curvlens.fit import (
    PowerLawFit,
    _fit_log_log,
    _participation,
    _zeta_bound_reason,
)
from curvlens.rank_models import compare_rank_models
from curvlens.results import LayerReport
from curvlens.spectra.weight_tails import weight_tail_stats
from curvlens.trust import EXPONENTS, TrustPolicy, alignment_score, samples_needed, trust_flags

_NAN = float("nan")


class _Explain:
    """Collects NaN reasons and caveats while a LayerReport is assembled."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.caveats: list[str] = []
        self.quiet: set[str] = set()

    def nan(self, fields: Iterable[str], reason: str, *, quiet: bool = False) -> None:
        """NaN ``fields`` for ``reason``; a ``quiet`` reason is kept in ``nan_reasons`` but is
        not a warning line (an optional measurement the caller did not ask for)."""
        for name in fields:
            self.reasons.setdefault(name, reason)
        if quiet:
            self.quiet.add(reason)

    def warn(self, message: str) -> None:
        if message not in self.caveats:
            self.caveats.append(message)

    def warnings(self) -> list[str]:
        grouped: dict[str, list[str]] = {}
        for name, reason in self.reasons.items():
            if reason not in self.quiet:
                grouped.setdefault(reason, []).append(name)
        return self.caveats + [f"{', '.join(names)}: NaN, {reason}"
                               for reason, names in grouped.items()]


def _vector(x: Tensor | Sequence[float] | None, what: str, layer: str) -> Tensor | None:
    if x is None:
        return None
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    t = t.to(torch.float64).reshape(-1).cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"layer {layer!r}: {what} holds NaN or Inf; check the measurement")
    return t


def _eps_of(x: object) -> float:
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return torch.finfo(dtype).eps
    if dtype is not None and str(dtype) in ("float16", "float32"):
        return float(torch.finfo(getattr(torch, str(dtype))).eps)
    return torch.finfo(torch.float64).eps


def _fit_fields(v: dict, ex: _Explain, prefix: str, fit: PowerLawFit, *, ci: bool = True) -> None:
    """Copy a fit into ``v[prefix]``, ``v[prefix_r2]`` (, ``_ci``) with NaN reasons."""
    v[prefix], v[f"{prefix}_r2"] = fit.exponent, fit.r2
    names = [prefix, f"{prefix}_r2"]
    if ci:
        v[f"{prefix}_ci"] = fit.ci
        names.append(f"{prefix}_ci")
    reason = "; ".join(w for w in fit.warnings if "non-positive" not in w) or "fit undefined"
    if not fit.ok:
        ex.nan(names, reason)
        return
    if math.isnan(fit.r2):
        ex.nan([f"{prefix}_r2"], reason)
    if ci and math.isnan(fit.ci[0]):
        ex.nan([f"{prefix}_ci"], reason)


def _transfer_error(s: float, predicted: float, ex: _Explain, which: str) -> float:
    name = f"transfer_error_{which}"
    if math.isnan(s) or math.isnan(predicted):
        ex.nan([name], f"s_{which} or predicted_s is undefined")
        return _NAN
    if s == 0.0:
        ex.nan([name], f"s_{which} = 0, the relative error is undefined")
        return _NAN
    return abs(s - predicted) / abs(s)


def _zeta(s: float, field_name: str, source: str, ex: _Explain) -> float:
    value, reason = _zeta_bound_reason(s)
    if reason:
        ex.nan([field_name], f"{reason} ({source})")
    return value


def _lanczos(v: dict, ex: _Explain, lambda_top: Any, fit: dict, name: str) -> None:
    fields = ["s_lanczos", "s_lanczos_r2", "s_lanczos_ci", "transfer_error_lanczos",
              "pr_lambda", "zeta_bound_lanczos"]
    lam = _vector(lambda_top, "lambda_top", name)
    if lam is None or lam.numel() == 0:
        ex.nan(fields, "no Hessian-block eigenvalues given (lambda_top); Lanczos was not run")
        return
    lam = lam.sort(descending=True).values
    v["lambda_top"] = lam.tolist()
    positive = lam[lam > 0]
    v["n_negative_lambda"] = int(lam.numel() - positive.numel())
    if v["n_negative_lambda"]:
        ex.warn(f"{v['n_negative_lambda']} of {lam.numel()} Lanczos eigenvalues are <= 0; "
                "left out of s_lanczos and pr_lambda")
    ranks = torch.arange(1, positive.numel() + 1, dtype=torch.float64)
    s_l = _fit_log_log(ranks, positive, sign=-1.0, what="s_lanczos fit", **fit)
    _fit_fields(v, ex, "s_lanczos", s_l)
    v["transfer_error_lanczos"] = _transfer_error(s_l.exponent, v["predicted_s"], ex, "lanczos")
    if positive.numel():
        v["pr_lambda"] = _participation(positive)
    else:
        ex.nan(["pr_lambda"], "no positive Lanczos eigenvalue")
    v["zeta_bound_lanczos"] = _zeta(s_l.exponent, "zeta_bound_lanczos", "s_lanczos", ex)


def _noise_floor(v: dict, ex: _Explain, noise_norm: float | None, sig: Tensor, hh: Tensor,
                 keep: Tensor, name: str) -> None:
    fields = ["noise_norm", "noise_floor", "alpha_above_floor"]
    if noise_norm is None:
        ex.nan(fields, "no half-batch noise estimate given (noise_norm)")
        return
    noise = float(noise_norm)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"layer {name!r}: noise_norm must be finite and >= 0, got {noise_norm!r}")
    above = keep & (sig > 2.0 * noise)
    v["noise_norm"], v["noise_floor"], v["k_kept"] = noise, 2.0 * noise, int(above.sum())
    fit = _fit_log_log(sig[above], hh[above], sign=1.0, what="alpha above the noise floor",
                       bootstrap=0, seed=0)
    v["alpha_above_floor"] = fit.exponent
    if not fit.ok:
        ex.nan(["alpha_above_floor"],
               f"only {v['k_kept']} singular values above the noise floor {2 * noise:.3g}; "
               + "; ".join(fit.warnings))
    if v["k_kept"] < int(keep.sum()):
        ex.warn(f"noise floor 2*||(G1-G2)/2|| = {2 * noise:.3g} keeps {v['k_kept']} of "
                f"{int(keep.sum())} singular values; the rest are within batch noise")


def _curvature_noise(v: dict, ex: _Explain, halves: tuple[Tensor, Tensor] | None,
                     keep: Tensor, name: str) -> None:
    """``curvature_noise``: median over the fit window of ``|h1_k - h2_k| / |h1_k + h2_k|``,
    ``h1``, ``h2`` measured on two disjoint halves of the samples."""
    if halves is None:
        ex.nan(["curvature_noise"], "h_k measured on one batch, no two halves to compare (pass "
               "the fixed data as several batches)", quiet=True)
        return
    h1, h2 = (_vector(h, "h_halves", name) for h in halves)
    if h1.numel() != keep.numel() or h2.numel() != keep.numel():
        raise ValueError(f"layer {name!r}: h_halves need {keep.numel()} values each, got "
                         f"{h1.numel()} and {h2.numel()}")
    diff, both = (h1 - h2)[keep].abs(), (h1 + h2)[keep].abs()
    if not diff.numel():
        ex.nan(["curvature_noise"], "empty fit window")
        return
    ratio = diff / both.clamp_min(torch.finfo(torch.float64).tiny)
    v["curvature_noise"] = float(ratio.quantile(0.5).clamp_max(1e300))


def _rank_models(v: dict, ex: _Explain, sk: Tensor) -> None:
    cmp = compare_rank_models(sk)
    v["bic"], v["aic"], v["bic_best"] = cmp.bic, cmp.aic, cmp.best
    reasons = [w for w in cmp.warnings if "non-positive" not in w]
    for w in reasons:
        ex.warn(w)
    if any(math.isnan(x) for x in cmp.bic.values()):
        ex.nan(["bic", "aic"], "; ".join(reasons) or "rank models could not be scored")


def _alignment(v: dict, ex: _Explain, sig: Tensor, hh: Tensor, keep: Tensor, C_A: Any,
               C_delta: Any, U: Any, V: Any) -> None:
    fields = ["b_chi", "b_rho_delta", "b_rho_A", "b_lambda_delta", "b_lambda_A", "beta", "phi"]
    given = {"C_A": C_A, "C_delta": C_delta, "U": U, "V": V}
    missing = [k for k, x in given.items() if x is None]
    if missing:
        ex.nan(fields, f"alignment budget needs the Kronecker factors and singular vectors; "
                       f"missing {missing}")
        return
    try:
        budget = alignment_budget(sig, hh, C_A=C_A, C_delta=C_delta, U=U, V=V, window=keep)
    except ValueError as err:
        raise ValueError(f"layer {v['name']!r}: {err}") from None
    v["h_kron"] = budget.h_kron.tolist()
    for key in ("chi", "rho_delta", "rho_A", "lambda_delta", "lambda_A"):
        v[key] = getattr(budget, key).tolist()
    for key in fields:
        v[key] = getattr(budget, key)
    for w in budget.warnings:
        ex.warn(w)
    reason = "; ".join(budget.warnings) or "alignment budget undefined"
    ex.nan([k for k in fields if math.isnan(v[k])], reason)


def _zero_gradient(v: dict, ex: _Explain) -> None:
    reason = ("zero gradient: the layer's gradient on the fixed batch is exactly zero (a dead "
              "layer, or a batch that does not reach it); nothing can be fitted")
    ex.warn(reason)
    ex.nan([f.name for f in dataclasses.fields(LayerReport)
            if f.type == "float" or f.name.endswith("_ci")], reason)


def _finish(v: dict, ex: _Explain) -> LayerReport:
    rep = LayerReport(**v)
    undefined = {n.split("[")[0] for n, x in rep.scalar_fields().items() if math.isnan(x)}
    ex.reasons = {k: r for k, r in ex.reasons.items() if k in undefined}
    rep.nan_reasons = dict(ex.reasons)
    rep.warnings = ex.warnings()
    return rep


def _two_s(v: dict, ex: _Explain, h_sorted: Tensor, fit: dict) -> None:
    """Both ``s`` over the same ranks ``1..W`` (W: positive ``h_k`` and Lanczos eigenvalues)."""
    fields = ["s_rayleigh_common", "s_lanczos_common", "s_gap"]
    lam = torch.tensor(v.get("lambda_top", []), dtype=torch.float64)
    lam = lam[lam > 0]
    W = min(int(h_sorted.numel()), int(lam.numel()))
    v["s_window"] = W
    if W < 3:
        ex.nan(fields, f"the common rank window of sorted h_k > 0 and Lanczos eigenvalues > 0 "
                       f"has {W} < 3 points (run Lanczos with lanczos_k >= 3)")
        return
    ranks = torch.arange(1, W + 1, dtype=torch.float64)
    opts = {**fit, "bootstrap": 0}
    r = _fit_log_log(ranks, h_sorted[:W], sign=-1.0, what="s_rayleigh on the common window",
                     **opts)
    lz = _fit_log_log(ranks, lam[:W], sign=-1.0, what="s_lanczos on the common window", **opts)
    v["s_rayleigh_common"], v["s_lanczos_common"] = r.exponent, lz.exponent
    v["s_gap"] = r.exponent - lz.exponent


def _alignment_score(v: dict, ex: _Explain, U: Any, V: Any, ritz: Any) -> None:
    fields = ["alignment_score", "alignment_chance"]
    if ritz is None or U is None or V is None:
        ex.nan(fields, "needs the Lanczos eigenvectors (ritz_vectors) and the gradient's "
                       "singular vectors U, V")
        return
    m, n = int(U.shape[0]), int(V.shape[0])
    K = min(int(U.shape[1]), v["rank"] or int(U.shape[1]))
    try:
        v["alignment_score"] = alignment_score(U[:, :K], V[:, :K], ritz)
    except ValueError as err:
        raise ValueError(f"layer {v['name']!r}: {err}") from None
    v["alignment_chance"] = min(1.0, K / (m * n))


def _trust(v: dict, ex: _Explain, policy: TrustPolicy, window: int, n_samples: int | None
           ) -> None:
    """Trust flags per exponent and the samples the floor would need."""
    floor = v.get("noise_floor", _NAN)
    measured = "noise_floor" in v and math.isfinite(floor)
    fits = {name: (v.get(name, _NAN), v.get(f"{name}_r2", _NAN),
                   v.get("alpha_n", 0) if name == "alpha" else _n_points(v, name, window))
            for name in EXPONENTS}
    v["trust_flags"] = trust_flags(fits, window=window,
                                   k_above_floor=v.get("k_kept") if measured else None,
                                   policy=policy, curvature_noise=v.get("curvature_noise"))
    bad = {k: f for k, f in v["trust_flags"].items() if f}
    if bad:
        ex.warn("untrusted: " + "; ".join(f"{k} ({f})" for k, f in bad.items()))
    if not measured:
        ex.warn("no noise floor measured: the trust flags cannot check it")
    v["n_samples"] = int(n_samples or 0)
    if not measured or not n_samples:
        ex.nan(["samples_needed"], "needs the noise floor and the number of samples")
        return
    v["samples_needed"] = samples_needed(torch.tensor(v["sigma"]), floor, int(n_samples),
                                         window)
    if math.isnan(v["samples_needed"]):
        ex.nan(["samples_needed"], f"sigma_{window} is zero")


def _n_points(v: dict, name: str, window: int) -> int:
    if name == "gamma":
        return window
    if name == "s_rayleigh":
        return len([x for x in v["h"][:window] if x > 0])
    return len([x for x in v.get("lambda_top", []) if x > 0])


def _weight_tail(v: dict, ex: _Explain, weight: Tensor | None, name: str) -> None:
    """``weight_alpha``: CSN tail exponent of the weight's ESD (see ``spectra.weight_tails``)."""
    if weight is None:
        ex.nan(["weight_alpha"], "no weight passed to analyze_layer")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # recorded as the NaN reason instead
        stats = weight_tail_stats(weight.detach(), name=name or "weight")
    v["weight_alpha"] = stats.alpha
    if math.isnan(stats.alpha):
        ex.nan(["weight_alpha"], "; ".join(stats.warnings) or "weight ESD too short to fit")


def _weight_corollary(v: dict, ex: _Explain) -> None:
    """The main paper's corollary: the weight-tail exponent stays below s."""
    a, s = v.get("weight_alpha", _NAN), v.get("s_rayleigh", _NAN)
    if math.isfinite(a) and math.isfinite(s) and not a < s:
        ex.warn(f"weight_alpha = {a:.3g} >= s = {s:.3g}: the paper's corollary "
                "weight_alpha < s does not hold for this layer")
