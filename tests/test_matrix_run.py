"""analyze on one batch: every matrix measured on one shared gradient graph, against dense
Hessian blocks; the per-matrix path when the graph does not fit the memory budget."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, hessian

from curvlens._budget import activation_bytes
from curvlens.measure import analyze_model
from tests.test_many_batches import _case

DT = torch.float64


def _dense(model, loss_fn, x, y, name):
    """The gradient and the dense Hessian block of ``name.weight`` in its matrix view."""
    key = f"{name}.weight"
    params = dict(model.named_parameters())
    W = params[key].detach().flatten(1)

    def loss(w):
        return loss_fn(functional_call(model, {**params, key: w.reshape(params[key].shape)},
                                       (x,)), y)

    G = torch.func.grad(loss)(W)
    return G.detach(), hessian(loss)(W).detach().reshape(W.numel(), W.numel())


@pytest.mark.parametrize("small_budget", [False, True])
def test_h_and_lambda_equal_the_dense_hessian_blocks(small_budget):
    model, loss_fn, x, y = _case()
    budget = None
    if small_budget:  # below the shared graph's estimate: each matrix builds its own graphs
        budget = 3 * activation_bytes(model, (x,)) + 100
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0,
                        memory_budget=budget)
    for name in ("0", "3", "5"):
        G, H = _dense(model, loss_fn, x, y, name)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        D = torch.einsum("mk,kn->kmn", U[:, :3], Vh[:3]).reshape(3, -1)
        h_ref = torch.einsum("ki,ij,kj->k", D, H, D)
        lam_ref = torch.linalg.eigvalsh(H).flip(0)[:3]
        layer = rep.layers[name]
        got = {f: torch.tensor(getattr(layer, f), dtype=DT) for f in ("sigma", "h", "lambda_top")}
        torch.testing.assert_close(got["sigma"], S[:3], rtol=1e-10, atol=0)
        torch.testing.assert_close(got["h"], h_ref, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(got["lambda_top"], lam_ref, rtol=1e-7, atol=0)


def test_a_looser_lanczos_tolerance_stays_within_its_bound():
    model, loss_fn, x, y = _case()
    rep = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0,
                        lanczos_tol=0.05)
    _, H = _dense(model, loss_fn, x, y, "3")
    top = torch.linalg.eigvalsh(H).flip(0)[:3]
    got = torch.tensor(rep.layers["3"].lambda_top, dtype=DT)
    assert float(((got - top).abs() / top.abs()).max()) <= 0.05  # each value of its place
    with pytest.raises(ValueError, match="lanczos_tol must be None or a number"):
        analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=3, bootstrap=0, lanczos_tol=0.0)


def test_restricted_graph_and_chunked_curvatures_equal_the_dense_block():
    """One graph over every weight, restricted to one: its products are that weight's dense
    Hessian block, and ``h_k`` in chunks of 2 equals ``<D_k, H D_k>``; a weight the graph does
    not hold is refused by name."""
    from curvlens._grad_graph import GradGraph, hvp_curvature
    from curvlens.layers import find_layers

    model, loss_fn, x, y = _case()
    layers = find_layers(model, ["0", "3"])
    graph = GradGraph(model, loss_fn, (x,), y, [i.weight for i in layers.values()], "model")
    info = layers["3"]
    _, H = _dense(model, loss_fn, x, y, "3")
    block = graph.restricted(info.weight, "layer '3'")
    v = torch.randn(info.weight.shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block.hvp([v])[0].flatten(), H @ v.flatten(), rtol=1e-10,
                               atol=1e-12)
    g = torch.Generator().manual_seed(1)
    (m, n), k = info.matrix_shape, 5
    U, V = torch.randn(m, k, dtype=DT, generator=g), torch.randn(n, k, dtype=DT, generator=g)
    seen = []
    h = hvp_curvature(block, info, U, V, 2, seen.append)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(k, -1)
    torch.testing.assert_close(h, torch.einsum("ki,ij,kj->k", D, H, D), rtol=1e-10, atol=1e-12)
    assert seen == [2, 2, 1]
    with pytest.raises(ValueError, match="layer 'x'.*not one of this graph's parameters"):
        graph.restricted(torch.zeros(2, 2), "layer 'x'")
