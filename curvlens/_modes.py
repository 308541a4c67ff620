"""Measurement hygiene: deterministic forward passes while curvlens measures a model.

Curvature is measured on a fixed batch with a fixed function: dropout must be off and batch-norm
must use (and not update) its running statistics, as in the main paper's protocol (Calvo,
2026, arXiv:2606.02596). :func:`measurement_mode` switches exactly the modules whose behaviour
depends on ``module.training`` in that way and restores every flag afterwards, also on errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["STOCHASTIC_MODULES", "measurement_mode"]

#: Module types put in eval mode during measurement: dropout of every kind, batch/instance norm
#: (running statistics), and attention modules whose dropout depends on ``training``.
STOCHASTIC_MODULES: tuple[type[nn.Module], ...] = (
    _DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    _NormBase,
    nn.MultiheadAttention,
)


@contextmanager
def measurement_mode(
    model: nn.Module, extra_types: tuple[type[nn.Module], ...] = ()
) -> Iterator[nn.Module]:
    """Put dropout and normalization modules of ``model`` in eval mode for the block's duration.

    Other modules keep their flag. On exit (normal or by exception) each switched module gets its
    own previous ``training`` flag back.

    Args:
        model: the model to measure.
        extra_types: further module types to put in eval mode (e.g. a custom stochastic layer).

    Yields:
        ``model`` itself.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
        >>> with measurement_mode(net):
        ...     [m.training for m in net]
        [True, False, False]
        >>> [m.training for m in net]
        [True, True, True]
    """
    types = STOCHASTIC_MODULES + tuple(extra_types)
    saved = [(m, m.training) for m in model.modules() if isinstance(m, types)]
    try:
        for m, _ in saved:
            m.training = False
        yield model
    finally:
        for m, flag in saved:
            m.training = flag
