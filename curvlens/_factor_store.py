r"""Storage of Kronecker factors: running sums of outer products, in the smallest exact form.

A factor side of dimension ``d`` is ``C = (1/N) sum_i r_i r_i^T`` over captured rows ``r_i``. A
dense ``[d, d]`` sum is what most layers need, but two kinds of side do not fit it:

* **diagonal sides** (an Embedding's one-hot rows, or any side whose rows each have at most one
  nonzero entry): every outer product is diagonal, so the side is kept as a vector ``[d]``,
  exactly. A 50257-token vocabulary costs 50257 numbers instead of a 10 GB matrix. The side turns
  dense (or sketched) if a row with two nonzeros ever arrives.
* **large sides** (``d`` above ``sketch_above``, or a dense sum that would pass the memory
  budget): a single-pass Nystrom sketch ``Y = C Omega`` with a fixed Gaussian test matrix
  ``Omega [d, l]`` (linear in the rows, so it streams and all-reduces exactly) plus the exact
  diagonal of ``C``. On reading, ``C`` is approximated by ``Q diag(lambda) Q^T + diag(r)``: the
  Nystrom approximation ``Y (Omega^T Y)^+ Y^T`` as eigenpairs, and the residual diagonal
  ``r = diag(C) - diag(Q diag(lambda) Q^T) >= 0``. The low-rank part never exceeds ``C`` and its
  expected trace-norm error is within a factor ``1 + r/(l - r - 1)`` of the best rank-``r``
  error (J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-Rank Approximation of a
  Positive-Semidefinite Matrix from Streaming Data", NeurIPS 2017, arXiv:1706.05736). In
  tests on power-law spectra, the top 10 eigenvalues (Rayleigh-Ritz values of the sketch on its
  own subspace) are within 5% of the dense factor's whenever the eigenvalues past rank ``l`` sum
  to less than half the largest one; quadratic forms along the top directions likewise. The
  report names the approximation (``KroneckerFactors.approximations``).

The forms and their readers are in :mod:`curvlens._factor_forms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlens._arrays import all_finite
from curvlens._budget import check_fits, resolve_budget
from curvlens._dist import all_reduce_sum, is_distributed, sum_count
from curvlens._factor_forms import DiagonalFactor, Factor, SketchedFactor, nystrom
from curvlens.hooks import LayerRecord
from curvlens.layers import LayerInfo

__all__ = [
    "KroneckerFactors",
    "FactorAccumulator",
    "FactorSide",
]

#: dense sides from this size on are summed in 4 x 4 blocks (8 x 8 from 2048: about 30% less
#: time on 64 x 4608 and 256 x 2304 rows, one CPU thread), upper triangle only
_BLOCKED_FROM = 512
_FINER_FROM = 2048
#: a side larger than this is sketched (unless it is diagonal)
SKETCH_ABOVE = 8192
#: columns of the sketch's test matrix
SKETCH_RANK = 128
#: diagonal sides up to this size are handed out as dense matrices (cheap, and what most code
#: expects); larger ones as :class:`DiagonalFactor`
DENSE_DIAGONAL_UP_TO = 1024


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer's Kronecker factors (see :mod:`curvlens.kronecker` for the scaling).

    Attributes:
        C_A: [n, n] column-side factor (inputs / patches; Embedding: output gradients).
        C_delta: [m, m] row-side factor (output gradients; Embedding: one-hot frequencies).
        num_samples: number of samples ``B`` (times the Monte-Carlo draws in ``"fisher"``).

    A side too large to hold densely is a :class:`DiagonalFactor` (exact; e.g. an Embedding's
    one-hot side) or a :class:`SketchedFactor` (approximate; see :attr:`approximations`).
    """

    C_A: Factor
    C_delta: Factor
    num_samples: int

    @property
    def approximations(self) -> list[str]:
        """What is approximated, one sentence per sketched side (empty when exact)."""
        return [f"{side}: {C.approximation}" for side, C in (("C_A", self.C_A),
                ("C_delta", self.C_delta)) if isinstance(C, SketchedFactor)]


class FactorSide:
    """Running sum of ``r r^T`` over rows ``r [d]`` in the smallest exact form.

    Starts diagonal; turns dense at the first row with two nonzero entries, or into a sketch
    when ``d > sketch_above`` or the dense sum would pass ``budget`` bytes.

    Args:
        dim: ``d``.
        dtype, device: of the sums.
        budget: bytes one dense ``[d, d]`` sum may take.
        layer: named in errors.
        sketch_above: sides larger than this are sketched.
        sketch_rank: columns ``l`` of the sketch.
        seed: of the sketch's test matrix (equal on every process).
    """

    def __init__(self, dim: int, *, dtype: torch.dtype, device: torch.device, budget: int,
                 layer: str, sketch_above: int = SKETCH_ABOVE, sketch_rank: int = SKETCH_RANK,
                 seed: int = 0) -> None:
        self.dim, self.dtype, self.device, self.layer = dim, dtype, device, layer
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.dense_ok = dim <= sketch_above and dim * dim * itemsize <= budget
        self.rank = min(sketch_rank, dim)
        self.sketch_bytes = 2 * dim * self.rank * itemsize
        self.budget = budget
        self.seed = seed
        self.state = "diag"
        self.diag = torch.zeros(dim, dtype=dtype, device=device)  # [d] (diag and sketch states)
        self.dense: Tensor | None = None  # [d, d]
        self.order: Tensor | None = None  # [d]: dense[i, j] sums entry (order[i], order[j])
        self.Y: Tensor | None = None  # [d, l], the sketch C Omega
        self._omega: Tensor | None = None

    def omega(self) -> Tensor:
        """``Omega [d, l]``: the sketch's fixed Gaussian test matrix."""
        if self._omega is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            self._omega = torch.randn(self.dim, self.rank, generator=gen,
                                      dtype=self.dtype).to(self.device)
        return self._omega

    def add(self, rows: Tensor) -> None:
        """Add ``rows^T rows`` for ``rows [N, d]``."""
        rows = rows.to(self.dtype)
        if self.state == "diag":
            if bool(((rows != 0).sum(1) <= 1).all()):
                self.diag += rows.square().sum(0)
                return
            self._widen("dense" if self.dense_ok else "sketch")
        if self.state == "dense":
            self._add_dense(rows if self.order is None else rows[:, self.order])
        else:
            self.diag += rows.square().sum(0)
            self.Y.addmm_(rows.mT, rows @ self.omega())

    def dense_sum(self, order: Tensor) -> Tensor | None:
        """The dense ``[d, d]`` sum with rows and columns in ``order``, for adding a symmetric
        contribution in place: only the upper triangle (``i <= j``) is read, the lower one is
        mirrored from it. A diagonal side that fits turns dense; ``None`` for a sketched side."""
        if self.state == "diag" and self.dense_ok:
            self.dense, self.order = torch.diag(self.diag[order]), order  # diag(d) reordered
            self.state = "dense"
        if self.state != "dense":
            return None
        if not _same_order(order, self.order):
            self._reorder(order)
        return self.dense

    def _reorder(self, order: Tensor | None) -> None:
        """Store the dense sum with rows and columns in ``order`` (``None``: natural)."""
        full = self._full_dense()
        self.dense = full if order is None else full[order][:, order]
        self.order = order

    def _blocks(self) -> list[tuple[slice, slice]]:
        """The upper-triangular blocks ``(rows, cols)`` a blocked dense sum updates."""
        if self.dim < _BLOCKED_FROM:
            return [(slice(None), slice(None))]
        count = 8 if self.dim >= _FINER_FROM else 4
        edges = [self.dim * i // count for i in range(count + 1)]
        parts = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        return [(parts[i], parts[j]) for i in range(count) for j in range(i, count)]

    def _add_dense(self, rows: Tensor) -> None:
        """``dense += rows^T rows`` in place; above :data:`_BLOCKED_FROM` only its upper block
        triangle (5/8 of the products for 4 blocks, 9/16 for 8), mirrored when read."""
        for r, c in self._blocks():
            self.dense[r, c].addmm_(rows[:, r].mT, rows[:, c])

    def _full_dense(self, count: int = 1) -> Tensor:
        """The symmetric dense sum in the natural order, divided by ``count``: the lower blocks
        mirrored from the upper ones (in another order, the lower triangle from the upper one,
        mirrored in place: it is scratch there)."""
        if self.order is None and self.dim < _BLOCKED_FROM:
            return self.dense if count == 1 else self.dense / count
        if self.order is None:
            full = self.dense / count
            for r, c in self._blocks():
                if r != c:
                    full[c, r] = full[r, c].mT
            return full
        _mirror_upper(self.dense)
        inverse = torch.argsort(self.order)
        full = torch.empty_like(self.dense)
        for start in range(0, self.dim, _TILE):  # a band of rows at a time, both gathers
            rows = self.dense.index_select(0, inverse[start:start + _TILE])
            torch.index_select(rows.div_(count), 1, inverse, out=full[start:start + _TILE])
        return full

    def _widen(self, state: str) -> None:
        if state == "dense" and self.state == "diag":
            self.dense = torch.diag(self.diag)
        elif state == "sketch" and self.state == "diag":
            check_fits(self.sketch_bytes, self.budget, layer=self.layer,
                       what=f"a rank-{self.rank} sketch of a {self.dim}-dimensional factor side")
            self.Y = self.diag[:, None] * self.omega()
        self.state = state

    def all_reduce(self) -> None:
        """Sum over all processes (every process must call it); the widest form wins."""
        if not is_distributed():
            return
        if self.order is not None:  # every process sums in the natural order
            self._reorder(None)
        order = ("diag", "dense", "sketch")
        flags = torch.zeros(3, dtype=torch.float64, device=self.device)
        flags[order.index(self.state)] = 1.0
        all_reduce_sum(flags)
        self._widen(order[int(torch.nonzero(flags).max())])
        if self.state == "dense":
            all_reduce_sum(self.dense)
        else:
            all_reduce_sum(self.diag)
            if self.state == "sketch":
                all_reduce_sum(self.Y)

    def copy(self) -> FactorSide:
        twin = object.__new__(FactorSide)
        twin.__dict__.update(self.__dict__)
        twin.diag = self.diag.clone()
        twin.dense = None if self.dense is None else self.dense.clone()
        twin.Y = None if self.Y is None else self.Y.clone()
        return twin

    def finish(self, count: int) -> Factor:
        """The averaged factor ``(1/count) sum r r^T`` in its stored form."""
        if self.state == "dense":
            return self._full_dense(count)
        if self.state == "diag":
            d = self.diag / count
            return torch.diag(d) if self.dim <= DENSE_DIAGONAL_UP_TO else DiagonalFactor(d)
        return nystrom(self.Y / count, self.omega(), self.diag / count, self.dtype)


#: rows and columns per tile when a square matrix is mirrored or reordered
_TILE = 256


def _mirror_upper(M: Tensor) -> None:
    """``M``'s strict lower triangle := its strict upper one transposed, in place, a tile at a
    time (cache-sized tiles: a whole-matrix ``triu() + triu(1).mT`` made three more copies)."""
    n = M.shape[0]
    for i in range(0, n, _TILE):
        diag = M[i:i + _TILE, i:i + _TILE]
        lower = torch.ones_like(diag, dtype=torch.bool).tril_(-1)
        diag.copy_(torch.where(lower, diag.mT, diag))
        for j in range(i + _TILE, n, _TILE):
            M[j:j + _TILE, i:i + _TILE] = M[i:i + _TILE, j:j + _TILE].mT


def _same_order(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))


class FactorAccumulator:
    """Running sums that turn captured (input, output-grad) pairs into Kronecker factors.

    The lens feeds it every N training steps; :func:`curvlens.kronecker.kronecker_factors` feeds
    it once. Each side is a :class:`FactorSide` (diagonal, dense or sketched).

    Args:
        layers: ``{name: LayerInfo}`` to accumulate for.
        memory_budget: bytes one dense factor side may take (see :mod:`curvlens._budget`).
        sketch_above: factor sides larger than this are sketched (unless diagonal).
        sketch_rank: columns of the sketches.
    """

    def __init__(self, layers: Mapping[str, LayerInfo], *,
                 memory_budget: int | float | str | None = None,
                 sketch_above: int = SKETCH_ABOVE, sketch_rank: int = SKETCH_RANK) -> None:
        # matrices without a capture adapter (spec None) have no factors to accumulate
        self.layers = {name: info for name, info in layers.items() if info.spec is not None}
        self.options = dict(memory_budget=memory_budget, sketch_above=sketch_above,
                            sketch_rank=sketch_rank)
        self._budget: int | None = None
        self._in: dict[str, FactorSide] = {}
        self._grad: dict[str, FactorSide] = {}
        self._rows_in: dict[str, int] = dict.fromkeys(self.layers, 0)
        self.num_samples: dict[str, int] = dict.fromkeys(self.layers, 0)

    def _sides(self, name: str) -> tuple[int, int]:
        info = self.layers[name]
        m, n = info.matrix_shape
        return (n, m) if info.spec.inputs_are_columns else (m, n)

    def _side(self, store: dict[str, FactorSide], name: str, dim: int, like: Tensor,
              seed: int) -> FactorSide:
        if name not in store:
            if self._budget is None:
                self._budget = resolve_budget(self.options["memory_budget"], like.device)
            dtype = like.dtype if like.is_floating_point() else self.layers[name].weight.dtype
            store[name] = FactorSide(dim, dtype=dtype, device=like.device, budget=self._budget,
                                     layer=name, sketch_above=self.options["sketch_above"],
                                     sketch_rank=self.options["sketch_rank"], seed=seed)
        return store[name]

    def add_inputs(self, name: str, x: Tensor) -> None:
        """Add one forward call's input to the input-side sum."""
        info = self.layers[name]
        moments = (info.spec.input_moments(info.module, x)
                   if info.spec.input_moments is not None else None)
        if moments is not None:  # the exact sum without forming the rows (conv patches)
            dim = self._sides(name)[0]
            like = x if x.is_floating_point() else info.weight
            dense = self._side(self._in, name, dim, like, seed=0).dense_sum(moments.order)
            if dense is not None:
                self._rows_in[name] += moments.add(dense)
                return
        rows = info.spec.input_rows(info.module, x)  # [N, dim]
        self._side(self._in, name, rows.shape[1], rows, seed=0).add(rows)
        self._rows_in[name] += rows.shape[0]

    def add_grads(self, name: str, grad: Tensor, *, scale: float, samples: int,
                  check_finite: bool = True) -> None:
        """Add one backward's output gradient (multiplied by ``scale``) to the gradient side.

        Args:
            name: layer name.
            grad: ``dL/dy`` as captured, the layer output's shape.
            scale: per-sample scale (see :func:`curvlens.kronecker.batch_scale`).
            samples: how many samples this backward counts for (``B``; 0 for the extra
                backward passes of the ``"ggn"`` mode, which add to the same samples).
            check_finite: refuse NaN/Inf in ``grad`` (off where the caller checked already).
        """
        info = self.layers[name]
        if check_finite and not all_finite(grad):
            raise RuntimeError(
                f"layer {name!r}: NaN or Inf in the output gradient; check the loss and the "
                "learning rate before measuring curvature"
            )
        rows = info.spec.grad_rows(info.module, grad) * scale  # [N, dim]
        self._side(self._grad, name, rows.shape[1], rows, seed=1).add(rows)
        self.num_samples[name] += samples

    def add_record(self, name: str, record: LayerRecord, *, scale: float, samples: int) -> None:
        """Add everything a :class:`~curvlens.hooks.LayerRecord` holds (one backward per call)."""
        for x in record.inputs:
            self.add_inputs(name, x)
        for g in record.output_grads:
            self.add_grads(name, g, scale=scale, samples=samples)

    def drop(self, name: str) -> None:
        """Forget a layer (its sums and counts); its factors are no longer reported."""
        for store in (self.layers, self._in, self._grad, self._rows_in, self.num_samples):
            store.pop(name, None)

    def all_reduce(self) -> None:
        """Sum the running sums and counts over all ``torch.distributed`` processes.

        Afterwards every process holds what one process would have accumulated on the union of
        the batches. A no-op without an initialized process group; every process must call it.
        """
        if not is_distributed():
            return
        for name, info in self.layers.items():
            ref = info.weight
            for store, dim, seed in zip((self._in, self._grad), self._sides(name), (0, 1)):
                # a process that saw nothing still joins the collective
                self._side(store, name, dim, ref, seed).all_reduce()
            self._rows_in[name] = sum_count(self._rows_in[name], ref.device)
            self.num_samples[name] = sum_count(self.num_samples[name], ref.device)

    def copy(self) -> FactorAccumulator:
        """An independent copy of the running sums (e.g. to all-reduce without touching them)."""
        twin = FactorAccumulator(self.layers, **self.options)
        twin._budget = self._budget
        twin._in = {k: v.copy() for k, v in self._in.items()}
        twin._grad = {k: v.copy() for k, v in self._grad.items()}
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
            empty = self._rows_in[name] == 0 or self.num_samples[name] == 0
            if empty and skip_empty:
                continue
            if empty:
                raise ValueError(
                    f"layer {name!r} saw no samples: empty batch, or the layer is not used in "
                    "the forward pass; check the inputs or leave the layer out"
                )
            C_in = self._in[name].finish(self._rows_in[name])
            C_grad = self._grad[name].finish(self.num_samples[name])
            if info.spec.inputs_are_columns:
                out[name] = KroneckerFactors(C_in, C_grad, self.num_samples[name])
            else:
                out[name] = KroneckerFactors(C_grad, C_in, self.num_samples[name])
        return out
