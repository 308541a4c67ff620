"""What curvlens needs to know about a loss: its reduction over the batch, and its output.

* **Reduction.** Per-sample output gradients ``delta_i = dl_i / dy_i`` are read off the gradient
  of the batch loss: times ``B`` for a mean over ``B`` samples, as is for a sum. The reduction is
  read from torch loss modules (``loss.reduction``) and from ``functools.partial`` keywords, and
  may be given for any callable (``"mean"`` or ``"sum"``); the default is a mean.
* **Output selector.** A model may return a dict, a tuple or a ``ModelOutput``; the Fisher and
  GGN modes need the one tensor the loss is a function of (the logits): ``output`` names it by
  key, attribute or index, or is a callable ``output -> tensor``.
* **Likelihood.** The Fisher mode samples targets from the model's predictive distribution: a
  categorical over dim 1 (as ``nn.CrossEntropyLoss``) or a Gaussian (as ``nn.MSELoss``), detected
  from the loss or given as ``likelihood``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlens._options import parse_option

__all__ = [
    "Likelihood",
    "LossReduction",
    "OutputSelector",
    "batch_scale",
    "likelihood_of",
    "loss_hessian_sqrt",
    "loss_reduction",
    "sample_targets",
    "select_output",
]

OutputSelector = str | int | Callable[[Any], Tensor] | None


class LossReduction(str, Enum):
    """How the loss combines the samples of a batch."""

    MEAN = "mean"
    SUM = "sum"


class Likelihood(str, Enum):
    """The model's predictive distribution, for Fisher targets."""

    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"


def loss_reduction(loss_fn: Callable, reduction: LossReduction | str | None = None
                   ) -> LossReduction:
    """The reduction of ``loss_fn``: ``reduction`` when given, else the loss's own.

    Example:
        >>> loss_reduction(nn.CrossEntropyLoss(reduction="sum")).value
        'sum'
        >>> loss_reduction(lambda out, y: (out - y).square().sum(), "sum").value
        'sum'
    """
    if reduction is not None:
        return parse_option(LossReduction, reduction, "loss_reduction")
    own = getattr(loss_fn, "reduction", None)
    if own is None and isinstance(loss_fn, functools.partial):
        own = loss_fn.keywords.get("reduction")
    if own is None:
        return LossReduction.MEAN
    if own not in ("mean", "sum"):
        raise ValueError(
            f"loss reduction {own!r} of {loss_fn!r} is not supported; curvlens needs a scalar "
            "loss that is a mean (or a sum) over the batch: pass reduction='mean' or 'sum' to "
            "the loss"
        )
    return LossReduction(own)


def batch_scale(loss_fn: Callable, batch_size: int,
                reduction: LossReduction | str | None = None) -> float:
    """Factor that turns gradients of the batch loss into per-sample gradients.

    ``B`` for a loss that averages over the batch (the default, and ``reduction="mean"``), ``1``
    for ``reduction="sum"`` (given, or read off the loss as in :func:`loss_reduction`).

    Example:
        >>> batch_scale(nn.MSELoss(), 8), batch_scale(nn.MSELoss(reduction="sum"), 8)
        (8.0, 1.0)
    """
    return 1.0 if loss_reduction(loss_fn, reduction) is LossReduction.SUM else float(batch_size)


def select_output(output: Any, selector: OutputSelector) -> Tensor:
    """The tensor ``selector`` picks from a model output (the output itself for ``None``)."""
    if selector is None:
        picked = output
    elif callable(selector):
        picked = selector(output)
    elif isinstance(selector, str) and isinstance(output, Mapping):
        picked = output[selector]
    elif isinstance(selector, str):
        picked = getattr(output, selector)
    else:
        picked = output[selector]
    if not isinstance(picked, Tensor):
        raise TypeError(
            f"the model output is a {type(output).__name__}, not a tensor; pass output=<key, "
            "index or callable> to pick the tensor the loss is a function of (e.g. "
            "output='logits')" if selector is None else
            f"output={selector!r} picked a {type(picked).__name__}, not a tensor"
        )
    return picked


def _replace_output(output: Any, selector: OutputSelector, z: Tensor) -> Any:
    """``output`` with the selected tensor replaced by ``z`` (for the GGN's loss Hessian)."""
    if selector is None or isinstance(output, Tensor):
        return z
    if callable(selector):
        raise ValueError("mode='ggn' with a callable output selector: pass the output's key or "
                         "index instead, so curvlens can put a perturbed tensor back")
    if isinstance(output, Mapping):
        return {**output, selector: z}
    if isinstance(output, (tuple, list)):
        items = list(output)
        items[selector] = z
        return type(output)(items) if isinstance(output, list) else tuple(items)
    raise ValueError(f"mode='ggn' cannot put the selected tensor back into a "
                     f"{type(output).__name__}; return a dict or a tuple from the model")


def likelihood_of(loss_fn: Callable, likelihood: Likelihood | str | None = None) -> Likelihood:
    """``likelihood`` when given, else detected from a cross-entropy or MSE loss.

    Raises:
        ValueError: neither given nor detectable.
    """
    if likelihood is not None:
        return parse_option(Likelihood, likelihood, "likelihood")
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    if isinstance(fn, nn.CrossEntropyLoss) or fn is F.cross_entropy:
        return Likelihood.CATEGORICAL
    if isinstance(fn, nn.MSELoss) or fn is F.mse_loss:
        return Likelihood.GAUSSIAN
    raise ValueError(
        f"mode='fisher' needs a loss whose predictive distribution curvlens knows "
        f"(nn.CrossEntropyLoss, nn.MSELoss, or their functional forms), got {loss_fn!r}; pass "
        "likelihood='categorical' or 'gaussian', or use mode='ggn' (exact, any per-sample "
        "loss) or mode='empirical'"
    )


def sample_targets(likelihood: Likelihood, logits: Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """Targets drawn from the model's predictive distribution (for the Fisher)."""
    out = logits.detach()
    if likelihood is Likelihood.CATEGORICAL:
        probs = out.movedim(1, -1).softmax(-1) if out.dim() > 1 else out.softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat.to(torch.float64), 1, generator=generator)
        return draws.reshape(probs.shape[:-1]).to(out.device)
    # l_i = ||f_i - y_i||^2 / D has Hessian (2/D) I; y = f + sqrt(D/2) eps matches it.
    per_sample = out[0].numel()
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device="cpu")
    return out + math.sqrt(per_sample / 2) * noise.to(out.device)


def loss_hessian_sqrt(loss_fn: Callable, output: Any, selector: OutputSelector,
                      targets: Tensor) -> Tensor:
    """``S [B, D, D]`` with ``S_i S_i^T`` = Hessian of sample i's loss w.r.t. its output."""
    full = output
    out = select_output(output, selector).detach()
    B = out.shape[0]
    D = out[0].numel()
    if D > 4096:
        raise ValueError(
            f"mode='ggn' needs one backward per output dimension and the output has {D} per "
            "sample; use mode='fisher' for such models"
        )

    def per_sample(o: Tensor, t: Tensor) -> Tensor:
        z = o.reshape(1, *out.shape[1:])
        return loss_fn(_replace_output(full, selector, z), t.reshape(1, *t.shape))

    hess = torch.func.vmap(torch.func.hessian(per_sample))(out, targets)  # [B, *o, *o]
    hess = hess.reshape(B, D, D)
    evals, evecs = torch.linalg.eigh((hess + hess.mT) / 2)
    return evecs * evals.clamp_min(0).sqrt()[:, None, :]
