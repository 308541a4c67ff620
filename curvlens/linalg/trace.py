r"""Hutchinson's stochastic trace estimator with its standard error.

For probes ``z`` with ``E[z z^T] = I`` (Rademacher or Gaussian), ``E[z^T A z] = tr(A)``. With
``N`` independent probes the estimate is the sample mean of ``z_i^T A z_i`` and its standard error
the sample standard deviation over ``sqrt(N)``. Rademacher probes give the smallest variance,
``2 (||A||_F^2 - sum_i A_ii^2)``.

Reference: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines" (1989). Part of the Hessian engine of curvlens.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from curvlens._options import parse_option
from curvlens._progress import progress_bar

__all__ = ["Probe", "TraceEstimate", "hutchinson_trace", "random_probes"]


class Probe(str, Enum):
    """Distribution of the random probe vectors."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate.

    Attributes:
        estimate: ``[]`` the mean of ``z_i^T A z_i``.
        std_error: ``[]`` its standard error (``nan`` for a single probe).
        samples: ``[N]`` the individual quadratic forms ``z_i^T A z_i``.
    """

    estimate: Tensor
    std_error: Tensor
    samples: Tensor


def random_probes(
    dim: int,
    num: int,
    *,
    distribution: Probe | str = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``num`` probe vectors as rows ``[num, dim]``, drawn on the generator's device and moved."""
    dist = _parse_probe(distribution)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if dist is Probe.RADEMACHER:
        z = torch.randint(0, 2, (num, dim), generator=generator, device=gen_device)
        z = z.to(dtype).mul_(2).sub_(1)
    else:
        z = torch.randn(num, dim, generator=generator, dtype=dtype, device=gen_device)
    return z.to(device)


def _parse_probe(distribution: Probe | str) -> Probe:
    return parse_option(Probe, distribution, "distribution")


def hutchinson_trace(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_samples: int,
    *,
    batch_size: int | None = None,
    distribution: Probe | str = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutchinson estimate of ``tr(A)`` and its standard error.

    Args:
        matvec: ``[dim] -> [dim]``; with ``batch_size`` it must also map ``[dim, b] -> [dim, b]``
            (columns are probes).
        dim: the operator's dimension.
        num_samples: number of probes ``N >= 1``.
        batch_size: probes per ``matvec`` call (``None``: one at a time).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        generator: seeds the probes.
        dtype: probe dtype.
        device: probe device.
        progress: tqdm bar over the probes.

    Returns:
        :class:`TraceEstimate` ``(estimate, std_error, samples)``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> round(float(hutchinson_trace(lambda v: A @ v, 10, 4, generator=g).estimate), 6)
        55.0
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    z = random_probes(
        dim, num_samples, distribution=distribution, generator=generator, dtype=dtype,
        device=device,
    )  # [N, dim]
    step = batch_size or 1
    bar = None
    if progress:
        bar = progress_bar(total=num_samples, desc="hutchinson", unit="probe", leave=False)
    quad = []
    try:
        for start in range(0, num_samples, step):
            chunk = z[start : start + step]  # [b, dim]
            if batch_size is None:
                Az = matvec(chunk[0])[None]
            else:
                Az = matvec(chunk.mT.contiguous()).mT  # [b, dim]
            if Az.shape != chunk.shape:
                raise ValueError(
                    f"matvec returned shape {tuple(Az.shape)}; expected "
                    f"{tuple(chunk.shape[::-1]) if batch_size else (dim,)}"
                )
            quad.append((chunk * Az.to(dtype)).sum(-1))
            if bar is not None:
                bar.update(chunk.shape[0])
    finally:
        if bar is not None:
            bar.close()
    samples = torch.cat(quad)  # [N]
    estimate = samples.mean()
    if num_samples > 1:
        std_error = samples.std(correction=1) / num_samples**0.5
    else:
        std_error = torch.full_like(estimate, float("nan"))
    return TraceEstimate(estimate, std_error, samples)
