r"""Eigenvalues, trace and spectral density of a layer's Hessian block or the whole Hessian.

The operators of :mod:`curvlens.hessian` (exact double-backward HVPs on a gradient graph built
once) fed to the model-agnostic kernels of :mod:`curvlens.linalg`: Lanczos with full
reorthogonalization for the top eigenvalues (``s_lanczos``, the decay exponent of the top-K
eigenvalues of ``H_WW``, the independent check on the Rayleigh-quotient exponent of "Spectral
Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of the Curvature
Exponent", Calvo, 2026, arXiv:2606.02596), Hutchinson's trace estimator and stochastic Lanczos
quadrature. The dense Hessian is never formed, and the Lanczos basis stays within the memory
budget (thick restart).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._batches import FixedData, fixed_data
from curvlens._budget import check_fits, count_that_fits, resolve_budget
from curvlens._context import measuring, unwrap_compiled
from curvlens._dist import batch_mean, is_distributed
from curvlens._functional_model import Inputs, as_tuple, check_batch, trainable_parameters
from curvlens._modes import BatchNormPolicy
from curvlens.hessian import GradGraph, LossFn, _layer, flat_hvp, layer_hvp
from curvlens.layers import LayerInfo, resolve_layer
from curvlens.linalg.lanczos import Which, lanczos, parse_which
from curvlens.linalg.slq import SpectralDensity, spectral_density
from curvlens.linalg.trace import Probe, TraceEstimate, hutchinson_trace

__all__ = ["block_eigenvalues", "hessian_density", "hessian_trace", "model_eigenvalues"]

Layer = str | nn.Module | LayerInfo


class _DataGraph:
    """Gradient graphs over the fixed data: kept for a single batch (or given, one per batch
    with its weight), else rebuilt for every product over an iterable of batches (one batch's
    activations in memory at a time).

    Attributes:
        params: the parameters of the Hessian block.
        layer: the matrix's :class:`LayerInfo` (``None`` for all trainable parameters).
        batch_size: samples on this process (known after the first pass).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: FixedData,
                 params: list[Tensor], where: str,
                 single: GradGraph | list[tuple[float, GradGraph]] | None,
                 layer: LayerInfo | None) -> None:
        self.model, self.loss_fn, self.data, self.params, self.where = (
            model, loss_fn, data, params, where)
        self._single, self.layer = single, layer
        self.batch_size = int(data.source[0][0].shape[0]) if data.single else data.total

    def mean(self, product: Callable[[GradGraph], Tensor]) -> Tensor:
        """``sum_i w_i product(graph_i)``: the product for the mean loss over all samples."""
        if isinstance(self._single, list):  # kept graphs of the batches, with their weights
            return sum(w * product(g) for w, g in self._single)
        if self._single is not None:
            return product(self._single)
        parts = []
        for args, targets in self.data:
            check_batch(args, self.where)
            with measuring(self.model, args, targets, where=self.where) as ms:
                graph = GradGraph(ms.model, self.loss_fn, ms.inputs, ms.targets, self.params,
                                  self.where)
                parts.append(product(graph))
                del graph
        self.batch_size = self.data.total
        return sum(w * p for w, p in zip(self.data.weights(False), parts))


@contextmanager
def _graph(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Any, layer: Layer | None,
    batch_norm: BatchNormPolicy | str | None,
) -> Iterator[tuple[_DataGraph, tuple[int, ...]]]:
    """Inside the measurement context: the gradient graph(s) of a layer's weight (or of all
    trainable parameters) over the fixed data (one batch or an iterable of batches) and the
    shape that Ritz vectors take (``(m, n)`` or ``(P,)``)."""
    model = unwrap_compiled(model)
    if layer is None:
        params = list(trainable_parameters(model).values())
        where = f"model {type(model).__name__}"
        if not params:
            raise ValueError(f"{where}: no trainable parameters (all have requires_grad=False)")
        shape: tuple[int, ...] = (sum(p.numel() for p in params),)
        info = None
    else:
        info, where = _layer(model, layer)
        params, shape = [info.weight], info.matrix_shape
    data = fixed_data(inputs, targets)
    if data.single:
        args = as_tuple(inputs)
        check_batch(args, where)
    else:
        args, targets = next(iter(data))  # the context's policy; each product re-enters it
    with measuring(model, args, targets, where=where, batch_norm=batch_norm) as ms:
        single = (GradGraph(model, loss_fn, ms.inputs, ms.targets, params, where)
                  if data.single else None)
        yield _DataGraph(model, loss_fn, data, params, where, single, info), shape


def _shared(generator: torch.Generator | None) -> torch.Generator | None:
    """Under torch.distributed every process must draw the same random vectors."""
    if generator is None and is_distributed():
        return torch.Generator().manual_seed(0)
    return generator


def _work_dtype(graph: _DataGraph, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if any(p.dtype == torch.float64 for p in graph.params) else torch.float32


def _matvec(graph: _DataGraph) -> Callable[[Tensor], Tensor]:
    """Flat ``[dim] -> [dim]`` (and column-batched ``[dim, b] -> [dim, b]``) Hessian product."""

    info = graph.layer

    def hvp(g: GradGraph, rows: Tensor) -> Tensor:  # rows: [b, dim]
        m, n = info.matrix_shape
        D = rows.reshape(-1, m, n).to(info.weight.dtype)
        return layer_hvp(g, info, D).reshape(rows.shape).to(rows.dtype)

    def product(g: GradGraph, x: Tensor) -> Tensor:
        if info is None:
            return flat_hvp(g, x) if x.dim() == 1 else flat_hvp(g, x.mT).mT
        return hvp(g, x[None])[0] if x.dim() == 1 else hvp(g, x.mT).mT

    def matvec(x: Tensor) -> Tensor:
        out = graph.mean(lambda g: product(g, x))
        # under torch.distributed: the union of the batches
        return batch_mean(out, graph.batch_size)

    return matvec


#: vectors of the block's dimension that Lanczos needs besides its basis (the new vector, the
#: Gram-Schmidt temporaries, the Hessian-vector product's output)
_LANCZOS_WORK_VECTORS = 4


def lanczos_max_basis(dim: int, k: int, which: Which | str, dtype: torch.dtype, budget: int,
                      layer: str) -> int | None:
    """The largest Lanczos basis (in vectors) that ``budget`` bytes hold, ``None`` when it need
    not be bounded (it holds every vector the iteration could want).

    Raises:
        MemoryBudgetError: not even the wanted Ritz vectors plus two fit (names ``layer``).
    """
    n_ends = 2 if parse_which(which) is Which.BOTH else 1
    per_vec = dim * torch.empty((), dtype=dtype).element_size()
    reserve = _LANCZOS_WORK_VECTORS * per_vec
    fits = count_that_fits(per_vec, budget, reserve=reserve)
    need = n_ends * k + 2
    check_fits(reserve + need * per_vec, budget, layer=layer,
               what=f"Lanczos for {k} eigenvalues (at least {need} basis vectors of dimension "
                    f"{dim}, {dtype})", hint="lower lanczos_k")
    return None if fits >= min(dim, max(30 * k, 100)) else fits


def _eigen(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Any, layer: Layer | None,
    k: int, which: Which | str, num_iter: int | None, tol: float | None,
    generator: torch.Generator | None, dtype: torch.dtype | None, return_vectors: bool,
    progress: bool, memory_budget: int | float | str | None,
    batch_norm: BatchNormPolicy | str | None,
) -> Tensor | tuple[Tensor, Tensor]:
    with _graph(model, loss_fn, inputs, targets, layer, batch_norm) as (graph, shape):
        dim = math.prod(shape)
        work = _work_dtype(graph, dtype)
        device = graph.params[0].device
        name = "model" if layer is None else resolve_layer(unwrap_compiled(model), layer).name
        max_basis = lanczos_max_basis(dim, k, which, work, resolve_budget(memory_budget, device),
                                      name)
        out = lanczos(
            _matvec(graph), dim, k, which=which, num_iter=num_iter, tol=tol,
            generator=_shared(generator), dtype=work, device=device,
            return_vectors=return_vectors, progress=progress, max_basis=max_basis,
        )
    if not return_vectors:
        return out
    values, vectors = out
    return values, vectors.mT.reshape(-1, *shape)


def block_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    layer: Layer,
    k: int,
    *,
    which: Which | str = Which.LARGEST,
    num_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    return_vectors: bool = False,
    progress: bool = False,
    memory_budget: int | float | str | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The top-``k`` eigenvalues of one layer's Hessian block ``H_WW``, descending.

    Args:
        model: the model; measured inside :func:`~curvlens.hessian.measurement_mode`
            (autocast off, dropout off, batch-norm per ``batch_norm``).
        loss_fn: ``(model(*inputs), targets) -> scalar`` mean loss.
        inputs: the batch, a tensor or a tuple of tensors; or a re-iterable of
            ``(inputs, targets)`` batches (a list, a ``DataLoader``) with ``targets=None``: the
            Hessian of the mean loss over all their samples (each product runs over every
            batch, one batch's activations in memory at a time).
        targets: passed to ``loss_fn``.
        layer: a supported layer (name, module or ``LayerInfo``).
        k: number of eigenvalues.
        which: ``"largest"`` (default), ``"smallest"`` or ``"both"`` (see
            :func:`~curvlens.linalg.lanczos.lanczos`).
        num_iter: maximum number of HVPs (Lanczos steps).
        tol: relative eigenvalue error, as estimated from the Ritz residuals and gaps (default
            ``100 * eps``; see :func:`~curvlens.linalg.lanczos.lanczos`).
        generator: seeds the start vector.
        dtype: Lanczos working precision (default: float64 for float64 weights, else float32).
        return_vectors: also return the eigenvectors in the matrix view.
        progress: tqdm bar over the HVPs.
        memory_budget: bytes the Lanczos basis may take (an int, a string such as ``"2GB"``,
            or ``None`` for the default of :mod:`curvlens._budget`); a basis that would pass
            it is thick-restarted instead of grown.
        batch_norm: ``"eval"`` (running statistics) or ``"batch"`` (the batch's statistics,
            running statistics untouched); ``None``: an enclosing measurement's, else ``"eval"``.

    Returns:
        ``eigenvalues [k]`` descending, and with ``return_vectors`` the unit eigenvectors
        ``[k, m, n]`` in the same order.

    Raises:
        MemoryBudgetError: not even ``k + 2`` vectors of the block fit the budget.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> block_eigenvalues(net, nn.MSELoss(), x, y, "0", 2).shape
        torch.Size([2])
    """
    return _eigen(model, loss_fn, inputs, targets, layer, k, which, num_iter, tol, generator,
                  dtype, return_vectors, progress, memory_budget, batch_norm)


def model_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    k: int,
    *,
    which: Which | str = Which.LARGEST,
    num_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    return_vectors: bool = False,
    progress: bool = False,
    memory_budget: int | float | str | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The top-``k`` eigenvalues of the Hessian over all trainable parameters, descending.

    Same arguments as :func:`block_eigenvalues` without ``layer``. Eigenvectors come back as rows
    ``[k, P]`` in the flat layout of :func:`~curvlens.hessian.model_hvp`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model_eigenvalues(net, nn.MSELoss(), x, y, 2).shape
        torch.Size([2])
    """
    return _eigen(model, loss_fn, inputs, targets, None, k, which, num_iter, tol, generator,
                  dtype, return_vectors, progress, memory_budget, batch_norm)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    layer: Layer | None = None,
    *,
    num_samples: int = 100,
    batch_size: int | None = None,
    distribution: Probe | str = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    batch_norm: BatchNormPolicy | str | None = None,
) -> TraceEstimate:
    r"""Hutchinson estimate of ``tr(H_WW)`` (``layer`` given) or ``tr(H)`` (``layer=None``).

    Args:
        model, loss_fn, inputs, targets: as in :func:`block_eigenvalues`.
        layer: a supported layer, or ``None`` for the whole model.
        num_samples: number of probes.
        batch_size: probes per batched backward pass (``None``: one at a time).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: seeds the probes.
        dtype: probe precision.
        progress: tqdm bar over the probes.
        batch_norm: as in :func:`block_eigenvalues`.

    Returns:
        :class:`~curvlens.linalg.trace.TraceEstimate` ``(estimate, std_error, samples)``.
    """
    with _graph(model, loss_fn, inputs, targets, layer, batch_norm) as (graph, shape):
        return hutchinson_trace(
            _matvec(graph), math.prod(shape), num_samples,
            batch_size=batch_size, distribution=distribution, generator=_shared(generator),
            dtype=_work_dtype(graph, dtype), device=graph.params[0].device, progress=progress,
        )


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    layer: Layer | None = None,
    *,
    num_probes: int = 8,
    num_iter: int = 64,
    grid: Tensor | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    batch_norm: BatchNormPolicy | str | None = None,
) -> SpectralDensity:
    r"""SLQ spectral density of ``H_WW`` (``layer`` given) or of the whole Hessian.

    Arguments as in :func:`~curvlens.linalg.slq.spectral_density`; ``layer=None`` means all
    trainable parameters; ``batch_norm`` as in :func:`block_eigenvalues`.

    Returns:
        :class:`~curvlens.linalg.slq.SpectralDensity` (nodes, weights, grid, density, sigma).
    """
    with _graph(model, loss_fn, inputs, targets, layer, batch_norm) as (graph, shape):
        return spectral_density(
            _matvec(graph), math.prod(shape), num_probes=num_probes,
            num_iter=num_iter, grid=grid, num_points=num_points, sigma=sigma,
            generator=_shared(generator), dtype=_work_dtype(graph, dtype),
            device=graph.params[0].device, progress=progress,
        )
