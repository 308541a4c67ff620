r"""End to end: measure every weight matrix of a model on a fixed batch and analyze it.

For each trainable weight matrix (:func:`curvlens.layers.find_layers`), on one fixed batch: the
gradient of the loss in the matrix view, its top-``K`` SVD, the exact directional curvatures
``h_k`` along the gradient's singular directions, the top eigenvalues of the matrix's Hessian
block (Lanczos), the Kronecker factors where a capture adapter exists, and the half-batch noise
norm; then :func:`curvlens.analysis.analyze_layer` turns them into the exponents of "Spectral
Asymptotics of Neural Network Loss Landscapes: An Exact Decomposition of the Curvature Exponent"
(Calvo, 2026, arXiv:2606.02596).

One matrix never loses the report: a matrix whose measurement fails gets NaN fields with the
error (op and matrix named) in ``nan_reasons`` and ``warnings``; the others are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from curvlens._batches import FixedData, fixed_data
from curvlens._budget import activation_bytes, resolve_budget
from curvlens._context import measuring
from curvlens._fixed_gradients import (
    gradients_and_halves,
    half_batch_noise,
    mean_gradients,
    noise_norms,
)
from curvlens._gauss_newton import gauss_newton_blocks
from curvlens._intervals import Interval, check_interval_options
from curvlens._losses import LossReduction, OutputSelector
from curvlens._losses import loss_reduction as resolve_reduction
from curvlens._matrix_run import MatrixRun, shared_graphs
from curvlens._modes import BatchNormPolicy
from curvlens._progress import progress_bar
from curvlens.kronecker import KroneckerFactors, kronecker_factors
from curvlens.layers import LayerInfo, find_layers
from curvlens.results import LayerReport, Report
from curvlens.trust import TrustPolicy

__all__ = ["analyze_model"]



def analyze_model(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor | Sequence[Tensor],
    targets: Any,
    *,
    layers: Iterable[str] | None = None,
    top_k: int = 20,
    kronecker_mode: str = "empirical",
    kronecker_backend: str | None = "hooks",
    lanczos_k: int | None = None,
    lanczos_tol: float | None = None,
    noise_floor: bool = True,
    paper_compatible: bool = False,
    bootstrap: int = 2000,
    seed: int = 0,
    interval: Interval | str = Interval.STUDENTIZED,
    level: float = 0.95,
    trust: TrustPolicy | None = None,
    epoch: int | None = None,
    step: int | None = None,
    meta: dict[str, Any] | None = None,
    loss_reduction: LossReduction | str | None = None,
    output: OutputSelector = None,
    likelihood: str | None = None,
    memory_budget: int | float | str | None = None,
    batch_norm: BatchNormPolicy | str = BatchNormPolicy.EVAL,
    curvature_batches: int | None = None,
    gauss_newton: bool = True,
) -> Report:
    """Measure every trainable weight matrix of ``model`` on one fixed batch and analyze it.

    Per matrix: the gradient ``G`` of the mean loss (``torch.autograd.grad``, matrix view), its
    top-``K`` SVD (:func:`curvlens.linalg.svd.gradient_svd`), the exact ``h_k``
    (:func:`curvlens.hessian.directional_curvature`), the Kronecker factors
    (:func:`curvlens.kronecker.kronecker_factors`, for matrices with a capture adapter), the
    top Hessian-block eigenvalues by Lanczos, and the half-batch noise ``||(G1 - G2)/2||_2``;
    then :func:`curvlens.analysis.analyze_layer`. Everything runs inside
    :func:`curvlens.hessian.measurement_mode` whatever the caller's context (autocast,
    ``no_grad``, ``inference_mode``); a ``torch.compile`` wrapper is measured through its
    original module, a float16/bfloat16 model through a float32 copy (noted in the report).

    Under an initialized ``torch.distributed`` process group every process passes its own shard
    of the fixed batch and calls this function: gradients, ``h_k``, Lanczos products and
    Kronecker statistics are averaged over processes (weighted by shard size), so each process
    reports what one process would report on the union of the shards. Only the noise floor
    differs: its half-batches are the halves of each shard.

    Args:
        model: the network, called as ``model(*inputs)``.
        loss_fn: ``loss_fn(output, targets)``, a mean over the batch.
        inputs: the fixed batch ``[B, ...]`` (a tensor or a tuple of tensors).
        targets: its targets ``[B, ...]``.
        layers: report, module or parameter names (default: every trainable matrix).
        top_k: window ``K`` (clipped to ``min(m, n)`` per matrix, with a note in the report).
        kronecker_mode: ``"empirical"``, ``"fisher"`` or ``"ggn"``; kronecker_backend:
            ``"hooks"`` or ``"backpack"`` (see :mod:`curvlens.kronecker`), or ``None`` to skip
            the factors (no ``h_kron``, no alpha budget; the report says so).
        lanczos_k: number of top block eigenvalues (default ``top_k``; 0 skips Lanczos).
        lanczos_tol: Lanczos stops when every wanted eigenvalue's estimated relative error
            is at most this (:func:`~curvlens.linalg.lanczos.lanczos`; default ``1e-3`` for
            float32 weights, well below what the log-log fit of ``s_lanczos`` resolves;
            ``100 * eps`` for float64). Smaller values buy accuracy with more Hessian-vector
            products; above about ``3e-3`` the ``lanczos_k``-th value of a block whose
            eigenvalues cluster there can be a neighbour's (see the memory guide).
        noise_floor: compute the half-batch noise floor (needs ``B >= 2``).
        paper_compatible, bootstrap, seed, interval, level, trust: passed to
            :func:`analyze_layer` (the interval method and level of every ``*_ci``, the
            thresholds of the trust flags).
        epoch, step, meta: stored in the :class:`Report`.
        loss_reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` combines the batch (default:
            read off a torch loss module, else a mean). A sum is measured as the mean it is
            ``B`` times (each batch's own ``B`` in an iterable), so both give the same report.
        output, likelihood: for ``kronecker_mode="fisher"``/``"ggn"`` with dict or tuple model
            outputs: which tensor the loss is a function of, and the predictive distribution
            (see :func:`curvlens.kronecker.kronecker_factors`).
        memory_budget: bytes one large allocation may take (a dense factor side, a Lanczos
            basis, a chunk of ``h_k`` directions; see :class:`curvlens.CurvatureLens`). An
            allocation that cannot fit is refused by name and that matrix's fields are NaN
            with the reason. On one batch whose gradient graph fits (about three times the
            activations), one graph over all measured weights serves every matrix.
        batch_norm: ``"eval"`` (running statistics; outputs nearly the same for every sample
            add a warning naming the worst-fitting batch-norm layer) or ``"batch"`` (the batch's
            statistics, running statistics untouched); see :class:`curvlens.BatchNormPolicy`.
        curvature_batches: with an iterable of batches: measure the curvatures (``h_k``, the
            Lanczos products, the Kronecker factors) on its first ``curvature_batches``
            batches, while the gradient, its singular values and directions and the noise
            floor use every batch (default ``None``: all batches). At least 2: ``h_k`` of the
            first and of the second half of them give each layer's ``curvature_noise``. The
            report's meta records ``batch_size`` (gradient samples) and
            ``curvature_samples``; why this is sound: the measurement guide.
        gauss_newton: where a matrix's Hessian block equals its Gauss-Newton block (the
            network's output is linear in the matrix, as in ReLU networks with batch norm on
            running statistics: one exact product along a random direction is checked against
            it), measure ``h_k`` and the block eigenvalues exactly through the per-sample
            output Jacobian's Gram matrix (:mod:`curvlens._gauss_newton`; one forward and one
            backward pass per output dimension for all matrices, instead of about 40 products
            per matrix). Needs the gradient graphs and the rows in the memory budget, at most
            256 output dimensions per sample and 4096 samples x outputs, and a loss that sums
            per-sample terms.
            ``False``: products everywhere. Each matrix's notes say which route it took and why.

    Returns:
        A :class:`Report` with one :class:`LayerReport` per matrix (tied weights once, with
        every name in ``aliases``).

    Raises:
        ValueError: empty batch, bad option (``curvature_batches`` with one batch, below 2 or
            above the number of batches), unknown layer, no trainable matrix.
        RuntimeError: a NaN/Inf loss on the fixed batch.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        >>> x, y = torch.randn(32, 6), torch.randn(32, 5)
        >>> rep = analyze_model(net, nn.MSELoss(), x, y, top_k=4, bootstrap=0)
        >>> list(rep.layers), rep.layers["0"].shape
        (['0', '2'], (8, 6))
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    lanczos_k = top_k if lanczos_k is None else lanczos_k
    interval = check_interval_options(interval, level, trust)
    if not isinstance(lanczos_k, int) or lanczos_k < 0:
        raise ValueError(f"lanczos_k must be a non-negative int, got {lanczos_k!r}")
    if lanczos_tol is not None and not (isinstance(lanczos_tol, (int, float))
                                        and 0 < lanczos_tol < 1):
        raise ValueError(f"lanczos_tol must be None or a number in (0, 1), got {lanczos_tol!r}")
    data = fixed_data(inputs, targets)
    _check_curvature_batches(curvature_batches, data.single)
    args, targets = (_as_inputs(inputs), targets) if data.single else next(iter(data))
    batch = int(args[0].shape[0])
    reduction = resolve_reduction(loss_fn, loss_reduction)
    factor_options = dict(reduction=reduction, output=output, likelihood=likelihood,
                          memory_budget=memory_budget)
    raw_loss, loss_fn = loss_fn, _as_mean(loss_fn, reduction, batch)
    with measuring(model, args, targets, where="analyze_model", batch_norm=batch_norm,
                   upcast=True, diagnose=True) as ms:
        model, args, targets = ms.model, ms.inputs, ms.targets
        found = find_layers(model, layers, on_unsupported="skip")
        if not found:
            raise ValueError(f"{type(model).__name__} has no trainable weight matrix (a "
                             "parameter with >= 2 dimensions and requires_grad=True)")
        data = (fixed_data(args, targets) if data.single  # the prepared batch
                else FixedData(_Prepared(data, model, loss_fn), single=False))
        grads, halves = ((mean_gradients(model, loss_fn, data, found), None) if data.single
                         else gradients_and_halves(model, loss_fn, data, found))
        batch, count = data.total, len(data.sizes)
        if not noise_floor or (batch < 2 and halves is None):
            noise = {}
        elif halves is None:  # one batch: its two halves
            noise = half_batch_noise(model, _as_mean(raw_loss, reduction, batch // 2), args,
                                     targets, found)
        else:  # the first and the second half of the batches
            noise = noise_norms(*halves)
        del halves
        if curvature_batches is not None and curvature_batches > count:
            raise ValueError(f"curvature_batches={curvature_batches}, but the fixed data has "
                             f"only {count} batches; pass at most {count}")
        cdata, count = ((data, count) if curvature_batches is None
                        else (data.head(curvature_batches), curvature_batches))
        curvature_samples = sum(data.sizes[:count])
        source = ((args, targets) if data.single else (data.source, None)
                  if curvature_batches is None else (cdata.source, None))
        factors, missing = _factors(model, raw_loss, *source, found, kronecker_mode,
                                    kronecker_backend, factor_options)
        notes = _measurement_notes(kronecker_mode, kronecker_backend, batch) + ms.notes
        if not data.single:
            notes.append(f"fixed data: {len(data.sizes)} batches, measured as the mean over all "
                         f"{batch} samples" + ("; noise floor from the first and the second half "
                                               "of the batches" if noise else ""))
        if curvature_batches is not None:
            notes.append(f"curvatures (h_k, Lanczos, Kronecker factors) measured on the first "
                         f"{count} batches ({curvature_samples} samples, curvature_batches="
                         f"{count}); gradient, its SVD and the noise floor on all {batch}")
        if not noise:
            notes.append("no noise floor: " + ("disabled (noise_floor=False)" if not noise_floor
                                               else "needs a batch of at least 2 samples"))
        reports: dict[str, LayerReport] = {}
        budget = resolve_budget(memory_budget, args[0].device)
        act = activation_bytes(model, args)
        graphs = shared_graphs(model, loss_fn, cdata, count, found, budget, act)
        blocks, routes = (gauss_newton_blocks(model, raw_loss, output, cdata, found, graphs, budget,
                                              seed, lanczos_k) if gauss_newton else ({}, {}))
        fit = dict(paper_compatible=paper_compatible, bootstrap=bootstrap, seed=seed,
                   interval=interval, level=level, trust=trust)
        for name, info in progress_bar(found.items(), desc="analyze", unit="matrix",
                                       leave=False, total=len(found)):
            measure = MatrixRun(model, loss_fn, cdata, source, info, top_k, lanczos_k, seed, fit,
                                notes, budget, act, graphs, lanczos_tol, batch,
                                blocks.pop(name, None), routes.get(name))
            reports[name] = measure(grads[name], noise.get(name), factors.get(name),
                                    missing.get(name))
        del graphs, blocks
    ms.warn(reports.values())
    info = {"top_k": top_k, "lanczos_k": lanczos_k, "kronecker_mode": str(kronecker_mode),
            "loss_reduction": reduction.value,
            "kronecker_backend": str(kronecker_backend), "batch_size": batch,
            "curvature_samples": curvature_samples,
            "paper_compatible": paper_compatible, "bootstrap": bootstrap, "seed": seed,
            "interval": interval.value, "ci_level": level,
            "batch_norm": ms.policy.value, "gauss_newton": gauss_newton}
    return Report(layers=reports, epoch=epoch, step=step, meta={**info, **(meta or {})})


def _check_curvature_batches(value: int | None, single: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"curvature_batches must be None or an int >= 2 (the first and the "
                         f"second half of those batches give the curvature noise), got {value!r}")
    if single:
        raise ValueError("curvature_batches needs the fixed data as an iterable of (inputs, "
                         "targets) batches with targets=None; one batch was given: pass it as a "
                         "list of batches, or leave curvature_batches=None")


class _Prepared:
    """The batches of an iterable, each entered into the measurement context (inputs made
    ready for the measured model)."""

    def __init__(self, data: FixedData, model: nn.Module, loss_fn: Callable) -> None:
        self.data, self.model, self.loss_fn = data, model, loss_fn

    def __iter__(self) -> Iterator[tuple[tuple, Any]]:
        for args, targets in self.data:
            if isinstance(self.loss_fn, _MeanLoss):  # a summed loss: this batch's mean
                self.loss_fn.batch = int(args[0].shape[0])
            with measuring(self.model, args, targets, where="analyze_model", upcast=True) as ms:
                yield ms.inputs, ms.targets


class _MeanLoss:
    """A summed loss divided by its batch size: the mean every measurement assumes."""

    reduction = "mean"

    def __init__(self, loss_fn: Callable, batch: int) -> None:
        self.loss_fn, self.batch = loss_fn, batch

    def __call__(self, output: Any, targets: Any) -> Tensor:
        return self.loss_fn(output, targets) / self.batch


def _as_mean(loss_fn: Callable, reduction: LossReduction, batch: int) -> Callable:
    return _MeanLoss(loss_fn, batch) if reduction is LossReduction.SUM else loss_fn


def _as_inputs(inputs: Any) -> tuple[Any, ...]:
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
        raise ValueError("inputs must be a tensor [B, ...] or a tuple of tensors with a batch "
                         "dimension")
    if args[0].shape[0] == 0:
        raise ValueError("empty batch: inputs have batch size 0; pass at least one sample")
    return args


def _factors(model: nn.Module, loss_fn: Callable, args: tuple, targets: Any,
             found: dict[str, LayerInfo], mode: str, backend: str | None, options: dict
             ) -> tuple[dict[str, KroneckerFactors], dict[str, str]]:
    """The Kronecker factors of the adapted matrices, and why the others have none."""
    if backend is None:
        return {}, {}
    missing = {name: info.reason for name, info in found.items() if info.spec is None}
    adapted = [name for name in found if name not in missing]
    if not adapted:
        return {}, missing
    try:
        factors = kronecker_factors(model, loss_fn, args, targets, mode=mode, backend=backend,
                                    layers=adapted, skip_empty=True, **options)
    except Exception as err:  # noqa: BLE001 - the exponents do not need the factors
        return {}, {**missing, **{n: f"{type(err).__name__}: {err}" for n in adapted}}
    for name in adapted:
        if name not in factors:
            missing[name] = ("the capture saw no samples (the forward pass does not reach the "
                             "matrix through its module)")
    return factors, missing


def _measurement_notes(mode: str, backend: str, batch: int) -> list[str]:
    notes = [f"fixed batch of {batch} samples"]
    if backend is None:
        notes.append("Kronecker factors not measured (kronecker_backend=None)")
    else:
        notes.append(f"Kronecker factors: mode={getattr(mode, 'value', mode)}, backend="
                     f"{getattr(backend, 'value', backend)} (conv: C_delta carries the T output "
                     "locations; chi's level depends on this convention, slopes do not)")
    return notes
