"""One weight matrix's measurement in :func:`curvlens.measure.analyze_model`.

:class:`MatrixRun` measures ``h_k`` along the gradient's top singular directions, the top
eigenvalues of the matrix's Hessian block (Lanczos) and hands them with the gradient spectrum,
the Kronecker factors and the noise norm to :func:`curvlens.analysis.analyze_layer`; a failure
becomes NaN fields with the reason, never a lost report.

The curvatures run on the curvature data: all of the fixed data, or its first batches (the
``curvature_batches`` option of :func:`~curvlens.measure.analyze_model`). When the gradient
graphs of those batches fit the memory budget, :func:`shared_graphs` builds, per batch, the graph
of the loss gradient with respect to every measured weight once, and every matrix's second-order
products run on them (one more backward pass each): no forward and backward pass per matrix and
product, and ``h_k = <D_k, H D_k>`` from the same exact double-backward products that Lanczos
uses. On the CPU the products go one direction at a time (batching directions through
``is_grads_batched`` made convolutions 1.2 to 2.5 times slower per direction on one thread).
Otherwise (graphs too large) each matrix builds its own graphs, and ``h_k`` comes from
forward-over-forward differentiation where that is exact.

``h_k`` is kept per batch, so the first and the second half of the curvature batches give two
independent estimates of it for free; :func:`curvlens.analysis.analyze_layer` turns them into the
relative curvature noise.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvlens._batches import FixedData
from curvlens._budget import direction_chunk, resolve_budget
from curvlens._dist import batch_mean
from curvlens._gauss_newton import GaussNewtonBlock
from curvlens._grad_graph import GradGraph, hvp_curvature
from curvlens._progress import progress_bar
from curvlens.analysis import analyze_layer
from curvlens.hessian import directional_curvature
from curvlens.hessian_spectrum import _DataGraph, _matvec, block_eigenvalues, lanczos_max_basis
from curvlens.kronecker import KroneckerFactors
from curvlens.layers import LayerInfo
from curvlens.linalg.lanczos import lanczos
from curvlens.linalg.svd import gradient_svd
from curvlens.results import LayerReport

__all__ = ["MatrixRun", "explain", "shared_graphs"]

_BUDGET = ("b_chi", "b_rho_delta", "b_rho_A", "b_lambda_delta", "b_lambda_A", "beta", "phi")
# analyze's Lanczos tolerance on float32 weights: the estimated relative eigenvalue error. On
# ResNet-18's 21 blocks every top-10 value came within 9.0e-4 of its converged value; at 3e-3
# and above the 10th value of two blocks was a not yet resolved neighbour's (1.5e-2 off).
LANCZOS_TOL_FLOAT32 = 1e-3
_LANCZOS = ("s_lanczos", "s_lanczos_r2", "s_lanczos_ci", "transfer_error_lanczos",
            "pr_lambda", "zeta_bound_lanczos")


def shared_graphs(model: nn.Module, loss_fn: Callable, data: FixedData, count: int,
                  found: dict[str, LayerInfo], budget: int, activations: int
                  ) -> list[tuple[float, int, GradGraph]] | None:
    """Per batch of ``data`` (``count`` batches), the gradient graph over every measured weight
    with the batch's weight in the mean and its size; ``None`` when they would not fit in
    ``budget`` (each batch's saved tensors and first-order gradient graph are taken as three
    times the first batch's ``activations``, plus twice the weights)."""
    weights = list({id(i.weight): i.weight for i in found.values()}.values())
    need = 3 * activations * count + 2 * sum(w.numel() * w.element_size() for w in weights)
    if need > budget:
        return None
    where = f"model {type(model).__name__}"
    graphs = [(int(args[0].shape[0]), GradGraph(model, loss_fn, args, targets, weights, where))
              for args, targets in data]
    total = sum(b for b, _ in graphs)
    return [(b / total, b, g) for b, g in graphs]


def _graph_top(run: MatrixRun, k: int, tol: float | None, vectors: bool
               ) -> Tensor | tuple[Tensor, Tensor]:
    """Top-``k`` eigenvalues of ``run.info``'s Hessian block by Lanczos on ``run.graphs``."""
    info, budget, seed = run.info, run.budget, run.seed
    w = info.weight
    m, n = info.matrix_shape
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    where = f"layer {info.name!r}"
    blocks = [(share, g.restricted(w, where)) for share, _, g in run.graphs]
    data = _DataGraph(run.model, run.loss_fn, run.data, [w], where, blocks, info)
    gen = torch.Generator(w.device).manual_seed(seed)
    max_basis = lanczos_max_basis(m * n, k, "largest", dtype, budget, info.name)
    out = lanczos(_matvec(data), m * n, k, tol=tol, generator=gen, dtype=dtype, device=w.device,
                  return_vectors=vectors, max_basis=max_basis, progress=True)
    if not vectors:
        return out
    values, vecs = out
    return values, vecs.mT.reshape(-1, m, n)


def _halves(parts: list[tuple[int, Tensor]]) -> tuple[Tensor, Tensor] | None:
    """The sample-weighted means of the first and of the last ``len(parts) // 2`` per-batch
    values (the middle batch of an odd count in neither), ``None`` for one batch."""
    half = len(parts) // 2
    if half == 0:
        return None

    def mean(sub: list[tuple[int, Tensor]]) -> Tensor:
        total = sum(b for b, _ in sub)
        return sum(b / total * p for b, p in sub)

    return mean(parts[:half]), mean(parts[len(parts) - half:])


@dataclasses.dataclass
class MatrixRun:
    """One matrix's measurement, failures turned into explained NaN fields.

    ``data``/``source`` are the curvature data (``h_k``, Lanczos); ``n_samples`` counts the
    samples of the gradient (all of the fixed data)."""

    model: nn.Module
    loss_fn: Callable
    data: FixedData
    source: tuple
    info: LayerInfo
    top_k: int
    lanczos_k: int
    seed: int
    fit: dict
    notes: list[str]
    budget: int
    activations: int
    graphs: list[tuple[float, int, GradGraph]] | None = None
    lanczos_tol: float | None = None
    n_samples: int = 0
    gauss_newton: GaussNewtonBlock | None = None
    route: str | None = None

    def __call__(self, G: Tensor | str, noise: float | None, f: KroneckerFactors | None,
                 no_factors: str | None) -> LayerReport:
        info, name = self.info, self.info.name
        m, n = info.matrix_shape
        k = min(self.top_k, m, n)
        notes = self.notes + ([] if k == self.top_k
                              else [f"top_k={self.top_k} clipped to min(m, n) = {k}"])
        notes += [self.route] if self.route else []
        base = dict(name=name, shape=(m, n), kind=info.kind.value, notes=notes)
        if isinstance(G, str):
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base), G)
        if not bool(G.any()):
            warnings.warn(f"layer {name!r}: the gradient on the fixed batch is exactly zero; "
                          "its report is NaN", stacklevel=3)
            rep = analyze_layer(torch.zeros(k), torch.zeros(k), **base)
            rep.aliases = list(info.aliases)
            return rep
        try:
            U, S, V = gradient_svd(G, k)
            parts = self._curvatures(U, V, k)
            total = sum(b for b, _ in parts)
            h = sum(b / total * p for b, p in parts)
        except Exception as err:  # noqa: BLE001 - one matrix must not lose the report
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base),
                           f"layer {name!r}: measuring h_k failed ({type(err).__name__}: {err})")
        lam, ritz, lam_error = None, None, ""
        if self.lanczos_k:
            tol = self.lanczos_tol
            if tol is None:
                tol = None if G.dtype == torch.float64 else LANCZOS_TOL_FLOAT32
            try:
                lam, ritz = self._block_top(min(self.lanczos_k, m * n), tol)
            except Exception as err:  # noqa: BLE001
                lam_error = (f"layer {name!r}: Lanczos on the Hessian block failed "
                             f"({type(err).__name__}: {err})")
        try:
            rep = analyze_layer(
                S, h, C_A=None if f is None else f.C_A, C_delta=None if f is None else f.C_delta,
                U=U, V=V, lambda_top=lam, noise_norm=noise, weight=info.matrix(), **base,
                n_samples=self.n_samples, ritz_vectors=ritz, h_halves=_halves(parts),
                **self.fit)
        except Exception as err:  # noqa: BLE001
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base),
                           f"layer {name!r}: analysis failed ({type(err).__name__}: {err})")
        rep.aliases = list(info.aliases)
        if lam_error:
            explain(rep, _LANCZOS, lam_error)
        if no_factors and f is None:
            explain(rep, _BUDGET, f"no Kronecker factors: {no_factors}")
        return rep

    def _curvatures(self, U: Tensor, V: Tensor, k: int) -> list[tuple[int, Tensor]]:
        """Each curvature batch's size and ``h_k`` on it (averaged over processes)."""
        info = self.info
        if self.gauss_newton is not None:
            return self.gauss_newton.curvature_parts(U, V)
        chunk = direction_chunk(3 * self.activations + 3 * info.weight.nbytes, self.budget, k)
        if self.graphs is None:
            return [(len(a[0]), batch_mean(directional_curvature(
                self.model, self.loss_fn, a, t, info, U, V, max_batch=chunk), len(a[0])))
                for a, t in self.data]
        where = f"layer {info.name!r}"
        with progress_bar(total=U.shape[1] * len(self.graphs), desc=f"h_k {info.name}",
                          unit="hvp", leave=False) as bar:
            # on CPU one direction per product: batched ones were 1.2-2.5x slower per direction
            chunk = 1 if U.device.type == "cpu" else chunk
            return [(b, batch_mean(hvp_curvature(g.restricted(info.weight, where), info, U, V,
                                                 chunk, bar.update), b))
                    for _, b, g in self.graphs]

    def _block_top(self, k: int, tol: float | None) -> tuple[Tensor, Tensor | None]:
        """Top-``k`` block eigenvalues and, when ``k`` of them fit in the memory budget, their
        vectors for the alignment score."""
        info = self.info
        m, n = info.matrix_shape
        w = info.weight
        vectors = k * m * n * w.element_size() <= resolve_budget(self.budget, w.device)
        if self.gauss_newton is not None:
            gen = torch.Generator("cpu").manual_seed(self.seed)
            return self.gauss_newton.top(k, vectors, self.budget, gen, tol)
        if self.graphs is not None:
            out = _graph_top(self, k, tol, vectors)
        else:
            gen = torch.Generator(w.device).manual_seed(self.seed)
            out = block_eigenvalues(self.model, self.loss_fn, *self.source, info, k,
                                    generator=gen, tol=tol, memory_budget=self.budget,
                                    return_vectors=vectors, progress=True)
        return out if vectors else (out, None)


def explain(rep: LayerReport, fields: Sequence[str], reason: str) -> None:
    """Give ``fields`` (those NaN) ``reason`` and add it to the warnings once."""
    scalars = rep.scalar_fields()
    hit = [f for f in fields if any(math.isnan(v) for k, v in scalars.items()
                                    if k.split("[")[0] == f)]
    if not hit:
        return
    old = {rep.nan_reasons.get(f) for f in hit} - {None}
    for f in hit:
        rep.nan_reasons[f] = reason
    rep.warnings = [w for w in rep.warnings if not any(w.endswith(f"NaN, {o}") for o in old)]
    rep.warnings.append(f"{', '.join(hit)}: NaN, {reason}")


def _failed(rep: LayerReport, reason: str) -> LayerReport:
    """``rep`` with every number NaN and ``reason`` as the explanation."""
    warnings.warn(reason, stacklevel=4)
    rep.nan_reasons = {k.split("[")[0]: reason for k in rep.scalar_fields()}
    rep.warnings = [reason]
    return rep
