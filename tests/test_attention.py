"""nn.MultiheadAttention: q, k, v and out matrices, exact curvature, captured Kronecker factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlens.hessian import block_hvp, directional_curvature
from curvlens.hessian_spectrum import block_eigenvalues
from curvlens.hooks import Capture
from curvlens.kronecker import kronecker_factors
from curvlens.layers import LayerKind, find_layers

DT = torch.float64


class AttnNet(nn.Module):
    """Self- or cross-attention followed by a tanh readout (float64)."""

    def __init__(self, E: int = 6, heads: int = 2, kdim: int | None = None,
                 batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, heads, kdim=kdim, vdim=kdim, batch_first=batch_first)
        self.kdim = kdim
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        out = self.attn(x, kv, kv, need_weights=False)[0]
        return torch.tanh(out)


def _case(kdim=None, batch_first=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AttnNet(kdim=kdim, batch_first=batch_first).to(DT)
    B, T, E = 3, 4, 6
    shape = (B, T) if batch_first else (T, B)
    x = torch.randn(*shape, E, generator=g, dtype=DT)
    args = (x,) if kdim is None else (x, torch.randn(*shape, kdim, generator=g, dtype=DT))
    y = torch.randn(*shape, E, generator=g, dtype=DT)
    return net, nn.MSELoss(), args, y


def test_matrices_are_named_q_k_v_and_out():
    net, *_ = _case()
    found = find_layers(net)
    assert list(found) == ["attn.in_proj_weight.q", "attn.in_proj_weight.k",
                           "attn.in_proj_weight.v", "attn.out_proj"]
    # out_proj is an nn.Linear, here the last one of the model: its head
    assert [i.kind for i in found.values()] == [LayerKind.ATTENTION] * 3 + [LayerKind.HEAD]
    q = found["attn.in_proj_weight.q"]
    assert q.matrix_shape == (6, 6) and q.rows == (0, 6)
    assert q.matrix().data_ptr() == net.attn.in_proj_weight.data_ptr()
    sep, *_ = _case(kdim=5)
    assert list(find_layers(sep)) == ["attn.q_proj_weight", "attn.k_proj_weight",
                                      "attn.v_proj_weight", "attn.out_proj"]
    assert find_layers(sep)["attn.k_proj_weight"].matrix_shape == (6, 5)
    # a module name selects all its matrices; a parameter name its row blocks
    assert len(find_layers(net, ["attn"])) == 4
    assert len(find_layers(net, ["attn.in_proj_weight"])) == 3


def _dense_block(net, loss_fn, args, y, info):
    """The dense Hessian block of ``info``'s matrix view by torch.func.hessian."""
    pname = info.aliases[0]
    params = dict(net.named_parameters())

    def loss_of(p):
        return loss_fn(functional_call(net, {**params, pname: p}, args), y)

    P = params[pname].detach()
    H = hessian(loss_of)(P).reshape(P.numel(), P.numel())
    M, n = info.full_shape
    r0, r1 = info.rows or (0, M)
    return H[r0 * n:r1 * n, r0 * n:r1 * n]


@pytest.mark.parametrize("kdim,batch_first", [
    (None, True),
    pytest.param(None, False, marks=pytest.mark.slow),
    pytest.param(5, True, marks=pytest.mark.slow),
], ids=["packed-batch_first", "packed-seq_first", "kdim"])
def test_curvature_and_block_eigenvalues_equal_dense_hessian(kdim, batch_first):
    net, loss_fn, args, y = _case(kdim, batch_first)
    with sdpa_kernel(SDPBackend.MATH):  # the backend with a double backward
        _check_exact(net, loss_fn, args, y)


def _check_exact(net, loss_fn, args, y):
    for name, info in find_layers(net).items():
        H = _dense_block(net, loss_fn, args, y, info)
        m, n = info.matrix_shape
        g = torch.Generator().manual_seed(1)
        U = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=DT))[0]
        V = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=DT))[0]
        D = torch.einsum("mk,nk->kmn", U, V).reshape(3, -1)
        ref = torch.einsum("ki,ij,kj->k", D, H, D)
        for method in ("forward", "hvp"):
            h = directional_curvature(net, loss_fn, args, y, info, U, V, method=method)
            torch.testing.assert_close(h, ref, rtol=0, atol=1e-6, msg=f"{name} {method}")
        HV = block_hvp(net, loss_fn, args, y, name, D.reshape(3, m, n))
        torch.testing.assert_close(HV.reshape(3, -1), D @ H, rtol=0, atol=1e-6)
        lam = block_eigenvalues(net, loss_fn, args, y, info, 3,
                                generator=torch.Generator().manual_seed(0))
        ref_lam = torch.linalg.eigvalsh(H).flip(0)[:3]
        torch.testing.assert_close(lam, ref_lam, rtol=0, atol=1e-6, msg=name)


def _projection_outputs(net: AttnNet, args):
    """The attention forward decomposed by hand: q, k, v projections and the out projection's
    input and output, with the module's output (checked equal to the module's)."""
    a = net.attn
    x = args[0]
    kv = args[-1]
    if not net.batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)  # [B, T, .]
    E, H = a.embed_dim, a.num_heads
    if a.in_proj_weight is not None:
        Wq, Wk, Wv = a.in_proj_weight.chunk(3)
    else:
        Wq, Wk, Wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
    bq, bk, bv = a.in_proj_bias.chunk(3)
    q, k, v = x @ Wq.T + bq, kv @ Wk.T + bk, kv @ Wv.T + bv  # [B, T, E]
    B, T = q.shape[:2]

    def heads(t):
        return t.reshape(B, T, H, E // H).transpose(1, 2)  # [B, H, T, E/H]

    att = (heads(q) @ heads(k).mT / (E // H) ** 0.5).softmax(-1)
    ctx = (att @ heads(v)).transpose(1, 2).reshape(B, T, E)
    out = ctx @ a.out_proj.weight.T + a.out_proj.bias
    return {"q": (x, q), "k": (kv, k), "v": (kv, v), "out": (ctx, out)}, torch.tanh(out)


@pytest.mark.parametrize("kdim,batch_first", [(None, True), (None, False), (5, True)],
                         ids=["packed-batch_first", "packed-seq_first", "kdim"])
def test_kronecker_factors_equal_per_sample_loops(kdim, batch_first):
    net, loss_fn, args, y = _case(kdim, batch_first)
    proj, out = _projection_outputs(net, args)
    ref_out = net(*args)
    torch.testing.assert_close(out if batch_first else out.transpose(0, 1), ref_out,
                               rtol=0, atol=1e-12)  # the decomposition is the module's forward
    names = {n.split(".")[-1].split("_")[0]: n for n in find_layers(net)}  # q, k, v, out
    factors = kronecker_factors(net, loss_fn, args, y)
    B = 3
    yy = y if batch_first else y.transpose(0, 1)
    for key, name in names.items():
        inp, _ = proj[key]
        n, m = inp.shape[-1], proj[key][1].shape[-1]
        C_A, C_delta = torch.zeros(n, n, dtype=DT), torch.zeros(m, m, dtype=DT)
        for i in range(B):  # per-sample loss l_i and its gradient w.r.t. the projection output
            proj_i, out_i = _projection_outputs(net, tuple(a for a in args))
            y_i = proj_i[key][1]
            loss_i = ((out_i[i] - yy[i]) ** 2).sum() / out_i.numel()  # MSELoss mean, times B
            delta = torch.autograd.grad(loss_i * B, y_i)[0][i]  # [T, m]
            C_delta += delta.T @ delta
            a = inp[i].detach()
            C_A += a.T @ a
        T = inp.shape[1]
        torch.testing.assert_close(factors[name].C_A, C_A / (B * T), rtol=0, atol=1e-8)
        torch.testing.assert_close(factors[name].C_delta, C_delta / B, rtol=0, atol=1e-8)


def test_capture_leaves_the_module_output_and_hooks_unchanged():
    net, loss_fn, args, y = _case()
    before = net(*args)
    with Capture(net) as cap:
        during = net(*args)
        loss_fn(during, y).backward()
    assert torch.equal(before, during)
    assert {len(r.inputs) for r in cap.records.values()} == {1}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert not torch.overrides._get_current_function_mode_stack()
