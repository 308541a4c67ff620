"""What curvlens reports: :class:`LayerReport` per layer and :class:`Report` per model.

Plain dataclasses (numbers, lists of floats, small dicts) so that tables, JSON/CSV and plots
(:mod:`curvlens.report`) can be built on them; ``to_dict`` / ``from_dict`` round-trip losslessly
through JSON (NaN included). The quantities are those of "Spectral Asymptotics of Neural Network
Loss Landscapes: An Exact Decomposition of the Curvature Exponent" (Calvo, 2026,
arXiv:2606.02596), defined in the documentation's method page; :mod:`curvlens.analysis`
computes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvlens._csv import write_csv
from curvlens._io import atomic_write_text, read_json
from curvlens._plots import write_plots
from curvlens._schema import field_types, from_json_value
from curvlens._table import table as _table

__all__ = ["LayerReport", "Report"]

_NAN = float("nan")
_FORMAT = "curvlens.report"
_VERSION = 1
#: A run file: the reports of several epochs (``save_reports`` / ``read_reports``).
RUN_FORMAT = "curvlens.run"
RUN_VERSION = 1


def check_format(data: Any, fmt: str, version: int, what: str) -> None:
    """Check the ``"format"`` and ``"version"`` keys of a file's top-level object.

    Raises:
        ValueError: not a dict, another format, or a version that is not an int in
            ``1..version``.
    """
    if not isinstance(data, Mapping) or data.get("format") != fmt:
        got = (f"keys {sorted(map(str, data))[:8]}" if isinstance(data, Mapping)
               else type(data).__name__)
        raise ValueError(f"not a {what} (expected format {fmt!r}); got {got}")
    got = data.get("version")
    if isinstance(got, bool) or not isinstance(got, int) or got < 1:
        raise ValueError(f"{what}: field 'version' must be an int >= 1, got {got!r}")
    if got > version:
        raise ValueError(f"{what} format version {got} is newer than this curvlens reads "
                         f"({version}); upgrade curvlens to read it")


def _nan_pair() -> tuple[float, float]:
    return (_NAN, _NAN)


@dataclass
class LayerReport:
    """Everything curvlens measured on one layer.

    Plain data: numbers, lists of floats, small dicts. NaN marks an undefined quantity and
    ``nan_reasons[field]`` says why. Per-direction lists are indexed by ``k - 1`` over the
    top-``K`` window.

    Attributes:
        name, shape, kind: the matrix's report name, ``(m, n)`` matrix shape, ``"conv"``,
            ``"linear"``, ``"embedding"``, ``"head"``, ``"attention"``, ``"recurrent"`` or
            ``"matrix"``.
        aliases: every qualified parameter name of the measured tensor (several for a tied
            weight, which is measured and reported once).
        top_k: window size ``K``; rank: numerical rank of the gradient within the window.
        sigma: [K] gradient singular values; h: [K] directional curvatures (``h_k <= 0`` kept);
            h_kron: [K] Kronecker-model curvatures; lambda_top: top Hessian-block eigenvalues.
        alpha, alpha_r2, alpha_ci, alpha_theil_sen, alpha_n: curvature exponent fit (``n``
            points); alpha_k2: over ``k >= 2``. Every ``*_ci`` is a confidence interval at the
            level in ``Report.meta["ci_level"]`` (method in ``meta["interval"]``, see
            :mod:`curvlens.fit`).
        gamma, gamma_r2, gamma_ci, gamma_theil_sen: gradient rank-decay exponent.
        s_rayleigh, s_rayleigh_r2, s_rayleigh_ci: decay exponent of sorted ``h`` (curvature
            along the gradient's own directions; close to ``alpha * gamma`` almost by
            construction); s_lanczos, s_lanczos_r2, s_lanczos_ci: of the top eigenvalues of the
            Hessian block (its own spectrum, an independent measurement).
        s_window, s_rayleigh_common, s_lanczos_common, s_gap: both ``s`` refitted over the same
            ranks ``1..s_window`` and their difference (Rayleigh minus Lanczos); a large gap
            means the block's top eigenvectors are not the gradient's directions.
        alignment_score: share of the top Lanczos eigenspace captured by the directions
            ``u_k v_k^T`` (1: fully; see :func:`curvlens.trust.alignment_score`);
            alignment_chance: the score of random directions, ``K / (m n)``.
        predicted_s: ``alpha * gamma``; transfer_error_rayleigh / _lanczos: ``|s - alpha gamma|/s``.
        psi_slope: ``b(h / sigma^2)``, equal to ``alpha - 2``.
        b_chi, b_rho_delta, b_rho_A, b_lambda_delta, b_lambda_A: the alpha budget (sums to alpha);
            beta: ``b(Lambda)``; phi: ``b(Phi)``; chi, rho_delta, rho_A, lambda_delta, lambda_A:
            their [K] per-direction values.
        pr_h, pr_lambda: participation ratios of positive ``h`` / Lanczos eigenvalues;
            zeta_bound, zeta_bound_lanczos: ``zeta(s)^2 / zeta(2s)`` for each ``s``.
        bic_best: rank-profile model of ``sigma`` with the lowest BIC; bic, aic: all three scores.
        noise_norm: ``||(G1 - G2) / 2||_2`` of two half-batch gradients; noise_floor: twice it;
            k_kept: number of ``sigma_k`` above the floor; alpha_above_floor: alpha over those.
        n_samples: samples of the gradient; samples_needed: samples for all ``K`` singular
            values to clear the floor (it falls as ``1/sqrt(N)``; a lower bound).
        curvature_noise: median over the window of ``|h1_k - h2_k| / |h1_k + h2_k|``, ``h_k``
            on two halves of the curvature samples (about 0.67 times its relative error).
        trust_flags: ``{exponent: codes}`` for alpha, gamma, s_rayleigh, s_lanczos; ``""`` when
            the fit can be trusted, else comma-separated ``undefined``, ``noise_floor``,
            ``few_points``, ``poor_fit`` (:mod:`curvlens.trust`).
        n_negative_h: number of ``h_k <= 0``; n_negative_lambda: of Lanczos eigenvalues ``<= 0``.
        weight_alpha: heavy-tail exponent of the weight spectrum (filled by ``curvlens.spectra``).
        notes: how it was measured; nan_reasons: ``{field: why it is NaN}``; warnings: every
            caveat and every NaN explanation, human readable.
    """

    name: str = ""
    aliases: list[str] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)
    kind: str = ""
    top_k: int = 0
    rank: int = 0
    sigma: list[float] = field(default_factory=list)
    h: list[float] = field(default_factory=list)
    h_kron: list[float] = field(default_factory=list)
    lambda_top: list[float] = field(default_factory=list)
    alpha: float = _NAN
    alpha_r2: float = _NAN
    alpha_ci: tuple[float, float] = field(default_factory=_nan_pair)
    alpha_theil_sen: float = _NAN
    alpha_n: int = 0
    alpha_k2: float = _NAN
    gamma: float = _NAN
    gamma_r2: float = _NAN
    gamma_ci: tuple[float, float] = field(default_factory=_nan_pair)
    gamma_theil_sen: float = _NAN
    s_rayleigh: float = _NAN
    s_rayleigh_r2: float = _NAN
    s_rayleigh_ci: tuple[float, float] = field(default_factory=_nan_pair)
    s_lanczos: float = _NAN
    s_lanczos_r2: float = _NAN
    s_lanczos_ci: tuple[float, float] = field(default_factory=_nan_pair)
    predicted_s: float = _NAN
    transfer_error_rayleigh: float = _NAN
    transfer_error_lanczos: float = _NAN
    psi_slope: float = _NAN
    b_chi: float = _NAN
    b_rho_delta: float = _NAN
    b_rho_A: float = _NAN
    b_lambda_delta: float = _NAN
    b_lambda_A: float = _NAN
    beta: float = _NAN
    phi: float = _NAN
    chi: list[float] = field(default_factory=list)
    rho_delta: list[float] = field(default_factory=list)
    rho_A: list[float] = field(default_factory=list)
    lambda_delta: list[float] = field(default_factory=list)
    lambda_A: list[float] = field(default_factory=list)
    pr_h: float = _NAN
    pr_lambda: float = _NAN
    zeta_bound: float = _NAN
    zeta_bound_lanczos: float = _NAN
    bic_best: str = ""
    bic: dict[str, float] = field(default_factory=dict)
    aic: dict[str, float] = field(default_factory=dict)
    noise_norm: float = _NAN
    noise_floor: float = _NAN
    k_kept: int = 0
    alpha_above_floor: float = _NAN
    n_samples: int = 0
    samples_needed: float = _NAN
    curvature_noise: float = _NAN
    s_window: int = 0
    s_rayleigh_common: float = _NAN
    s_lanczos_common: float = _NAN
    s_gap: float = _NAN
    alignment_score: float = _NAN
    alignment_chance: float = _NAN
    trust_flags: dict[str, str] = field(default_factory=dict)
    n_negative_h: int = 0
    n_negative_lambda: int = 0
    weight_alpha: float = _NAN
    notes: list[str] = field(default_factory=list)
    nan_reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def trusted(self, exponent: str) -> bool:
        """Whether ``exponent`` (alpha, gamma, s_rayleigh, s_lanczos) is defined and unflagged.

        Reports without flags (older files) count a finite value as trusted.
        """
        if exponent not in self.trust_flags:
            return math.isfinite(getattr(self, exponent))
        return self.trust_flags[exponent] == ""

    @property
    def chi_slope(self) -> float:
        """``b(chi)``, the slope of the Kronecker-model error (alias of ``b_chi``)."""
        return self.b_chi

    @property
    def alpha_budget(self) -> float:
        """``b(chi) + b(rho_delta) + b(rho_A) + b(lambda_delta) + b(lambda_A)`` (= ``alpha``)."""
        return (self.b_chi + self.b_rho_delta + self.b_rho_A + self.b_lambda_delta
                + self.b_lambda_A)

    def scalar_fields(self) -> dict[str, float]:
        """``{name: value}`` of every float field, CI end (``alpha_ci[0]``) and score
        (``bic[power_law]``): the numbers a NaN can hide in."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                out[f.name] = value
            elif f.name.endswith("_ci"):
                out[f"{f.name}[0]"], out[f"{f.name}[1]"] = value
            elif f.type == "dict[str, float]":
                out.update({f"{f.name}[{key}]": float(x) for key, x in value.items()})
        return out

    def unexplained_nans(self) -> list[str]:
        """Fields that are NaN without a reason in ``nan_reasons`` (empty for a correct report)."""
        return [
            name for name, value in self.scalar_fields().items()
            if isinstance(value, float) and math.isnan(value)
            and name.split("[")[0] not in self.nan_reasons
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (lists for tuples; NaN stays a float)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, (list, dict)):
                value = value.copy()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, layer: str | None = None) -> LayerReport:
        """Inverse of :meth:`to_dict`, with every field checked.

        Missing fields take their defaults; ``None`` reads as NaN. Every field is checked
        against its type (ints are ints, floats finite or NaN, lists of the right length),
        the per-direction lists against ``top_k`` and ``kind`` against the known layer kinds.

        Args:
            data: the dict.
            layer: the layer's name in its report (for error messages; default ``data["name"]``).

        Raises:
            ValueError: a field does not fit; the message names the layer and the field.
        """
        label = layer if layer is not None else (
            data.get("name") if isinstance(data, Mapping) else None)
        if not isinstance(data, Mapping):
            raise ValueError(f"report layer {label!r} must be an object (a dict), got "
                             f"{type(data).__name__}")
        types = field_types(cls)
        unknown = sorted(set(data) - set(types))
        if unknown:
            warnings.warn(f"LayerReport.from_dict ignores unknown fields {unknown} of layer "
                          f"{label!r}", stacklevel=2)
        kwargs = {name: from_json_value(data[name], tp, f"report layer {label!r}: field {name!r}")
                  for name, tp in types.items() if name in data}
        rep = cls(**kwargs)
        _check_consistency(rep, label)
        return rep


# Per-direction lists: one entry per k = 1..top_k, or empty when not measured.
_PER_DIRECTION = ("sigma", "h", "h_kron", "chi", "rho_delta", "rho_A", "lambda_delta",
                  "lambda_A")
_AT_MOST_K = ("rank", "k_kept", "alpha_n", "n_negative_h")


def _check_consistency(rep: LayerReport, label: str | None) -> None:
    """Relations between fields that their types alone do not express."""
    from curvlens.layers import LayerKind  # lazily: plain data here, layer machinery there

    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"report layer {label!r}: field {name!r} {why}")

    for f in dataclasses.fields(rep):
        value = getattr(rep, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise bad(f.name, f"must be >= 0, got {value}")
    if any(d < 0 for d in rep.shape):
        raise bad("shape", f"must hold sizes >= 0, got {list(rep.shape)}")
    kinds = {k.value for k in LayerKind} | {""}
    if rep.kind not in kinds:
        raise bad("kind", f"must be one of {sorted(kinds)}, got {rep.kind!r}")
    K = rep.top_k
    if rep.sigma and len(rep.sigma) != K:
        raise bad("sigma", f"has {len(rep.sigma)} entries but top_k is {K}")
    for name in _PER_DIRECTION:
        n = len(getattr(rep, name))
        if n not in (0, K):
            raise bad(name, f"has {n} entries; expected top_k = {K} (or none)")
    for name in _AT_MOST_K:
        if getattr(rep, name) > K:
            raise bad(name, f"is {getattr(rep, name)}, more than top_k = {K}")
    if rep.bic and rep.bic_best not in rep.bic and rep.bic_best != "":
        raise bad("bic_best", f"must be one of {sorted(rep.bic)}, got {rep.bic_best!r}")


@dataclass
class Report:
    """One analysis of a model: a :class:`LayerReport` per layer.

    Attributes:
        layers: ``{layer name: LayerReport}`` in module order.
        epoch, step: when it was measured (``None`` if not given).
        meta: free-form JSON-compatible settings (top_k, modes, batch size, ...).
    """

    layers: dict[str, LayerReport] = field(default_factory=dict)
    epoch: int | None = None
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict: ``json.dumps`` works on it (NaN is written as ``NaN``)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "meta": dict(self.meta),
            "layers": {name: rep.to_dict() for name, rep in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`, with the format, the version and every field checked.

        Raises:
            ValueError: not a curvlens report, a version this curvlens cannot read, or a
                damaged field (the message names the layer and the field).
        """
        check_format(data, _FORMAT, _VERSION, "curvlens report")
        where = "report: field {!r}"
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise ValueError(f"{where.format('layers')} must be an object (a dict), got "
                             f"{type(layers).__name__}")
        return cls(
            layers={str(n): LayerReport.from_dict(d, layer=str(n)) for n, d in layers.items()},
            epoch=from_json_value(data.get("epoch"), int | None, where.format("epoch")),
            step=from_json_value(data.get("step"), int | None, where.format("step")),
            meta=from_json_value(data.get("meta", {}), dict[str, Any], where.format("meta")),
        )

    # The contract's short forms (``report.table()``, ``report.to_json(path)``, ...). Files and
    # figures (and the table) are written by modules that read reports without importing this
    # one, so data flows one way.

    def table(self, *, width: int = 80, summary: bool = True) -> str:
        """The per-layer table (see :func:`curvlens.report.table`)."""
        return _table(self, width=width, summary=summary)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically (see :func:`curvlens.report.to_json`)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Report:
        """Read a report written by :meth:`to_json` (or the last report of a run file).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON, not a curvlens report, or an empty run.
        """
        reports = read_reports(path)
        if not reports:
            raise ValueError(f"{str(path)!r} is a curvlens run without reports")
        return reports[-1]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one CSV row per layer, atomically (see :func:`curvlens.report.to_csv`)."""
        return write_csv([self], path)

    def plot(self, directory: str | os.PathLike, history: list[Report] | None = None) -> list[Path]:
        """Write the PNG figures into ``directory`` (see :func:`curvlens.report.plot`)."""
        return write_plots(self, Path(directory), list(history or []))


def read_reports(path: str | os.PathLike) -> list[Report]:
    """The reports in a report file (one) or a run file (oldest first).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, not JSON, or not a valid curvlens report or run (the message
            names the file, the field and the layer).
    """
    data = read_json(path, "report file")
    try:
        if isinstance(data, dict) and data.get("format") == RUN_FORMAT:
            check_format(data, RUN_FORMAT, RUN_VERSION, "curvlens run")
            reports = data.get("reports", [])
            if not isinstance(reports, list):
                raise ValueError(f"run: field 'reports' must be a list, got "
                                 f"{type(reports).__name__}")
            return [_run_entry(d, i) for i, d in enumerate(reports)]
        return [Report.from_dict(data)]
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from None


def _run_entry(data: Any, index: int) -> Report:
    try:
        return Report.from_dict(data)
    except ValueError as err:
        raise ValueError(f"run: reports[{index}]: {err}") from None
