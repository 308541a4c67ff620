r"""Kronecker factors of a layer's curvature: ``C_A = E[a a^T]`` and ``C_delta = E[delta delta^T]``.

Definitions (shared/SPEC.md 2.3; K-FAC of Martens & Grosse 2015, KFC of Grosse & Martens 2016):
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

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlens._dist import all_reduce_sum, is_distributed, sum_count
from curvlens._options import parse_option
from curvlens.hooks import Capture, LayerRecord
from curvlens.layers import LayerInfo, find_layers

__all__ = [
    "KroneckerFactors",
    "FactorMode",
    "FactorBackend",
    "FactorAccumulator",
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


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer's Kronecker factors (see the module docstring for the scaling).

    Attributes:
        C_A: [n, n] column-side factor (inputs / patches; Embedding: output gradients).
        C_delta: [m, m] row-side factor (output gradients; Embedding: one-hot frequencies).
        num_samples: number of samples ``B`` (times the Monte-Carlo draws in ``"fisher"``).
    """

    C_A: Tensor
    C_delta: Tensor
    num_samples: int


def kronecker_curvature(factors: KroneckerFactors, U: Tensor, V: Tensor) -> Tensor:
    """``h_kron_k = (u_k^T C_delta u_k)(v_k^T C_A v_k)`` for every k.

    Args:
        factors: the layer's factors.
        U: [m, k] left directions.
        V: [n, k] right directions.

    Returns:
        [k] Kronecker-model curvatures along ``u_k v_k^T``.
    """
    left = torch.einsum("mk,ml,lk->k", U, factors.C_delta.to(U.dtype), U)
    right = torch.einsum("nk,nl,lk->k", V, factors.C_A.to(V.dtype), V)
    return left * right


def batch_scale(loss_fn: Callable, batch_size: int) -> float:
    """Factor that turns gradients of the batch loss into per-sample gradients.

    ``B`` for a loss that averages over the batch (the default assumption, and
    ``reduction="mean"``), ``1`` for ``reduction="sum"``.
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(
            f"loss reduction {reduction!r} is not supported; curvlens needs a scalar loss that is "
            "a mean (or a sum) over the batch"
        )
    return float(batch_size)


class FactorAccumulator:
    """Running sums that turn captured (input, output-grad) pairs into Kronecker factors.

    The lens feeds it every N training steps; :func:`kronecker_factors` feeds it once.

    Args:
        layers: ``{name: LayerInfo}`` to accumulate for.
    """

    def __init__(self, layers: Mapping[str, LayerInfo]) -> None:
        self.layers = dict(layers)
        self._in: dict[str, Tensor] = {}
        self._grad: dict[str, Tensor] = {}
        self._rows_in: dict[str, int] = dict.fromkeys(self.layers, 0)
        self.num_samples: dict[str, int] = dict.fromkeys(self.layers, 0)

    def add_inputs(self, name: str, x: Tensor) -> None:
        """Add one forward call's input to the input-side sum."""
        info = self.layers[name]
        rows = info.spec.input_rows(info.module, x)  # [N, dim]
        self._add(self._in, name, rows)
        self._rows_in[name] += rows.shape[0]

    def add_grads(self, name: str, grad: Tensor, *, scale: float, samples: int) -> None:
        """Add one backward's output gradient (multiplied by ``scale``) to the gradient side.

        Args:
            name: layer name.
            grad: ``dL/dy`` as captured, the layer output's shape.
            scale: per-sample scale (see :func:`batch_scale`).
            samples: how many samples this backward counts for (``B``; 0 for the extra
                backward passes of the ``"ggn"`` mode, which add to the same samples).
        """
        info = self.layers[name]
        if not torch.isfinite(grad).all():
            raise RuntimeError(
                f"layer {name!r}: NaN or Inf in the output gradient; check the loss and the "
                "learning rate before measuring curvature"
            )
        rows = info.spec.grad_rows(info.module, grad) * scale  # [N, dim]
        self._add(self._grad, name, rows)
        self.num_samples[name] += samples

    def add_record(self, name: str, record: LayerRecord, *, scale: float, samples: int) -> None:
        """Add everything a :class:`~curvlens.hooks.LayerRecord` holds (one backward per call)."""
        for x in record.inputs:
            self.add_inputs(name, x)
        for g in record.output_grads:
            self.add_grads(name, g, scale=scale, samples=samples)

    @staticmethod
    def _add(store: dict[str, Tensor], name: str, rows: Tensor) -> None:
        outer = rows.mT @ rows
        store[name] = outer if name not in store else store[name] + outer

    def all_reduce(self) -> None:
        """Sum the running sums and counts over all ``torch.distributed`` processes.

        Afterwards every process holds what one process would have accumulated on the union of
        the batches. A no-op without an initialized process group; every process must call it.
        """
        if not is_distributed():
            return
        for name, info in self.layers.items():
            m, n = info.matrix_shape
            in_dim, grad_dim = (n, m) if info.spec.inputs_are_columns else (m, n)
            ref = info.weight
            for store, dim in ((self._in, in_dim), (self._grad, grad_dim)):
                if name not in store:  # a process that saw nothing still joins the collective
                    store[name] = torch.zeros(dim, dim, dtype=ref.dtype, device=ref.device)
                all_reduce_sum(store[name])
            self._rows_in[name] = sum_count(self._rows_in[name], ref.device)
            self.num_samples[name] = sum_count(self.num_samples[name], ref.device)

    def copy(self) -> FactorAccumulator:
        """An independent copy of the running sums (e.g. to all-reduce without touching them)."""
        twin = FactorAccumulator(self.layers)
        twin._in = {k: v.clone() for k, v in self._in.items()}
        twin._grad = {k: v.clone() for k, v in self._grad.items()}
        twin._rows_in = dict(self._rows_in)
        twin.num_samples = dict(self.num_samples)
        return twin

    def factors(self, *, skip_empty: bool = False) -> dict[str, KroneckerFactors]:
        """The averaged factors of every layer.

        Args:
            skip_empty: leave out layers that saw no sample instead of raising.

        Raises:
            ValueError: a layer saw no input rows or no samples (empty batch), unless
                ``skip_empty``.
        """
        out: dict[str, KroneckerFactors] = {}
        for name, info in self.layers.items():
            if skip_empty and (self._rows_in[name] == 0 or self.num_samples[name] == 0):
                continue
            if self._rows_in[name] == 0 or self.num_samples[name] == 0:
                raise ValueError(
                    f"layer {name!r} saw no samples: empty batch, or the layer is not used in "
                    "the forward pass; check the inputs or leave the layer out"
                )
            C_in = self._in[name] / self._rows_in[name]
            C_grad = self._grad[name] / self.num_samples[name]
            if info.spec.inputs_are_columns:
                out[name] = KroneckerFactors(C_in, C_grad, self.num_samples[name])
            else:
                out[name] = KroneckerFactors(C_grad, C_in, self.num_samples[name])
        return out


def _as_tuple(inputs: Tensor | tuple) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _check_batch(inputs: tuple) -> int:
    first = inputs[0]
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError("inputs must be a tensor (or tuple of tensors) with a batch dimension")
    if first.shape[0] == 0:
        raise ValueError("empty batch: inputs have batch size 0; pass at least one sample")
    return int(first.shape[0])


def _is_cross_entropy(loss_fn: Callable) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy


def _is_mse(loss_fn: Callable) -> bool:
    return isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss


def _sample_targets(
    loss_fn: Callable, output: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Targets drawn from the model's predictive distribution (for the Fisher)."""
    out = output.detach()
    if _is_cross_entropy(loss_fn):
        probs = out.movedim(1, -1).softmax(-1)  # class dim last
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat.to(torch.float64), 1, generator=generator)
        return draws.reshape(probs.shape[:-1]).to(out.device)
    if _is_mse(loss_fn):
        # l_i = ||f_i - y_i||^2 / D has Hessian (2/D) I; y = f + sqrt(D/2) eps matches it.
        per_sample = out[0].numel()
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device="cpu")
        return out + math.sqrt(per_sample / 2) * noise.to(out.device)
    raise ValueError(
        f"mode='fisher' needs a loss whose predictive distribution curvlens knows "
        f"(nn.CrossEntropyLoss, nn.MSELoss, or their functional forms), got {loss_fn!r}; "
        "use mode='ggn' (exact, any per-sample loss) or mode='empirical'"
    )


def _loss_hessian_sqrt(loss_fn: Callable, output: Tensor, targets: Tensor) -> Tensor:
    """``S [B, D, D]`` with ``S_i S_i^T`` = Hessian of sample i's loss w.r.t. its output."""
    out = output.detach()
    B = out.shape[0]
    D = out[0].numel()
    if D > 4096:
        raise ValueError(
            f"mode='ggn' needs one backward per output dimension and the output has {D} per "
            "sample; use mode='fisher' for such models"
        )

    def per_sample(o: Tensor, t: Tensor) -> Tensor:
        return loss_fn(o.reshape(1, *out.shape[1:]), t.reshape(1, *t.shape))

    hess = torch.func.vmap(torch.func.hessian(per_sample))(out, targets)  # [B, *o, *o]
    hess = hess.reshape(B, D, D)
    evals, evecs = torch.linalg.eigh((hess + hess.mT) / 2)
    return evecs * evals.clamp_min(0).sqrt()[:, None, :]


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
) -> dict[str, KroneckerFactors]:
    """Kronecker factors of every chosen layer on one batch.

    The model is used in its current train/eval mode (wrap the call in
    :func:`curvlens.hessian.measurement_mode` for dropout off and batch-norm frozen); parameter
    ``.grad`` fields are not touched.

    Args:
        model: the network; called as ``model(*inputs)``.
        loss_fn: ``loss_fn(output, targets)``, a mean (or sum) over the batch.
        inputs: a tensor ``[B, ...]`` or a tuple of tensors.
        targets: targets ``[B, ...]``.
        mode: ``"empirical"``, ``"fisher"`` or ``"ggn"`` (module docstring).
        backend: ``"hooks"`` or ``"backpack"``.
        layers: qualified names to measure (default: every supported layer).
        generator: random source of the ``"fisher"`` targets.
        mc_samples: Monte-Carlo draws for ``"fisher"`` (averaged).
        distributed: under an initialized ``torch.distributed`` process group, sum the factors'
            statistics over all processes (hooks backend), so each process gets the factors of
            the union of the batches. Every process must then call this function.

    Returns:
        ``{layer_name: KroneckerFactors}`` with ``C_A [n, n]`` and ``C_delta [m, m]``.

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
    inputs = _as_tuple(inputs)
    B = _check_batch(inputs)
    chosen = find_layers(model, layers, on_unsupported="skip")
    if backend is FactorBackend.BACKPACK:
        from curvlens._backpack import backpack_factors

        return backpack_factors(model, loss_fn, inputs, targets, chosen, mode, mc_samples)
    acc = _hook_factors(model, loss_fn, inputs, targets, chosen, mode, generator, mc_samples, B)
    if distributed:
        acc.all_reduce()
    return acc.factors()


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
) -> FactorAccumulator:
    weights = [info.weight for info in chosen.values()]
    scale = batch_scale(loss_fn, B)
    acc = FactorAccumulator(chosen)
    with Capture(model, chosen) as cap:
        output = model(*inputs)
        if mode is FactorMode.EMPIRICAL:
            loss = loss_fn(output, targets)
            _check_loss(loss)
            torch.autograd.grad(loss, weights, allow_unused=True)
            passes = 1
        elif mode is FactorMode.FISHER:
            for draw in range(mc_samples):
                loss = loss_fn(output, _sample_targets(loss_fn, output, generator))
                _check_loss(loss)
                torch.autograd.grad(loss, weights, retain_graph=draw < mc_samples - 1,
                                    allow_unused=True)
            passes = mc_samples
        else:
            S = _loss_hessian_sqrt(loss_fn, output, targets)  # [B, D, D]
            D = S.shape[-1]
            for c in range(D):
                grad_out = (S[:, :, c] / scale).reshape(output.shape)
                torch.autograd.grad(output, weights, grad_out, retain_graph=c < D - 1,
                                    allow_unused=True)
            passes = D
        bad = [n for n, r in cap.records.items()
               if any(not torch.isfinite(g).all() for g in r.output_grads)]
        if bad:
            raise RuntimeError(
                f"NaN or Inf in the output gradients of layers {bad} (the one nearest the loss "
                f"is {bad[-1]!r}); check the loss and the inputs before measuring curvature"
            )
        for name, record in cap.records.items():
            for x in record.inputs:
                acc.add_inputs(name, x)
            for j, g in enumerate(record.output_grads):
                counts = B if (mode is not FactorMode.GGN or j % passes == 0) else 0
                acc.add_grads(name, g, scale=scale, samples=counts)
    return acc


def _check_loss(loss: Tensor) -> None:
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (mean over the batch), got shape {tuple(loss.shape)}"
        )
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {loss.item()}; curvature is undefined at this point")
