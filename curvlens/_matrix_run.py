"""One weight matrix's measurement in :func:`curvlens.measure.analyze_model`.

:class:`MatrixRun` measures ``h_k`` along the gradient's top singular directions, the top
eigenvalues of the matrix's Hessian block (Lanczos) and hands them with the gradient spectrum,
the Kronecker factors and the noise norm to :func:`curvlens.analysis.analyze_layer`; a failure
becomes NaN fields with the reason, never a lost report.

On one fixed batch whose gradient graph fits the memory budget, :func:`shared_graph` builds the
graph of the loss gradient with respect to every measured weight once, and every matrix's
second-order products run on it (one more backward pass each): no forward and backward pass per
matrix, and ``h_k = <D_k, H D_k>`` from the same exact double-backward products that Lanczos
uses. On the CPU the products go one direction at a time (batching directions through
``is_grads_batched`` made convolutions 1.2 to 2.5 times slower per direction on one thread).
Otherwise (an iterable of batches, or a graph too large) each matrix builds its own graphs, and
``h_k`` comes from forward-over-forward differentiation where that is exact.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._batches import FixedData
from curvlens._budget import direction_chunk, resolve_budget
from curvlens._dist import batch_mean
from curvlens._fixed_gradients import mean_over
from curvlens._progress import progress_bar
from curvlens.analysis import analyze_layer
from curvlens.hessian import GradGraph, directional_curvature, layer_hvp
from curvlens.hessian_spectrum import _DataGraph, _matvec, block_eigenvalues, lanczos_max_basis
from curvlens.kronecker import KroneckerFactors
from curvlens.layers import LayerInfo
from curvlens.linalg.lanczos import lanczos
from curvlens.linalg.svd import gradient_svd
from curvlens.results import LayerReport

__all__ = ["MatrixRun", "explain", "shared_graph"]

_BUDGET = ("b_chi", "b_rho_delta", "b_rho_A", "b_lambda_delta", "b_lambda_A", "beta", "phi")
_LANCZOS = ("s_lanczos", "s_lanczos_r2", "s_lanczos_ci", "transfer_error_lanczos",
            "pr_lambda", "zeta_bound_lanczos")


class _Block(GradGraph):
    """The part of a shared :class:`GradGraph` that one weight's Hessian block needs: the
    gradient of that weight (with its graph) and the weight itself."""

    def __init__(self, graph: GradGraph, weight: Tensor, where: str) -> None:  # noqa: D107
        index = next(i for i, p in enumerate(graph.params) if p is weight)
        self.params, self.where, self.loss = [weight], where, graph.loss
        self.grads = [graph.grads[index]]
        self._live = [0] if self.grads[0].requires_grad else []


def shared_graph(model: nn.Module, loss_fn: Callable, args: tuple, targets: Any,
                 found: dict[str, LayerInfo], budget: int, activations: int
                 ) -> GradGraph | None:
    """The gradient graph over every measured weight on one batch, or ``None`` when it would
    not fit in ``budget`` (its saved tensors and first-order gradient graph are taken as three
    times the activations plus twice the weights)."""
    weights = list({id(i.weight): i.weight for i in found.values()}.values())
    need = 3 * activations + 2 * sum(w.numel() * w.element_size() for w in weights)
    if need > budget:
        return None
    return GradGraph(model, loss_fn, args, targets, weights, f"model {type(model).__name__}")


def _hvp_curvature(graph: GradGraph, info: LayerInfo, U: Tensor, V: Tensor, chunk: int
                   ) -> Tensor:
    """``h_k = <D_k, H_WW D_k>`` for ``D_k = u_k v_k^T`` by exact products on ``graph``, the
    directions built a chunk at a time (ten of a 38.6M-entry block would take 1.5 GB)."""
    chunk = 1 if U.device.type == "cpu" else chunk
    out = []
    bar = progress_bar(total=U.shape[1], desc=f"h_k {info.name}", unit="hvp", leave=False)
    for start in range(0, U.shape[1], chunk):
        D = torch.einsum("mk,nk->kmn", U[:, start:start + chunk], V[:, start:start + chunk])
        out.append((D * layer_hvp(graph, info, D)).sum((1, 2)))
        bar.update(D.shape[0])
    bar.close()
    return torch.cat(out)


def _graph_top(graph: GradGraph, run: MatrixRun, k: int, tol: float | None, vectors: bool
               ) -> Tensor | tuple[Tensor, Tensor]:
    """Top-``k`` eigenvalues of ``run.info``'s Hessian block by Lanczos on ``graph``."""
    info, budget, seed = run.info, run.budget, run.seed
    w = info.weight
    m, n = info.matrix_shape
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    data = _DataGraph(run.model, run.loss_fn, run.data, [w], graph.where, graph, info)
    gen = torch.Generator(w.device).manual_seed(seed)
    max_basis = lanczos_max_basis(m * n, k, "largest", dtype, budget, info.name)
    out = lanczos(_matvec(data), m * n, k, tol=tol, generator=gen, dtype=dtype, device=w.device,
                  return_vectors=vectors, max_basis=max_basis, progress=True)
    if not vectors:
        return out
    values, vecs = out
    return values, vecs.mT.reshape(-1, m, n)


@dataclasses.dataclass
class MatrixRun:
    """One matrix's measurement, failures turned into explained NaN fields."""

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
    graph: GradGraph | None = None
    lanczos_tol: float | None = None

    def __call__(self, G: Tensor | str, noise: float | None, f: KroneckerFactors | None,
                 no_factors: str | None) -> LayerReport:
        info, name = self.info, self.info.name
        m, n = info.matrix_shape
        k = min(self.top_k, m, n)
        notes = self.notes + ([] if k == self.top_k
                              else [f"top_k={self.top_k} clipped to min(m, n) = {k}"])
        base = dict(name=name, shape=(m, n), kind=info.kind.value, notes=notes)
        if isinstance(G, str):
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base), G)
        if not bool(G.any()):
            warnings.warn(f"layer {name!r}: the gradient on the fixed batch is exactly zero; "
                          "its report is NaN", stacklevel=3)
            rep = analyze_layer(torch.zeros(k), torch.zeros(k), **base)
            rep.aliases = list(info.aliases)
            return rep
        block = None if self.graph is None else _Block(self.graph, info.weight, f"layer {name!r}")
        try:
            U, S, V = gradient_svd(G, k)
            chunk = direction_chunk(3 * self.activations + 3 * info.weight.nbytes, self.budget, k)
            if block is not None:
                h = batch_mean(_hvp_curvature(block, info, U, V, chunk), self.data.total)
            else:
                h = mean_over(self.data, lambda a, t: batch_mean(directional_curvature(
                    self.model, self.loss_fn, a, t, info, U, V, max_batch=chunk), len(a[0])))
        except Exception as err:  # noqa: BLE001 - one matrix must not lose the report
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base),
                           f"layer {name!r}: measuring h_k failed ({type(err).__name__}: {err})")
        lam, ritz, lam_error = None, None, ""
        if self.lanczos_k:
            tol = self.lanczos_tol
            if tol is None:
                tol = None if G.dtype == torch.float64 else 1e-2
            try:
                lam, ritz = self._block_top(block, min(self.lanczos_k, m * n), tol)
            except Exception as err:  # noqa: BLE001
                lam_error = (f"layer {name!r}: Lanczos on the Hessian block failed "
                             f"({type(err).__name__}: {err})")
        try:
            rep = analyze_layer(
                S, h, C_A=None if f is None else f.C_A, C_delta=None if f is None else f.C_delta,
                U=U, V=V, lambda_top=lam, noise_norm=noise, weight=info.matrix(), **base,
                n_samples=self.data.total, ritz_vectors=ritz, **self.fit)
        except Exception as err:  # noqa: BLE001
            return _failed(LayerReport(top_k=k, aliases=list(info.aliases), **base),
                           f"layer {name!r}: analysis failed ({type(err).__name__}: {err})")
        rep.aliases = list(info.aliases)
        if lam_error:
            explain(rep, _LANCZOS, lam_error)
        if no_factors and f is None:
            explain(rep, _BUDGET, f"no Kronecker factors: {no_factors}")
        return rep

    def _block_top(self, block: GradGraph | None, k: int, tol: float | None
                   ) -> tuple[Tensor, Tensor | None]:
        """Top-``k`` block eigenvalues and, when ``k`` of them fit in the memory budget, their
        vectors for the alignment score."""
        info = self.info
        m, n = info.matrix_shape
        w = info.weight
        vectors = k * m * n * w.element_size() <= resolve_budget(self.budget, w.device)
        if block is not None:
            out = _graph_top(block, self, k, tol, vectors)
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
