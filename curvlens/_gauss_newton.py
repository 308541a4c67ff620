r"""Hessian blocks that equal their Gauss-Newton blocks, measured through the output's Jacobian.

When a network's output is linear in one weight matrix ``W`` (every other weight held fixed) the
output has no second derivative in ``W``, and the loss Hessian block is exactly its Gauss-Newton
block. That holds for every matrix of a network built from linear maps, convolutions, poolings,
ReLU-type activations and normalisation with fixed statistics (a path through the network meets
``W`` once, and the activation pattern is locally constant). With ``N`` samples, ``J_i`` the
Jacobian of sample ``i``'s output ``[D]`` in ``vec(W)`` and ``H_i = S_i S_i^T`` the Hessian of its
loss in that output:

.. math::
    H_{WW} = \frac{1}{N}\sum_i J_i^T H_i J_i = M^T M, \qquad
    M_{(i,c)} = \frac{S_i[:, c]^T J_i}{\sqrt N}
              = \frac{1}{\sqrt N}\sum_t \delta_{i,c,t}\, a_{i,t}^T,

one row per sample and output direction (``R = N D`` rows): the weight gradient that
back-propagating ``S_i[:, c]`` produces, a sum over the matrix's applications ``t`` (output
locations of a convolution, tokens) of the back-propagated row ``delta`` times the input row
``a``. Then, exactly,

* ``h_k = ||M vec(u_k v_k^T)||^2``, with ``(M vec(u v^T))_{(i,c)} = sum_t (u . delta)(v . a)``;
* the nonzero eigenvalues of ``H_WW`` are those of the ``R x R`` Gram matrix ``M M^T``, and the
  eigenvectors are ``M^T q / sqrt(lambda)``. The Gram matrix is formed and its top eigenpairs
  taken exactly (to float64 rounding) where that fits the budget and costs at most
  ``_IMPLICIT_GAIN`` times as much as Lanczos on ``w -> M (M^T w)`` without forming it (to
  ``lanczos_tol``, like the products); else that Lanczos runs.

The rows of every matrix come from one forward pass and ``D`` backward passes per batch (the
backward passes stop at the layers' outputs: no weight gradient is formed), instead of one
backward pass through the network per matrix and product (``top_k`` for ``h_k``, about 30 for
Lanczos).

Whether a block equals its Gauss-Newton block is measured, not assumed: one exact Hessian-vector
product along a random direction must agree with ``M^T M``'s to ``CHECK_TOL`` (relative). A
matrix that fails (a tanh or GELU network, a loss that is not a sum of per-sample terms, samples
that see each other, as through batch statistics), more than ``MAX_OUTPUTS`` outputs per sample,
more than ``MAX_ROWS`` rows or rows over the memory budget is measured by products as before;
the report's notes say which route each matrix took and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlens._batches import FixedData
from curvlens._budget import count_that_fits
from curvlens._dist import is_distributed
from curvlens._grad_graph import GradGraph, layer_hvp
from curvlens._lean_ops import second_order_graph
from curvlens._losses import OutputSelector, loss_hessian_sqrt, select_output
from curvlens.hooks import Capture
from curvlens.layers import LayerInfo
from curvlens.linalg.lanczos import lanczos

__all__ = ["CHECK_TOL", "MAX_OUTPUTS", "MAX_ROWS", "GaussNewtonBlock", "gauss_newton_blocks"]

# Relative difference between an exact Hessian-vector product and the Gauss-Newton one above
# which a block is measured by products. Rounding alone gives 1e-7..3e-6 in float32 and
# 1e-16..1e-14 in float64 (ResNet-18, the tests' networks); a nonlinearity gives 1e-2 and more.
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Most output dimensions per sample the route takes: each costs one backward pass per batch (an
# LM's tokens x vocabulary are far more, and take the products).
MAX_OUTPUTS = 256
# Most rows (samples x outputs) it takes: beyond them the route's eigenvalues cost more than the
# products of a small network (the demo's CNN: 5120 rows, 1.6x slower by the route).
MAX_ROWS = 4096
# The dense Gram matrix (exact eigenpairs) is formed unless it costs more than this many times
# Lanczos on the implicit one (about 4 k + 10 products w -> M (M^T w)).
_IMPLICIT_GAIN = 4
_PRODUCTS = "h_k and block eigenvalues by Hessian-vector products"
_EIGH_ROWS = 128  # above: Lanczos on the dense Gram matrix (3x faster than eigh at 640 rows)


class GaussNewtonBlock:
    """``M`` of one weight matrix (module docstring): input rows and back-propagated rows.

    Args:
        A: ``[N, T, n]`` input-side rows per sample and application.
        D: ``[N, C, T, m]`` back-propagated rows per sample, output direction and application,
            scaled by ``1 / sqrt(N)``.
        sizes: samples per curvature batch (they sum to ``N``), for per-batch ``h_k``.
    """

    def __init__(self, A: Tensor, D: Tensor, sizes: list[int]) -> None:
        self.A, self.D, self.sizes = A.contiguous(), D.contiguous(), sizes

    @property
    def rows(self) -> int:
        return self.D.shape[0] * self.D.shape[1]

    def apply(self, X: Tensor) -> Tensor:
        """``M vec(X)`` for ``X [m, n]``: ``[N, C]``."""
        N, C, T, m = self.D.shape
        XA = self.A @ X.mT.to(self.A.dtype)  # [N, T, m]
        return (self.D.reshape(N, C, T * m) @ XA.reshape(N, T * m, 1)).reshape(N, C)

    def adjoint(self, w: Tensor) -> Tensor:
        """``M^T w`` for ``w [N, C]`` as a matrix ``[m, n]``."""
        N, C, T, m = self.D.shape
        Dw = w.to(self.D.dtype).reshape(N, 1, C) @ self.D.reshape(N, C, T * m)  # [N, 1, T m]
        return Dw.reshape(N * T, m).mT @ self.A.reshape(N * T, -1)

    def curvature_parts(self, U: Tensor, V: Tensor) -> list[tuple[int, Tensor]]:
        """Per curvature batch ``(size, h_k on that batch)`` along ``u_k v_k^T`` for ``U [m, K]``,
        ``V [n, K]``; their size-weighted mean is ``h_k`` on all the samples."""
        Du = torch.einsum("nctm,mk->nctk", self.D, U.to(self.D.dtype))
        Av = self.A @ V.to(self.A.dtype)  # [N, T, K]
        per_sample = torch.einsum("nctk,ntk->nck", Du, Av).square().sum(1)  # [N, K]
        total = sum(self.sizes)
        out, start = [], 0
        for size in self.sizes:
            out.append((size, per_sample[start:start + size].sum(0) * (total / size)))
            start += size
        return out

    def gram(self, budget: int) -> Tensor:
        """``M M^T`` ``[R, R]`` (rows ``(i, c)``, ``c`` fastest), by whichever of two exact sums
        multiplies less: through the per-row gradients (:meth:`_gram_by_rows`) or through the
        inner products of rows per pair of applications (:meth:`_gram_by_pairs`)."""
        by_pairs, by_rows = self._gram_costs()
        return self._gram_by_pairs(budget) if by_pairs < by_rows else self._gram_by_rows(budget)

    def _gram_costs(self) -> tuple[float, float]:
        """Multiply-adds per entry of the Gram matrix of :meth:`_gram_by_pairs` and of
        :meth:`_gram_by_rows`."""
        N, C, T, m = self.D.shape
        n = self.A.shape[-1]
        return T * T * (m + 1 + n / (C * C)), m * n * (1 + T / self.rows)

    def _gram_by_rows(self, budget: int) -> Tensor:
        """``P P^T`` with ``P [R, m * n]`` the rows as weight gradients, formed a block of
        columns at a time (each block within ``budget``)."""
        N, C, T, m = self.D.shape
        n, R = self.A.shape[-1], self.rows
        G = self.D.new_zeros(R, R)
        cols = max(1, min(n, count_that_fits(R * m * self.D.element_size(), budget)))
        for s in range(0, n, cols):
            P = torch.einsum("nctm,ntk->ncmk", self.D, self.A[..., s:s + cols]).reshape(R, -1)
            G.addmm_(P, P.mT)
        return G

    def _gram_by_pairs(self, budget: int) -> Tensor:
        """``sum_{t, s} (delta_{i,t} . delta_{j,s}) (a_{i,t} . a_{j,s})``, a block of rows at
        a time (each block's ``[rows, T, R, T]`` products within ``budget``)."""
        N, C, T, m = self.D.shape
        R = self.rows
        KA = torch.einsum("atk,bsk->atbs", self.A, self.A)  # [N, T, N, T]
        Dr = self.D.reshape(R * T, m)
        chunk = max(1, count_that_fits(2 * R * T * T * self.D.element_size(), budget))
        G = self.D.new_empty(R, R)
        for s in range(0, R, chunk):
            e = min(R, s + chunk)
            KD = (Dr[s * T:e * T] @ Dr.mT).reshape(e - s, T, N, C, T)
            KD.mul_(KA[torch.arange(s, e, device=KD.device) // C].unsqueeze(3))
            G[s:e] = KD.sum((1, 4)).reshape(e - s, R)
        return G

    def dense(self, k: int, budget: int) -> bool:
        """Whether :meth:`top` forms the Gram matrix (module docstring) for ``k`` eigenvalues."""
        N, C, T, m = self.D.shape
        n, R = self.A.shape[-1], self.rows
        if R * R * (self.D.element_size() + 16) > budget:  # with its float64 copies
            return False
        gram = R * R * min(self._gram_costs())
        implicit = (4 * k + 10) * 2 * N * T * m * (n + C)
        return gram <= _IMPLICIT_GAIN * implicit

    def top(self, k: int, vectors: bool, budget: int, generator: torch.Generator,
            tol: float | None = None) -> tuple[Tensor, Tensor | None]:
        """The top ``k`` eigenvalues of ``H_WW = M^T M`` (descending, zeros past its rank) and,
        with ``vectors``, their eigenvectors ``[k, m, n]``; ``tol``: Lanczos's on the implicit
        Gram matrix, when :meth:`dense` says no."""
        R = self.rows
        r = min(k, R)
        N, C = self.D.shape[:2]
        if not self.dense(k, budget):
            def gram_times(w: Tensor) -> Tensor:
                return self.apply(self.adjoint(w.reshape(N, C))).reshape(-1).to(w.dtype)

            # float64 Krylov vectors (R entries: cheap), the products in the rows' dtype
            values, Q = lanczos(gram_times, R, r, tol=tol, generator=generator,
                                dtype=torch.float64, device=self.D.device, return_vectors=True)
        else:
            K = self.gram(budget).to(torch.float64)
            K = (K + K.mT) / 2
            if R <= _EIGH_ROWS:
                values, Q = torch.linalg.eigh(K)
                values, Q = values.flip(0)[:r], Q.flip(1)[:, :r]
            else:
                values, Q = lanczos(lambda v: K @ v, R, r, generator=generator,
                                    dtype=torch.float64, device=K.device, return_vectors=True)
        values = values.to(torch.float64)
        values = torch.cat([values, values.new_zeros(k - r)])
        if not vectors:
            return values, None
        N, C = self.D.shape[:2]
        vecs = torch.stack([self.adjoint(q.reshape(N, C)) for q in Q.mT.to(self.D.dtype)])
        norms = torch.linalg.vector_norm(vecs.flatten(1), dim=1).clamp_min(1e-300)
        vecs = vecs / norms[:, None, None]
        m, n = vecs.shape[1:]
        return values, torch.cat([vecs, vecs.new_zeros(k - r, m, n)])


class _Outputs(Capture):
    """A :class:`~curvlens.hooks.Capture` that keeps each call's output tensor (and the
    adapter's row selector) instead of hooking its gradient, so backward passes can stop there."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo]) -> None:
        super().__init__(model, layers, output_grads=False)
        self.outputs: dict[str, list[tuple[int, Tensor, Callable | None]]] = {
            name: [] for name in self.layers}

    def watch(self, name: str, call: int, y: Any, select: Callable | None = None) -> None:
        if isinstance(y, Tensor) and y.requires_grad:
            self.outputs[name].append((call, y, select))


class _NoRoute(Exception):
    """No matrix can take the Gauss-Newton route on this data (the message says why)."""


def _batch_rows(model: nn.Module, loss_fn: Callable, selector: OutputSelector, args: tuple,
                targets: Any, layers: dict[str, LayerInfo], total: int, budget: int
                ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, str]]:
    """One batch's ``(A [B, T, n], D [B, C, T, m])`` per matrix (``total`` samples in all the
    batches), and why a matrix has none."""
    reasons: dict[str, str] = {}
    # the forward the gradient graphs recorded (their batch norm on running statistics is an
    # affine map, equal to torch's to rounding): a ReLU or max-pool decision that rounding could
    # flip falls the same way for the rows as for the graphs' exact products
    with torch.enable_grad(), second_order_graph(), _Outputs(model, layers) as cap:
        out = model(*args)
        z = select_output(out, selector)
        if z[0].numel() > MAX_OUTPUTS:
            raise _NoRoute(f"{z[0].numel()} outputs per sample, one backward pass each; it takes "
                           f"at most {MAX_OUTPUTS}")
        if total * z[0].numel() > MAX_ROWS:
            raise _NoRoute(f"{total} samples x {z[0].numel()} outputs = "
                           f"{total * z[0].numel()} rows, more than its {MAX_ROWS}")
        S = loss_hessian_sqrt(loss_fn, out, selector, targets).to(z.dtype) / math.sqrt(total)
        B, C = S.shape[:2]
        kept: list[str] = []
        spent = 0
        for name, info in layers.items():
            calls = cap.outputs[name]
            record = cap.records[name]
            if not calls or any(record.samples[c] != B for c, _, _ in calls):
                reasons[name] = "the layer does not see every sample once per forward pass"
                continue
            need = sum(y.numel() * y.element_size() * (C + 1) for _, y, _ in calls)
            need += sum(x.numel() * x.element_size() * math.prod(info.weight.shape[2:])
                        for x in record.inputs)
            if spent + need > budget:
                reasons[name] = "its rows do not fit the memory budget"
                continue
            spent += need
            kept.append(name)
        ys = [y for name in kept for _, y, _ in cap.outputs[name]]
        per_class: list[tuple[Tensor | None, ...]] = []
        for c in range(C):
            g = torch.autograd.grad(z, ys, S[:, :, c].reshape(z.shape), retain_graph=True,
                                    allow_unused=True)
            per_class.append(g)
        rows: dict[str, tuple[Tensor, Tensor]] = {}
        index = 0
        for name in kept:
            info = layers[name]
            spec, module = info.spec, info.module
            A_parts, D_parts = [], []
            for call, y, select in cap.outputs[name]:
                grads = [per_class[c][index] for c in range(C)]
                index += 1
                x = cap.records[name].inputs[call]
                a = spec.input_rows(module, x)
                if any(g is None for g in grads):
                    grads = [torch.zeros_like(y) if g is None else g for g in grads]
                d = torch.stack([spec.grad_rows(module, g if select is None else select(g))
                                 for g in grads], 1)  # [B*T, C, m]
                if a.shape[0] != d.shape[0] or a.shape[0] % B:
                    reasons[name] = (f"its input rows ({a.shape[0]}) and gradient rows "
                                     f"({d.shape[0]}) do not pair up per sample")
                    break
                T = a.shape[0] // B
                A_parts.append(a.reshape(B, T, -1))
                D_parts.append(d.reshape(B, T, C, -1).transpose(1, 2))
            else:
                rows[name] = (torch.cat(A_parts, 1), torch.cat(D_parts, 2))
        del per_class, ys
    return rows, reasons


def gauss_newton_blocks(
    model: nn.Module,
    loss_fn: Callable,
    selector: OutputSelector,
    data: FixedData,
    found: dict[str, LayerInfo],
    graphs: list[tuple[float, int, GradGraph]] | None,
    budget: int,
    seed: int,
    lanczos_k: int = 0,
) -> tuple[dict[str, GaussNewtonBlock], dict[str, str]]:
    """The matrices of ``found`` whose Hessian block on ``data`` is its Gauss-Newton block, with
    their rows, and one note per matrix on the route it takes.

    Args:
        loss_fn: the per-sample loss summed or averaged over a batch (the user's, unwrapped);
            selector: which tensor of the model's output it is a function of.
        data: the curvature batches; graphs: their gradient graphs (the exact products of the
            check; without them no matrix takes this route).
        budget: bytes the rows of all the batches together, and each step of a Gram matrix,
            may take; lanczos_k: the eigenvalues wanted (for the note on how they are found).
    """
    if graphs is None or is_distributed():
        return {}, {}
    layers = {name: info for name, info in found.items()
              if info.spec is not None and info.spec.inputs_are_columns}
    if not layers:
        return {}, {}
    sizes = [size for _, size, _ in graphs]  # one graph per curvature batch, in order
    total = sum(sizes)
    notes: dict[str, str] = {}
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    left = budget  # what the rows of all the batches may take together
    try:
        for args, targets in data:
            active = {name: info for name, info in layers.items() if name not in notes}
            rows, reasons = _batch_rows(model, loss_fn, selector, args, targets, active, total,
                                        left)
            for name, reason in reasons.items():
                notes.setdefault(name, reason)
                left += sum(A.nbytes + D.nbytes for A, D in parts[name])
                parts[name] = []
            for name, (A, D) in rows.items():
                parts[name].append((A, D))
                left -= A.nbytes + D.nbytes
    except Exception as err:  # noqa: BLE001 - e.g. an output the per-sample Hessian cannot take
        why = str(err) if isinstance(err, _NoRoute) else f"{type(err).__name__}: {err}"
        return {}, {name: f"{_PRODUCTS}: no Gauss-Newton route ({why})" for name in layers}
    blocks: dict[str, GaussNewtonBlock] = {}
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, info in layers.items():
        if name in notes or len(parts[name]) != len(sizes):
            notes[name] = f"{_PRODUCTS}: no Gauss-Newton route ({notes.get(name, 'no rows')})"
            continue
        if len({A.shape[1] for A, _ in parts[name]}) > 1:
            notes[name] = (f"{_PRODUCTS}: no Gauss-Newton route (its number of applications "
                           "differs between batches)")
            continue
        block = GaussNewtonBlock(torch.cat([A for A, _ in parts[name]]),
                                 torch.cat([D for _, D in parts[name]]), sizes)
        parts[name] = []
        rel = _check(block, info, graphs, gen)
        tol = CHECK_TOL.get(info.weight.dtype, CHECK_TOL[torch.float32])
        if rel <= tol:
            blocks[name] = block
            how = ("" if not lanczos_k else "; eigenvalues from its Gram matrix"
                   if block.dense(lanczos_k, budget) else
                   "; eigenvalues by Lanczos on its Gram matrix, not formed")
            notes[name] = (f"h_k and block eigenvalues exact from the Gauss-Newton factorization "
                           f"({block.rows} rows{how}; an exact Hessian-vector product agrees to "
                           f"{rel:.1e})")
        else:
            notes[name] = (f"{_PRODUCTS}: the block is not its Gauss-Newton block (an exact "
                           f"product differs from it by {rel:.1e})")
    return blocks, notes


def _check(block: GaussNewtonBlock, info: LayerInfo,
           graphs: list[tuple[float, int, GradGraph]], gen: torch.Generator) -> float:
    """``||H X - M^T M X|| / ||H X||`` along a random ``X`` (exact ``H X`` on the graphs)."""
    w = info.weight
    m, n = info.matrix_shape
    X = torch.randn(m, n, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
    where = f"layer {info.name!r}"
    HX = sum(share * layer_hvp(g.restricted(w, where), info, X[None])[0]
             for share, _, g in graphs)
    GX = block.adjoint(block.apply(X)).to(HX.dtype)
    scale = torch.linalg.vector_norm(HX)
    diff = torch.linalg.vector_norm(HX - GX)
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / scale)
