r"""Free decompression of a layer's spectra measured on a subsample of its coordinates.

Ameli, van der Heide, Hodgkinson & Mahoney, "Free Decompression with Algebraic Spectral Curves"
(2026, arXiv:2605.03634); the maths is
in :mod:`curvlens.spectra.free_decompression`. Two matrices of a layer are too wide to
eigendecompose in large models but cheap to *sample*:

* the **activation covariance** ``C_A = (1/N) A^T A`` of the layer's input-side rows ``A``
  (``[N, n]``: inputs of a Linear layer, unfolded patches of a conv, as in
  :mod:`curvlens.kronecker`): only ``n_s`` columns of ``A`` are needed for the principal
  submatrix ``C_A[S, S]``;
* the **Hessian block** ``H_WW`` of the layer's weight (``mn x mn`` in row-major ``vec(W)``):
  ``n_s`` exact Hessian-vector products with unit directions ``e_s`` (``s`` in ``S``) give the
  principal submatrix ``H_WW[S, S]``, never the dense block.

``S`` is a uniformly random subset of ``n_s`` coordinates. When the matrix's eigenvectors are
delocalized (wide layers, Wishart-like covariances), the spectrum of ``M[S, S]`` is the free
compression by ``n_s / n`` of the spectrum of ``M``, and :func:`free_decompress` undoes it:
``t = ln(n_target / n_s)``. Both helpers return the subsample eigenvalues, the predicted density,
and the exact eigenvalues of the full matrix when it is small enough to check against.

Example:
    >>> import torch
    >>> from torch import nn
    >>> g = torch.Generator().manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(400, 1)).double()
    >>> x = torch.randn(1600, 400, generator=g, dtype=torch.float64)
    >>> out = decompress_activation_covariance(net, "0", x, subsample=100, deg_z=1, deg_m=2,
    ...                                        generator=torch.Generator().manual_seed(1))
    >>> out.spectrum.eigenvalues().shape, out.exact_eigenvalues.shape
    ((400,), (400,))
    >>> out.wasserstein() < 0.2 * out.baseline_wasserstein()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlens._modes import measurement_mode
from curvlens.hessian import block_hvp
from curvlens.hooks import Capture
from curvlens.layers import LayerInfo, LayerKind, resolve_layer
from curvlens.spectra.free_decompression import DecompressedSpectrum, free_decompress

__all__ = [
    "LayerDecompression",
    "decompress_activation_covariance",
    "decompress_hessian_block",
    "wasserstein_1",
]


def wasserstein_1(a: Tensor | np.ndarray, b: Tensor | np.ndarray, *, levels: int = 4000) -> float:
    r"""1-Wasserstein distance between two empirical spectra (equal weights per eigenvalue).

    :math:`W_1 = \int_0^1 |F_a^{-1}(q) - F_b^{-1}(q)|\,dq` with the empirical (step) quantile
    functions, by the midpoint rule on ``levels`` levels: exact when both sample sizes divide
    ``levels``; samples of different sizes are allowed.
    """
    q = (np.arange(levels) + 0.5) / levels
    qa = np.quantile(np.asarray(a, dtype=np.float64).ravel(), q, method="inverted_cdf")
    qb = np.quantile(np.asarray(b, dtype=np.float64).ravel(), q, method="inverted_cdf")
    return float(np.mean(np.abs(qa - qb)))


@dataclass(frozen=True)
class LayerDecompression:
    """A layer spectrum measured on ``n_s`` coordinates and decompressed to ``n_target``.

    Attributes:
        layer: qualified layer name; matrix: ``"activation_covariance"`` or ``"hessian_block"``.
        n: size of the full matrix; n_target: size decompressed to (``n`` by default).
        indices: ``[n_s]`` the sampled coordinates (columns of ``A``, or flat indices of
            ``vec(W)`` in row-major order).
        sub_eigenvalues: ``[n_s]`` ascending eigenvalues of the principal submatrix.
        spectrum: the predicted density at size ``n_target``.
        exact_eigenvalues: ``[n]`` ascending eigenvalues of the full matrix, or ``None`` when it
            was larger than the ``exact_max`` of the call.
    """

    layer: str
    matrix: str
    n: int
    n_target: int
    indices: Tensor
    sub_eigenvalues: np.ndarray
    spectrum: DecompressedSpectrum
    exact_eigenvalues: np.ndarray | None

    def eigenvalues(self) -> np.ndarray:
        """``[n_target]`` predicted eigenvalues (quantiles of the predicted density)."""
        return self.spectrum.eigenvalues(self.n_target)

    def wasserstein(self) -> float:
        """W1 between the predicted and the exact eigenvalues (needs ``exact_eigenvalues``)."""
        return wasserstein_1(self.eigenvalues(), self._exact())

    def baseline_wasserstein(self) -> float:
        """W1 between the undecompressed subsample eigenvalues and the exact ones."""
        return wasserstein_1(self.sub_eigenvalues, self._exact())

    def _exact(self) -> np.ndarray:
        if self.exact_eigenvalues is None:
            raise RuntimeError(
                f"layer {self.layer!r}: the full {self.matrix} ({self.n} x {self.n}) was not "
                "eigendecomposed; call again with exact_max >= n to compare"
            )
        return self.exact_eigenvalues


def _check_sizes(where: str, n: int, subsample: int, n_target: int | None) -> int:
    if not (isinstance(subsample, int) and 4 <= subsample <= n):
        raise ValueError(
            f"{where}: the subsample size must be an int in [4, {n}] (the matrix is {n} x {n}), "
            f"got {subsample!r}"
        )
    n_target = n if n_target is None else n_target
    if not (isinstance(n_target, int) and n_target >= subsample):
        raise ValueError(
            f"{where}: n_target must be an int >= the subsample size {subsample}, got {n_target!r}"
        )
    return n_target


def _indices(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=generator)[:k].sort().values


def _eigvalsh(matrix: Tensor) -> np.ndarray:
    """Ascending eigenvalues of the symmetrized matrix, float64 on the CPU (LAPACK via numpy)."""
    sym = matrix.detach().to("cpu", torch.float64).numpy()
    return np.linalg.eigvalsh(0.5 * (sym + sym.T))


def _input_rows(model: nn.Module, info: LayerInfo, inputs: Tensor | Iterable[Any]) -> Tensor:
    """``[N, n]`` input-side rows of ``info`` over all batches, float64 on the CPU."""
    batches = [inputs] if isinstance(inputs, (Tensor, tuple)) else list(inputs)
    rows: list[Tensor] = []
    # Capture records only forward passes with grad enabled; nothing is backpropagated.
    with measurement_mode(model), Capture(model, {info.name: info}, output_grads=False) as cap:
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            with torch.enable_grad():
                model(*args)
            for x in cap.records[info.name].inputs:
                rows.append(info.spec.input_rows(info.module, x).detach().to("cpu", torch.float64))
            cap.clear()
    if not rows or sum(r.shape[0] for r in rows) == 0:
        raise ValueError(f"layer {info.name!r} saw no inputs; pass a non-empty batch")
    return torch.cat(rows)


def decompress_activation_covariance(
    model: nn.Module,
    layer: str | nn.Module | LayerInfo,
    inputs: Tensor | tuple | Iterable[Any],
    *,
    subsample: int,
    n_target: int | None = None,
    center: bool = False,
    exact_max: int = 4096,
    generator: torch.Generator | None = None,
    deg_z: int | None = None,
    deg_m: int | None = None,
    grid: int = 2000,
) -> LayerDecompression:
    r"""Predict the spectrum of a layer's input covariance from ``subsample`` of its features.

    Runs ``model`` on ``inputs`` (in :func:`~curvlens.hessian.measurement_mode`), collects the
    layer's input-side rows ``A`` ``[N, n]`` (Linear: inputs; conv: unfolded patches), forms
    ``C_A[S, S] = (1/N) A_S^T A_S`` for a random set ``S`` of ``subsample`` features, and
    decompresses its spectrum to size ``n_target`` with :func:`free_decompress`.

    Args:
        model: the network.
        layer: a Linear or conv layer (qualified name, module or ``LayerInfo``).
        inputs: one batch (tensor, or tuple of positional inputs) or an iterable of batches.
        subsample: ``n_s``, the number of features sampled (``4 <= n_s <= n``).
        n_target: the size to predict (default the layer's width ``n``).
        center: subtract the feature means first (covariance instead of second moment).
        exact_max: also eigendecompose the full ``n x n`` covariance when ``n <= exact_max``.
        generator: for the random feature subset.
        deg_z, deg_m, grid: passed to :func:`free_decompress` (degrees chosen by hold-out
            validation when ``None``).

    Returns:
        A :class:`LayerDecompression` with ``matrix="activation_covariance"``.

    Raises:
        ValueError: an Embedding layer (its input covariance is a diagonal of token
            frequencies, nothing to decompress), bad sizes, empty inputs.
    """
    info = resolve_layer(model, layer)
    where = f"layer {info.name!r}"
    if info.kind == LayerKind.EMBEDDING:
        raise ValueError(
            f"{where} is an Embedding: its input covariance is diagonal (token frequencies); "
            "decompress a Linear or conv layer's activations instead"
        )
    a = _input_rows(model, info, inputs)  # [N, n]
    n = a.shape[1]
    n_target = _check_sizes(where, n, subsample, n_target)
    if center:
        a = a - a.mean(0)
    idx = _indices(n, subsample, generator)
    a_s = a[:, idx]
    sub = _eigvalsh(a_s.T @ a_s / a.shape[0])  # [n_s]
    exact = _eigvalsh(a.T @ a / a.shape[0]) if n <= exact_max else None
    spec = free_decompress(sub, n_target, deg_z=deg_z, deg_m=deg_m, grid=grid)
    return LayerDecompression(info.name, "activation_covariance", n, n_target, idx, sub, spec,
                              exact)


def _hessian_columns(model, loss_fn, inputs, targets, info, cols: Tensor, max_batch: int):
    """``[len(cols), mn]``: columns ``H_WW e_c`` (row-major ``vec(W)``), by exact HVPs."""
    m, n = info.matrix_shape
    w = info.weight
    out = []
    for chunk in cols.split(max_batch):
        v = torch.zeros(chunk.numel(), m * n, dtype=w.dtype, device=w.device)
        v[torch.arange(chunk.numel()), chunk.to(w.device)] = 1.0
        hv = block_hvp(model, loss_fn, inputs, targets, info, v.reshape(-1, m, n))
        out.append(hv.reshape(chunk.numel(), m * n).detach())
    return torch.cat(out)


def decompress_hessian_block(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor | tuple,
    targets: Any,
    layer: str | nn.Module | LayerInfo,
    *,
    rows: int,
    n_target: int | None = None,
    max_batch: int = 64,
    exact_max: int = 0,
    generator: torch.Generator | None = None,
    deg_z: int | None = None,
    deg_m: int | None = None,
    grid: int = 2000,
) -> LayerDecompression:
    r"""Predict the spectrum of a layer's Hessian block ``H_WW`` from ``rows`` of its coordinates.

    Picks a random set ``S`` of ``rows`` entries of ``vec(W)`` (row-major matrix view), computes
    ``H_WW e_s`` for ``s`` in ``S`` by exact Hessian-vector products
    (:func:`~curvlens.hessian.block_hvp`, ``max_batch`` directions per backward pass), keeps the
    principal submatrix ``H_WW[S, S]`` (``[rows, rows]``, symmetrized) and decompresses its
    spectrum to ``n_target`` (default ``mn``). Memory: ``max_batch * m * n`` numbers at a time.

    Args:
        model, loss_fn, inputs, targets: as for :func:`~curvlens.hessian.block_hvp`.
        layer: a supported layer (qualified name, module or ``LayerInfo``).
        rows: ``n_s``, the number of coordinates sampled (``4 <= n_s <= mn``).
        n_target: the size to predict (default ``mn``).
        max_batch: directions per batched backward pass.
        exact_max: also form the full block (``mn`` HVPs) and its eigenvalues when
            ``mn <= exact_max`` (default 0: never; for checks on small layers).
        generator: for the random coordinate subset.
        deg_z, deg_m, grid: passed to :func:`free_decompress`.

    Returns:
        A :class:`LayerDecompression` with ``matrix="hessian_block"``.
    """
    info = resolve_layer(model, layer)
    where = f"layer {info.name!r}"
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"{where}: max_batch must be a positive int, got {max_batch!r}")
    m, n = info.matrix_shape
    total = m * n
    n_target = _check_sizes(where, total, rows, n_target)
    idx = _indices(total, rows, generator)
    cols = _hessian_columns(model, loss_fn, inputs, targets, info, idx, max_batch)  # [n_s, mn]
    sub = _eigvalsh(cols[:, idx.to(cols.device)])
    exact = None
    if total <= exact_max:
        full = _hessian_columns(model, loss_fn, inputs, targets, info, torch.arange(total),
                                max_batch)
        exact = _eigvalsh(full)
    spec = free_decompress(sub, n_target, deg_z=deg_z, deg_m=deg_m, grid=grid)
    return LayerDecompression(info.name, "hessian_block", total, n_target, idx, sub, spec, exact)
