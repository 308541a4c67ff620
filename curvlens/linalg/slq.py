r"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

For a unit probe ``q`` and ``m`` Lanczos steps from it, ``T_m = S diag(theta) S^T`` gives the
Gauss quadrature rule ``q^T f(A) q ~ sum_i w_i f(theta_i)`` with nodes ``theta_i`` and weights
``w_i = S_{1i}^2``, exact for polynomials of degree ``< 2m``. For Rademacher probes ``z`` and
``q = z / sqrt(dim)``, ``E[q^T f(A) q] = tr f(A) / dim``, so averaging the rules over probes gives
the spectral density ``rho(x) = (1/dim) sum_j delta(x - lambda_j)``; a Gaussian kernel of width
``sigma`` on each node turns it into a smooth curve on a grid. In particular the rule reproduces
the moments ``sum_i w_i theta_i^p = q^T A^p q`` for ``p < 2m`` exactly.

References: G. H. Golub and G. Meurant, *Matrices, Moments and Quadrature* (2010); L. Lin, Y. Saad,
C. Yang, "Approximating spectral densities of large matrices", SIAM Review (2016); B. Ghorbani,
S. Krishnan, Y. Xiao, "An investigation into neural net optimization via Hessian eigenvalue
density", ICML (2019). Part of the Hessian engine of curvlens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlens._progress import progress_bar
from curvlens.linalg.lanczos import lanczos_tridiagonal
from curvlens.linalg.trace import Probe, random_probes

__all__ = ["SpectralDensity", "slq_quadrature", "spectral_density", "gaussian_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """An SLQ estimate of a spectral density.

    Attributes:
        nodes: ``[P, m]`` quadrature nodes (Ritz values) per probe.
        weights: ``[P, m]`` their weights; each row sums to 1 (zero-padded when a probe's Krylov
            space was exhausted before ``m`` steps).
        grid: ``[G]`` points where the smoothed density is evaluated.
        density: ``[G]`` the smoothed density (integrates to about 1 over a wide grid).
        sigma: the Gaussian kernel width.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float

    def moment(self, p: int) -> Tensor:
        """``[]`` estimate of ``tr(A^p) / dim``: the probe mean of ``sum_i w_i theta_i^p``."""
        return (self.weights * self.nodes**p).sum(-1).mean()


def slq_quadrature(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    num_probes: int = 8,
    num_iter: int = 64,
    distribution: Probe | str = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of ``num_probes`` random probes.

    Args:
        matvec: ``[dim] -> [dim]``, a symmetric operator.
        dim: its dimension.
        num_probes: number of random probes ``P``.
        num_iter: Lanczos steps per probe ``m`` (capped at ``dim``).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        generator: seeds the probes.
        dtype: working precision.
        device: where vectors live.
        progress: tqdm bar over the probes.

    Returns:
        ``(nodes [P, m], weights [P, m])``, each row of weights summing to 1.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> nodes, weights = slq_quadrature(lambda v: A @ v, 3, num_probes=1, num_iter=3)
        >>> nodes.sort().values.round(decimals=8)
        tensor([[1., 2., 3.]], dtype=torch.float64)
    """
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if not (isinstance(num_iter, int) and num_iter >= 1):
        raise ValueError(f"num_iter must be a positive int, got {num_iter!r}")
    m = min(num_iter, dim)
    probes = random_probes(
        dim, num_probes, distribution=distribution, generator=generator, dtype=dtype,
        device=device,
    )
    nodes = torch.zeros(num_probes, m, dtype=dtype, device=device)
    weights = torch.zeros(num_probes, m, dtype=dtype, device=device)
    bar = None
    if progress:
        bar = progress_bar(total=num_probes, desc="slq", unit="probe", leave=False)
    try:
        for p in range(num_probes):
            alpha, beta = lanczos_tridiagonal(matvec, probes[p], m)
            T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
            theta, S = torch.linalg.eigh(T)
            j = theta.shape[0]
            nodes[p, :j] = theta
            weights[p, :j] = S[0] ** 2
            if j < m:  # exhausted: pad with the last node at zero weight
                nodes[p, j:] = theta[-1]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return nodes, weights


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``[G]`` the probe-averaged Gaussian-kernel density of quadrature rules on ``grid [G]``.

    Args:
        nodes: ``[P, m]`` nodes.
        weights: ``[P, m]`` weights.
        grid: ``[G]`` evaluation points.
        sigma: kernel width (> 0).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    z = (grid[:, None, None] - nodes[None]) / sigma  # [G, P, m]
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(-1).mean(-1)


def spectral_density(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    num_probes: int = 8,
    num_iter: int = 64,
    grid: Tensor | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    distribution: Probe | str = Probe.RADEMACHER,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SpectralDensity:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        matvec: ``[dim] -> [dim]``, a symmetric operator.
        dim: its dimension.
        num_probes: number of random probes.
        num_iter: Lanczos steps per probe.
        grid: ``[G]`` where to evaluate the density; default ``num_points`` points spanning the
            nodes plus five kernel widths on each side.
        num_points: grid size when ``grid`` is not given.
        sigma: Gaussian kernel width; default 1% of the node range (or 1e-3 if it is zero).
        distribution: probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: seeds the probes.
        dtype: working precision.
        device: where vectors live.
        progress: tqdm bar over the probes.

    Returns:
        :class:`SpectralDensity` with nodes, weights, grid, density and sigma.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.linspace(0, 1, 100, dtype=torch.float64))
        >>> d = spectral_density(lambda v: A @ v, 100, num_probes=4, num_iter=20,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.trapezoid(d.density, d.grid)), 3)
        1.0
    """
    nodes, weights = slq_quadrature(
        matvec, dim, num_probes=num_probes, num_iter=num_iter, distribution=distribution,
        generator=generator, dtype=dtype, device=device, progress=progress,
    )
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(abs(hi), 1.0)
    if grid is None:
        if not (isinstance(num_points, int) and num_points >= 2):
            raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=dtype,
                              device=device)
    else:
        grid = grid.to(dtype=dtype, device=device)
    density = gaussian_density(nodes, weights, grid, sigma)
    return SpectralDensity(nodes, weights, grid, density, float(sigma))
