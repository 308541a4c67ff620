r"""Kronecker factors of a layer's curvature: ``C_A = E[a a^T]`` and ``C_delta = E[delta delta^T]``.

Definitions (K-FAC of Martens & Grosse 2015, KFC of Grosse & Martens 2016):
for a batch of ``B`` samples and a loss ``L = (1/B) sum_i l_i``,

* ``a`` are the layer's input-side rows: inputs of a Linear layer, unfolded patches of a conv
  (one per output location ``t`` and group), one-hot indices of an Embedding; never a bias column;
* ``delta_{i,t} = dl_i / dy_{i,t}``: per-sample output gradients (the ``1/B`` of the mean loss
  undone), one row per location.

Scaling convention (the one place conventions differ between libraries)::

    C_A     = (1/N_a) sum_{i,t} a_{i,t} a_{i,t}^T      N_a = number of input-side rows (B*T*groups)
    C_delta = (1/B)   sum_{i,t} delta_{i,t} delta_{i,t}^T    (the sum over the T locations stays)

so ``C_delta`` carries the factor ``T``. For a grouped convolution (``groups = g``) the matrix
view is ``[out, in/g * prod(kernel)]`` and each group's patches are extra input-side rows, so
``C_A`` averages the per-group patch covariances (the block Hessian of a grouped conv is not one
Kronecker product; ``h_kron`` is then a model, and ``chi`` measures its error).
For a Linear layer on ``[B, in]`` inputs (T = 1) this is
the usual K-FAC pair, and for a model that is one Linear layer under the ``"ggn"`` mode the block
Hessian is exactly ``H_WW = kron(C_delta, C_A)`` (row-major ``vec(W)``). Exponent fits (slopes in
log-log) do not depend on the convention; the level of
``h_kron`` and hence ``chi = h / h_kron`` does. For Embedding layers the input side spans the rows
of ``W`` (``[num, dim]``), so ``C_delta`` is the one-hot frequency matrix ``[num, num]`` and ``C_A``
the output-gradient covariance ``[dim, dim]``: ``h_kron_k = (u_k^T C_delta u_k)(v_k^T C_A v_k)``
keeps one form for every layer.

Modes:

* ``"empirical"``: gradients of the loss at the true targets.
* ``"fisher"``: targets sampled from the model's predictive distribution (cross-entropy: a
  categorical draw from the softmax; MSE: Gaussian noise whose Fisher equals the loss Hessian).
  Matches ``"ggn"`` in expectation, and BackPACK's ``KFAC`` (its Monte-Carlo estimate).
* ``"ggn"``: exact, from a square root of each sample's loss Hessian w.r.t. the model output
  (one backward per output dimension). Equals BackPACK's ``KFLR``.

Backends: ``"hooks"`` (any model built of supported layers, curvlens's own capture) and
``"backpack"`` (``backpack.extensions.KFAC`` / ``KFLR`` on a deep copy of a model that BackPACK can
``extend``). BackPACK's conv output factor is the bias GGN (locations summed *before* the outer
product), which differs from the hooks backend's per-location sum unless ``T = 1``; its conv
input factor is rescaled by ``1/T`` to the convention above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

import torch
from torch import Tensor, nn

from curvlens._arrays import all_finite
from curvlens._batches import fixed_data
from curvlens._context import measuring, unwrap_compiled
from curvlens._factor_forms import DiagonalFactor, SketchedFactor, factor_quad
from curvlens._factor_store import FactorAccumulator, KroneckerFactors
from curvlens._functional_model import check_loss
from curvlens._losses import (
    Likelihood,
    LossReduction,
    OutputSelector,
    batch_scale,
    likelihood_of,
    loss_hessian_sqrt,
    loss_reduction,
    sample_targets,
    select_output,
)
from curvlens._modes import BatchNormPolicy
from curvlens._options import parse_option
from curvlens.hooks import Capture
from curvlens.layers import LayerInfo, find_layers

__all__ = [
    "KroneckerFactors",
    "FactorMode",
    "FactorBackend",
    "FactorAccumulator",
    "DiagonalFactor",
    "SketchedFactor",
    "kronecker_factors",
    "kronecker_curvature",
    "batch_scale",
]


class FactorMode(str, Enum):
    EMPIRICAL = "empirical"
    FISHER = "fisher"
    GGN = "ggn"


class FactorBackend(str, Enum):
    HOOKS = "hooks"
    BACKPACK = "backpack"


def kronecker_curvature(factors: KroneckerFactors, U: Tensor, V: Tensor) -> Tensor:
    """``h_kron_k = (u_k^T C_delta u_k)(v_k^T C_A v_k)`` for every k.

    Args:
        factors: the layer's factors.
        U: [m, k] left directions.
        V: [n, k] right directions.

    Returns:
        [k] Kronecker-model curvatures along ``u_k v_k^T``.
    """
    return factor_quad(factors.C_delta, U) * factor_quad(factors.C_A, V)




def _as_tuple(inputs: Tensor | tuple) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _check_batch(inputs: tuple) -> int:
    first = inputs[0]
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError("inputs must be a tensor (or tuple of tensors) with a batch dimension")
    if first.shape[0] == 0:
        raise ValueError("empty batch: inputs have batch size 0; pass at least one sample")
    return int(first.shape[0])


def kronecker_factors(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor | tuple,
    targets: Tensor,
    *,
    mode: FactorMode | str = FactorMode.EMPIRICAL,
    backend: FactorBackend | str = FactorBackend.HOOKS,
    layers: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    mc_samples: int = 1,
    distributed: bool = True,
    memory_budget: int | float | str | None = None,
    skip_empty: bool = False,
    reduction: LossReduction | str | None = None,
    output: OutputSelector = None,
    likelihood: Likelihood | str | None = None,
    batch_norm: BatchNormPolicy | str | None = None,
) -> dict[str, KroneckerFactors]:
    """Kronecker factors of every chosen layer on one batch.

    Measured inside :func:`curvlens.hessian.measurement_mode` (autocast off, dropout off,
    batch-norm per ``batch_norm``); parameter ``.grad`` fields are not touched.

    Args:
        model: the network; called as ``model(*inputs)``.
        loss_fn: ``loss_fn(output, targets)``, a mean (or sum) over the batch.
        inputs: a tensor ``[B, ...]`` or a tuple of tensors; or a re-iterable of
            ``(inputs, targets)`` batches with ``targets=None`` (hooks backend): the statistics
            of all their samples, summed before they are averaged.
        targets: targets ``[B, ...]``.
        mode: ``"empirical"``, ``"fisher"`` or ``"ggn"`` (module docstring).
        backend: ``"hooks"`` or ``"backpack"``.
        layers: qualified names to measure (default: every supported layer).
        generator: random source of the ``"fisher"`` targets.
        mc_samples: Monte-Carlo draws for ``"fisher"`` (averaged).
        distributed: under an initialized ``torch.distributed`` process group, sum the factors'
            statistics over all processes (hooks backend), so each process gets the factors of
            the union of the batches. Every process must then call this function.
        memory_budget: bytes one dense factor side may take (see :mod:`curvlens._budget`);
            larger sides (and sides above 8192) are kept as sketches, diagonal sides (an
            Embedding's one-hot side) as vectors.
        skip_empty: leave out matrices the forward pass never reached instead of raising.
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` combines the batch (default: read
            off a torch loss module, else a mean).
        output: for ``"fisher"``/``"ggn"`` with a dict, tuple or ``ModelOutput`` model output:
            the key, attribute, index or callable that picks the tensor the loss is a function
            of (e.g. ``"logits"``).
        likelihood: ``"categorical"`` or ``"gaussian"``, the predictive distribution the
            ``"fisher"`` targets are drawn from (default: detected from the loss).
        batch_norm: ``"eval"`` (running statistics) or ``"batch"`` (the batch's statistics,
            running statistics untouched); ``None``: an enclosing measurement's, else ``"eval"``.

    Returns:
        ``{layer_name: KroneckerFactors}`` with ``C_A [n, n]`` and ``C_delta [m, m]``, for the
        matrices with a capture adapter (see :mod:`curvlens.adapters`); others are left out.

    Raises:
        ValueError: bad mode/backend, empty batch, a loss the mode cannot handle, a model BackPACK
            cannot extend, or a layer the forward pass never used.
        RuntimeError: NaN/Inf in the loss or in a layer's output gradient (names the layer).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> f = kronecker_factors(net, nn.MSELoss(), torch.randn(8, 3), torch.randn(8, 2))
        >>> tuple(f["0"].C_A.shape), tuple(f["0"].C_delta.shape), f["0"].num_samples
        ((3, 3), (4, 4), 8)
    """
    mode = parse_option(FactorMode, mode, "mode")
    backend = parse_option(FactorBackend, backend, "backend")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples!r}")
    data = fixed_data(inputs, targets)
    if not data.single and backend is FactorBackend.BACKPACK:
        raise ValueError("backend='backpack' measures one batch; over an iterable of batches use "
                         "backend='hooks' (or pass one batch)")
    model = unwrap_compiled(model)
    chosen = {name: info for name, info in find_layers(model, layers, on_unsupported="skip").items()
              if info.spec is not None}
    reduction = loss_reduction(loss_fn, reduction)
    lik = likelihood_of(loss_fn, likelihood) if mode is FactorMode.FISHER else None
    acc = FactorAccumulator(chosen, memory_budget=memory_budget)
    for args, batch_targets in data:  # statistics summed over the batches, averaged once
        args = _as_tuple(args)
        B = _check_batch(args)
        with measuring(model, args, batch_targets, where="kronecker_factors",
                       batch_norm=batch_norm) as ms:
            if backend is FactorBackend.BACKPACK:
                from curvlens._backpack import backpack_factors

                return backpack_factors(model, loss_fn, ms.inputs, ms.targets, chosen, mode,
                                        mc_samples)
            _hook_factors(model, loss_fn, ms.inputs, ms.targets, chosen, mode, generator,
                          mc_samples, B, reduction, output, lik, acc)
    if distributed:
        acc.all_reduce()
    return acc.factors(skip_empty=skip_empty)


def _hook_factors(
    model: nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: Tensor,
    chosen: dict[str, LayerInfo],
    mode: FactorMode,
    generator: torch.Generator | None,
    mc_samples: int,
    B: int,
    reduction: LossReduction,
    selector: OutputSelector,
    likelihood: Likelihood | None,
    acc: FactorAccumulator,
) -> FactorAccumulator:
    weights = list({id(info.weight): info.weight for info in chosen.values()}.values())
    scale = batch_scale(loss_fn, B, reduction)
    with Capture(model, chosen) as cap:
        output = model(*inputs)
        if mode is FactorMode.EMPIRICAL:
            loss = loss_fn(output, targets)
            check_loss(loss, "kronecker factors")
            torch.autograd.grad(loss, weights, allow_unused=True)
            passes = 1
        elif mode is FactorMode.FISHER:
            for draw in range(mc_samples):
                drawn = sample_targets(likelihood, select_output(output, selector), generator)
                loss = loss_fn(output, drawn)
                check_loss(loss, "kronecker factors (fisher)")
                torch.autograd.grad(loss, weights, retain_graph=draw < mc_samples - 1,
                                    allow_unused=True)
            passes = mc_samples
        else:
            S = loss_hessian_sqrt(loss_fn, output, selector, targets)  # [B, D, D]
            logits = select_output(output, selector)
            D = S.shape[-1]
            for c in range(D):
                grad_out = (S[:, :, c] / scale).reshape(logits.shape)
                torch.autograd.grad(logits, weights, grad_out, retain_graph=c < D - 1,
                                    allow_unused=True)
            passes = D
        bad = [n for n, r in cap.records.items()
               if not all(all_finite(g) for g in r.output_grads)]
        if bad:
            raise RuntimeError(
                f"NaN or Inf in the output gradients of layers {bad} (the one nearest the loss "
                f"is {bad[-1]!r}); check the loss and the inputs before measuring curvature"
            )
        for name, record in cap.records.items():
            for x in record.inputs:
                acc.add_inputs(name, x)
            for j, (call, g) in enumerate(zip(record.calls, record.output_grads)):
                # samples as the adapter reads them (seq-first attention: dim 1), except in
                # "ggn" mode, whose output-gradient passes are scaled per model sample above
                b = B if mode is FactorMode.GGN else record.samples[call]
                counts = b if (mode is not FactorMode.GGN or j % passes == 0) else 0
                acc.add_grads(name, g, scale=batch_scale(loss_fn, b, reduction), samples=counts,
                              check_finite=False)  # checked above
    return acc

