"""The Gauss-Newton route of analyze_model: exact h_k and block eigenvalues without products.

References, all in float64: the dense Hessian block of the loss in one weight
(``torch.autograd.functional.hessian``), its ``eigvalsh``, ``h_k`` as ``vec(u v^T)^T H vec(u v^T)``
with ``u, v`` from ``torch.linalg.svd`` of the gradient, and the Gram matrix of per-sample,
per-output-direction weight gradients from a loop of single-sample backward passes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvlens._gauss_newton as gn_module
from curvlens._losses import loss_hessian_sqrt
from curvlens.layers import find_layers
from curvlens.measure import analyze_model

ROUTE = "exact from the Gauss-Newton factorization"
NOT_GN = "is not its Gauss-Newton block"


class ReluNet(nn.Module):
    """Convolutions (one of them applied on two branches: one weight, two calls), batch norm,
    max pooling, a residual addition and a linear head: every matrix enters the output linearly."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.shared = nn.Conv1d(4, 3, 2, stride=2)
        self.head = nn.Linear(6, 5)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.c1(x)))
        h = F.max_pool2d(h + self.act(self.c2(h)), 2)  # [B, 4, 3, 3]
        a = self.shared(h.mean(-1)[..., :2])  # [B, 3, 1]
        b = self.shared(h.amax(-2)[..., 1:])  # the same kernel on another branch
        return self.head(self.act(torch.cat([a, b], 1)).flatten(1))


def _setup(act: type[nn.Module] = nn.ReLU, batch: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    model = ReluNet(act).double()
    with torch.no_grad():  # running statistics away from (0, 1): a non-trivial affine map
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(batch, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (batch,))
    return model, x, y


def _reference(model: nn.Module, loss_fn, x, y, name: str, k: int):
    """``(h_k, top eigenvalues)`` of ``name``'s block in eval mode, from the dense Hessian."""
    info = find_layers(model, on_unsupported="skip")[name]
    p_name = next(n for n, p in model.named_parameters() if p is info.weight)
    state = {k_: v.clone() for k_, v in model.state_dict().items()}
    model.eval()
    try:
        w0 = info.weight.detach().clone()

        def loss(w: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, {p_name: w}, (x,)), y)

        H = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
        w = w0.clone().requires_grad_(True)
        G = torch.autograd.grad(loss(w), w)[0].reshape(w0.shape[0], -1)
    finally:
        model.load_state_dict(state)
        model.train()
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = torch.einsum("mk,kn->kmn", U[:, :k], Vh[:k]).reshape(k, -1)
    h = torch.einsum("ki,ij,kj->k", D, H, D)
    return h, torch.linalg.eigvalsh(H).flip(0)[:k]


def _close(a, b, tol: float) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(((a - b).abs() <= tol * b.abs().max()).all())


def _route(rep, name: str) -> str:
    return next((n for n in rep.layers[name].notes if "Gauss-Newton" in n), "")


def test_relu_network_takes_the_route_and_matches_the_dense_hessian():
    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0)
    for name in ("c1", "c2", "shared", "head"):
        assert ROUTE in _route(rep, name), (name, _route(rep, name))
        h, lam = _reference(model, loss_fn, x, y, name, 3)
        assert _close(rep.layers[name].h, h, 1e-10), name
        assert _close(rep.layers[name].lambda_top, lam, 1e-10), name


def test_route_and_products_give_the_same_report():
    model, x, y = _setup()
    kw = dict(top_k=3, lanczos_k=3, bootstrap=0)
    a = analyze_model(model, nn.CrossEntropyLoss(), x, y, **kw)
    b = analyze_model(model, nn.CrossEntropyLoss(), x, y, gauss_newton=False, **kw)
    for name, layer in a.layers.items():
        other = b.layers[name]
        assert not _route(b, name)
        assert _close(layer.h, other.h, 1e-9) and _close(layer.lambda_top, other.lambda_top, 1e-9)
        # the Ritz vectors: the alignment score of the top eigenvectors with the gradient's
        assert layer.alignment_score == pytest.approx(other.alignment_score, rel=1e-6, abs=1e-9)
    assert a.meta["gauss_newton"] is True and b.meta["gauss_newton"] is False


def test_nonlinear_layers_fall_back_to_products_with_the_reason():
    model, x, y = _setup(nn.Tanh)
    loss_fn = nn.CrossEntropyLoss()
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0)
    for name in ("c1", "c2", "shared"):  # behind a tanh: output not linear in them
        assert NOT_GN in _route(rep, name), name
    assert ROUTE in _route(rep, "head")  # the head's output is linear in it even so
    for name in ("c2", "head"):
        h, lam = _reference(model, loss_fn, x, y, name, 3)
        assert _close(rep.layers[name].h, h, 1e-9)
        assert _close(rep.layers[name].lambda_top, lam, 1e-7)


class _Mixing(nn.Module):
    """Linear in every weight, but the samples see each other (a batch mean is subtracted)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.relu(h - h.mean(0, keepdim=True)))


def test_samples_that_see_each_other_and_a_loss_that_is_not_per_sample_fall_back():
    torch.manual_seed(1)
    model = _Mixing().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss()
    rep = analyze_model(model, loss_fn, x, y, top_k=2, lanczos_k=2, bootstrap=0)
    assert NOT_GN in _route(rep, "a") and ROUTE in _route(rep, "b")
    h, lam = _reference(model, loss_fn, x, y, "a", 2)
    assert _close(rep.layers["a"].h, h, 1e-9) and _close(rep.layers["a"].lambda_top, lam, 1e-7)

    def coupled(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # not a mean over samples
        return F.cross_entropy(out, t) + out.mean(0).square().sum()

    model2, x2, y2 = _setup()
    rep = analyze_model(model2, coupled, x2, y2, top_k=2, lanczos_k=2, bootstrap=0)
    assert all(NOT_GN in _route(rep, n) for n in rep.layers)
    h, lam = _reference(model2, coupled, x2, y2, "head", 2)
    assert _close(rep.layers["head"].h, h, 1e-9)


def _rows_reference(model: nn.Module, x, y, name: str) -> torch.Tensor:
    """``M [N * C, m * n]``: per sample ``i`` and column ``c`` of ``S_i``, the weight gradient of
    back-propagating ``S_i[:, c] / sqrt(N)`` through sample ``i`` alone (eval mode)."""
    info = find_layers(model, on_unsupported="skip")[name]
    model.eval()
    try:
        out = model(x)
        S = loss_hessian_sqrt(nn.CrossEntropyLoss(), out, None, y)
        rows = []
        for i in range(x.shape[0]):
            for c in range(S.shape[1]):
                zi = model(x[i:i + 1])
                g = torch.autograd.grad(zi, info.weight, S[i, :, c][None] / math.sqrt(len(x)))[0]
                rows.append(g.reshape(-1))
    finally:
        model.train()
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["c1", "c2", "shared", "head"])
def test_gram_by_rows_and_by_pairs_equal_the_per_sample_loop(name):
    # Each sample's rows are fixed only up to a rotation (the square root of its loss Hessian
    # comes from an eigendecomposition whose vectors a rounding-level change of the logits may
    # turn where eigenvalues nearly coincide), so the reference is compared on what a rotation
    # leaves alone: the Gram matrix's eigenvalues, M^T M X and each sample's ||M_i X||^2.
    model, x, y = _setup(batch=4)
    M = _rows_reference(model, x, y, name)
    info = find_layers(model, on_unsupported="skip")[name]
    blocks, _ = _blocks(model, x, y)
    block = blocks[name]
    assert block.rows == M.shape[0]
    ref = M @ M.T
    for budget in (10**9, 2000):  # one step, and many small chunks
        by_rows, by_pairs = block._gram_by_rows(budget), block._gram_by_pairs(budget)
        scale = ref.abs().max()
        assert torch.allclose(by_rows, by_pairs, rtol=0, atol=1e-13 * scale)
        assert torch.allclose(by_rows, ref, rtol=0, atol=1e-7 * scale)
        assert torch.allclose(torch.linalg.eigvalsh(by_rows), torch.linalg.eigvalsh(ref),
                              rtol=0, atol=1e-12 * scale)
    X = torch.randn(info.matrix_shape, dtype=torch.float64)
    MX = M @ X.reshape(-1)
    assert torch.allclose(block.adjoint(block.apply(X)).reshape(-1), M.T @ MX, atol=1e-13)
    assert torch.allclose(block.apply(X).square().sum(1), MX.reshape(len(x), -1).square().sum(1),
                          rtol=1e-12, atol=1e-15)


def _blocks(model, x, y, **kw):
    from curvlens._batches import fixed_data
    from curvlens._grad_graph import GradGraph
    from curvlens._modes import measurement_mode

    found = find_layers(model, on_unsupported="skip")
    with measurement_mode(model):
        weights = [i.weight for i in found.values()]
        graphs = [(1.0, len(x), GradGraph(model, nn.CrossEntropyLoss(), (x,), y, weights,
                                          "model"))]
        return gn_module.gauss_newton_blocks(model, nn.CrossEntropyLoss(), None,
                                             fixed_data(x, y), found, graphs,
                                             kw.get("budget", 10**9), 0)


def test_many_rows_use_lanczos_on_the_gram_matrix(monkeypatch):
    monkeypatch.setattr(gn_module, "_EIGH_ROWS", 20)  # 7 samples x 5 outputs = 35 rows
    model, x, y = _setup()
    rep = analyze_model(model, nn.CrossEntropyLoss(), x, y, top_k=3, lanczos_k=3, bootstrap=0)
    _, lam = _reference(model, nn.CrossEntropyLoss(), x, y, "c2", 3)
    assert ROUTE in _route(rep, "c2")
    assert _close(rep.layers["c2"].lambda_top, lam, 1e-10)


def test_too_many_outputs_or_a_small_budget_fall_back_with_the_reason(monkeypatch):
    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    monkeypatch.setattr(gn_module, "MAX_OUTPUTS", 4)
    rep = analyze_model(model, loss_fn, x, y, top_k=2, lanczos_k=2, bootstrap=0)
    assert all("5 outputs per sample, one backward pass each; it takes at most 4" in _route(rep, n)
               for n in rep.layers)
    monkeypatch.undo()
    monkeypatch.setattr(gn_module, "MAX_ROWS", 20)
    rep = analyze_model(model, loss_fn, x, y, top_k=2, lanczos_k=2, bootstrap=0)
    assert all("7 samples x 5 outputs = 35 rows, more than its 20" in _route(rep, n)
               for n in rep.layers)
    monkeypatch.undo()
    blocks, notes = _blocks(model, x, y, budget=40000)  # c1, c2: 7 * 4 * 36 * 6 * 8 bytes
    assert set(blocks) == {"shared", "head"}
    assert all("do not fit the memory budget" in notes[n] for n in ("c1", "c2"))
    h, _ = _reference(model, loss_fn, x, y, "c1", 2)
    rep = analyze_model(model, loss_fn, x, y, top_k=2, lanczos_k=2, bootstrap=0,
                        memory_budget=40000)
    assert _close(rep.layers["c1"].h, h, 1e-9)


@pytest.mark.parametrize("why", ["budget", "cost"])
def test_gram_matrix_not_formed_lanczos_on_it_gives_the_same_eigenpairs(monkeypatch, why):
    # the 35 x 35 Gram matrix takes 35^2 * (8 + 16) = 29400 bytes with its float64 copies
    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    blocks, _ = _blocks(model, x, y)
    dense = {n: b.top(3, True, 10**9, torch.Generator().manual_seed(0))
             for n, b in blocks.items()}
    if why == "cost":
        monkeypatch.setattr(gn_module, "_IMPLICIT_GAIN", 0)
    budget = 29399 if why == "budget" else 10**9
    for name, block in blocks.items():
        assert not block.dense(3, budget) and block.dense(3, 29400) == (why == "budget")
        values, vecs = block.top(3, True, budget, torch.Generator().manual_seed(0))
        assert _close(values, dense[name][0], 1e-10), name
        overlap = torch.einsum("kmn,kmn->k", vecs, dense[name][1]).abs()
        assert torch.allclose(overlap, torch.ones(3, dtype=torch.float64), atol=1e-8), name
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0,
                        memory_budget=max(budget, 40000) if why == "cost" else None)
    _, lam = _reference(model, loss_fn, x, y, "head", 3)
    assert "eigenvalues by Lanczos on its Gram matrix, not formed" in _route(rep, "head") or (
        why == "budget")
    assert _close(rep.layers["head"].lambda_top, lam, 1e-10)


def test_grouped_convolution_falls_back():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3)).double()
    x, y = torch.randn(5, 4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    rep = analyze_model(model, nn.CrossEntropyLoss(), x, y, top_k=2, lanczos_k=2, bootstrap=0)
    assert "do not pair up per sample" in _route(rep, "0")
    assert ROUTE in _route(rep, "3")
    h, lam = _reference(model, nn.CrossEntropyLoss(), x, y, "0", 2)
    assert _close(rep.layers["0"].h, h, 1e-9) and _close(rep.layers["0"].lambda_top, lam, 1e-7)


def test_batches_equal_their_concatenation_and_give_the_curvature_noise():
    model, x, y = _setup(batch=9)
    kw = dict(top_k=3, lanczos_k=3, bootstrap=0, noise_floor=False)
    parts = [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])]
    one = analyze_model(model, nn.CrossEntropyLoss(), x, y, **kw)
    many = analyze_model(model, nn.CrossEntropyLoss(), parts, None, **kw)
    products = analyze_model(model, nn.CrossEntropyLoss(), parts, None, gauss_newton=False, **kw)
    for name, layer in one.layers.items():
        assert ROUTE in _route(many, name)
        assert _close(many.layers[name].h, layer.h, 1e-10)
        assert _close(many.layers[name].lambda_top, layer.lambda_top, 1e-10)
        # the per-batch h_k behind the curvature noise agree with the products' ones
        assert many.layers[name].curvature_noise == pytest.approx(
            products.layers[name].curvature_noise, rel=1e-8)


def test_float32_route_matches_the_float64_reference():
    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    rep = analyze_model(model.float(), loss_fn, x.float(), y, top_k=3, lanczos_k=3, bootstrap=0)
    model.double()
    for name in ("c1", "head"):
        assert ROUTE in _route(rep, name)
        h, lam = _reference(model, loss_fn, x, y, name, 3)
        assert _close(rep.layers[name].h, h, 1e-5)
        assert _close(rep.layers[name].lambda_top, lam, 1e-5)


def test_a_summed_loss_is_measured_as_its_mean():
    model, x, y = _setup()
    kw = dict(top_k=3, lanczos_k=3, bootstrap=0)
    mean = analyze_model(model, nn.CrossEntropyLoss(), x, y, **kw)
    summed = analyze_model(model, nn.CrossEntropyLoss(reduction="sum"), x, y, **kw)
    for name, layer in mean.layers.items():
        assert ROUTE in _route(summed, name)
        assert _close(summed.layers[name].h, layer.h, 1e-12)
        assert _close(summed.layers[name].lambda_top, layer.lambda_top, 1e-12)
