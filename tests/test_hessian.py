"""Hessian engine against dense float64 Hessians from ``torch.func.hessian`` on tiny models."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvlens.hessian import (
    block_hvp,
    directional_curvature,
    measurement_mode,
    model_hvp,
)
from curvlens.hessian_spectrum import (
    block_eigenvalues,
    hessian_density,
    hessian_trace,
    model_eigenvalues,
)
from curvlens.linalg.trace import random_probes

DT = torch.float64


# ----------------------------------------------------------------------------- tiny models


class Attention(nn.Module):
    """One softmax attention block built from nn.Linear, taking ``(x, mask_bias)``."""

    def __init__(self, d: int = 4, out: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, d]
        att = torch.softmax(q @ k.mT / math.sqrt(x.shape[-1]) + bias, dim=-1)  # [B, T, T]
        h = x + self.o(att @ v)
        return self.head(torch.tanh(h).mean(1))


class EmbedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


class TiedLM(nn.Module):
    """Embedding whose weight is reused by the output layer (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(idx))))  # [B, T, V]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Conv2d(3, 2, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    )


def _class_data(shape, classes):
    def data(g):
        return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, classes, (shape[0],),
                                                                         generator=g)
    return data


def _attention_data(g):
    x = torch.randn(5, 3, 4, generator=g, dtype=DT)
    bias = torch.zeros(5, 3, 3, dtype=DT)
    bias[:, :, -1] = -1e9 * (torch.arange(5) % 2 == 0)[:, None]  # mask the last token of some
    return (x, bias), torch.randn(5, 2, generator=g, dtype=DT)


def _token_data(vocab, classes, per_token=False):
    def data(g):
        idx = torch.randint(0, vocab, (6, 4), generator=g)
        y = torch.randint(0, classes, (6, 4) if per_token else (6,), generator=g)
        return idx, y
    return data


def _seq_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


CASES = {
    "mlp": dict(model_fn=_mlp, loss_fn=nn.CrossEntropyLoss(), data_fn=_class_data((7, 4), 3),
                layers=["0", "3"], seed=0),
    "cnn": dict(model_fn=_cnn, loss_fn=nn.CrossEntropyLoss(), data_fn=_class_data((4, 2, 6, 6), 3),
                layers=["0", "3"], seed=1),
    "attention": dict(model_fn=Attention, loss_fn=nn.MSELoss(), data_fn=_attention_data,
                      layers=["q", "v"], seed=2),
    "embedding": dict(model_fn=EmbedLinear, loss_fn=nn.CrossEntropyLoss(),
                      data_fn=_token_data(6, 3), layers=["emb", "fc"], seed=3),
    "tied": dict(model_fn=TiedLM, loss_fn=_seq_ce, data_fn=_token_data(5, 5, per_token=True),
                 layers=["emb", "out"], seed=4),
}
LAYER_CASES = [(c, layer) for c, spec in CASES.items() for layer in spec["layers"]]


def _setup(case):
    spec = CASES[case]
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    model = spec["model_fn"]().to(DT).train()
    with torch.no_grad():  # move batch-norm statistics away from the identity
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    inputs, targets = spec["data_fn"](g)
    return model, spec["loss_fn"], inputs, targets


def _args(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def dense_hessian(model, loss_fn, inputs, targets, names):
    """Dense float64 Hessian over the named parameters (flattened, concatenated), eval mode."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        pieces = flat.split([math.prod(s) for s in shapes])
        repl = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)}
        return loss_fn(functional_call(model, repl, _args(inputs), tie_weights=True), targets)

    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.func.hessian(f)(flat0).detach()
    finally:
        for m, t in flags.items():
            m.training = t


def _weight_name(model, layer):
    w = dict(model.named_modules())[layer].weight
    return next(n for n, p in model.named_parameters() if p is w)


def _block(case, layer):
    model, loss_fn, inputs, targets = _setup(case)
    H = dense_hessian(model, loss_fn, inputs, targets, [_weight_name(model, layer)])
    return model, loss_fn, inputs, targets, H


def _close(a, b, rtol, scale):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- products


@pytest.mark.parametrize("case,layer", LAYER_CASES)
def test_block_hvp_matches_dense(case, layer):
    model, loss_fn, inputs, targets, H = _block(case, layer)
    flags = [m.training for m in model.modules()]
    m, n = dict(model.named_modules())[layer].weight.flatten(1).shape
    V = torch.randn(5, m, n, dtype=DT, generator=torch.Generator().manual_seed(7))
    HV = block_hvp(model, loss_fn, inputs, targets, layer, V)
    expected = (V.reshape(5, -1) @ H).reshape(5, m, n)  # H symmetric
    _close(HV, expected, 1e-8, H.abs().max())
    chunked = block_hvp(model, loss_fn, inputs, targets, layer, V, max_batch=2)
    _close(chunked, expected, 1e-8, H.abs().max())
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("method", ["forward", "hvp"])
@pytest.mark.parametrize("case,layer", LAYER_CASES)
def test_directional_curvature_matches_dense(case, layer, method):
    model, loss_fn, inputs, targets, H = _block(case, layer)
    m, n = dict(model.named_modules())[layer].weight.flatten(1).shape
    g = torch.Generator().manual_seed(8)
    k = min(m, n, 3)
    U = torch.linalg.qr(torch.randn(m, k, dtype=DT, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, dtype=DT, generator=g))[0]
    h = directional_curvature(model, loss_fn, inputs, targets, layer, U, V, method=method,
                              max_batch=2)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(k, -1)
    _close(h, torch.einsum("ki,ij,kj->k", D, H, D), 1e-8, H.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_model_hvp_matches_dense(case):
    model, loss_fn, inputs, targets = _setup(case)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    H = dense_hessian(model, loss_fn, inputs, targets, names)
    v = torch.randn(3, H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(9))
    _close(model_hvp(model, loss_fn, inputs, targets, v, max_batch=2), v @ H, 1e-8,
           H.abs().max())
    _close(model_hvp(model, loss_fn, inputs, targets, v[0]), H @ v[0], 1e-8, H.abs().max())


# ----------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("case,layer", LAYER_CASES)
def test_block_eigenvalues_match_eigvalsh(case, layer):
    model, loss_fn, inputs, targets, H = _block(case, layer)
    exact = torch.linalg.eigvalsh(H)  # ascending
    k = min(5, H.shape[0] // 2)
    gen = torch.Generator().manual_seed(10)
    top, vecs = block_eigenvalues(model, loss_fn, inputs, targets, layer, k, generator=gen,
                                  return_vectors=True)
    scale = exact.abs().max()
    _close(top, exact.flip(0)[:k], 1e-6, scale)
    m, n = dict(model.named_modules())[layer].weight.flatten(1).shape
    assert vecs.shape == (k, m, n)
    Y = vecs.reshape(k, -1)
    _close(Y @ H, top[:, None] * Y, 1e-5, scale)  # Ritz vectors are eigenvectors
    both = block_eigenvalues(model, loss_fn, inputs, targets, layer, 2, which="both",
                             generator=gen)
    _close(both[:2], exact.flip(0)[:2], 1e-6, scale)
    _close(both[3], exact[0], 1e-6, scale)
    if exact[1] - exact[0] > 1e-6 * scale:  # single-vector Lanczos sees one copy of a repeat
        _close(both[2], exact[1], 1e-6, scale)


@pytest.mark.parametrize("case", list(CASES))
def test_model_eigenvalues_match_eigvalsh(case):
    model, loss_fn, inputs, targets = _setup(case)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, inputs, targets, names))
    top = model_eigenvalues(model, loss_fn, inputs, targets, 5,
                            generator=torch.Generator().manual_seed(11))
    _close(top, exact.flip(0)[:5], 1e-6, exact.abs().max())
    bottom = model_eigenvalues(model, loss_fn, inputs, targets, 3, which="smallest",
                               generator=torch.Generator().manual_seed(12))
    _close(bottom, exact[:3].flip(0), 1e-6, exact.abs().max())


@pytest.mark.parametrize("layer", ["0", None])
def test_hutchinson_within_three_standard_errors(layer):
    model, loss_fn, inputs, targets = _setup("cnn")
    names = ([_weight_name(model, layer)] if layer else
             [n for n, p in model.named_parameters() if p.requires_grad])
    H = dense_hessian(model, loss_fn, inputs, targets, names)
    est = hessian_trace(model, loss_fn, inputs, targets, layer, num_samples=64, batch_size=16,
                        generator=torch.Generator().manual_seed(13))
    assert est.samples.shape == (64,)
    assert 0 < float(est.std_error) < abs(float(torch.trace(H)))
    assert abs(float(est.estimate - torch.trace(H))) <= 3 * float(est.std_error)


@pytest.mark.parametrize("layer", ["3", None])
def test_slq_moments(layer):
    model, loss_fn, inputs, targets = _setup("mlp")
    names = ([_weight_name(model, layer)] if layer else
             [n for n, p in model.named_parameters() if p.requires_grad])
    H = dense_hessian(model, loss_fn, inputs, targets, names)
    dim = H.shape[0]
    dens = hessian_density(model, loss_fn, inputs, targets, layer, num_probes=24, num_iter=10,
                           generator=torch.Generator().manual_seed(14))
    z = random_probes(dim, 24, generator=torch.Generator().manual_seed(14), dtype=DT)
    q = z / math.sqrt(dim)
    m1 = (dens.weights * dens.nodes).sum(-1)  # per probe: q^T H q exactly
    m2 = (dens.weights * dens.nodes**2).sum(-1)  # q^T H^2 q
    scale = H.abs().max()
    _close(m1, torch.einsum("pi,ij,pj->p", q, H, q), 1e-9, scale)
    _close(m2, torch.einsum("pi,ij,pj->p", q, H @ H, q), 1e-9, scale**2)
    for p, sample in ((1, m1), (2, m2)):
        exact = torch.trace(torch.linalg.matrix_power(H, p)) / dim
        se = sample.std() / math.sqrt(len(sample))
        assert abs(float(dens.moment(p) - exact)) <= 3 * float(se)
    assert abs(float(torch.trapezoid(dens.density, dens.grid)) - 1.0) < 1e-3


# ----------------------------------------------------------------------------- hygiene


def test_measurement_mode_restores_flags_after_exception():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[3].eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(KeyError):
        with measurement_mode(model):
            assert [m.training for m in model] == [True, False, False, False]
            raise KeyError("boom")
    assert [m.training for m in model.modules()] == before


def test_measurement_freezes_batchnorm_and_dropout():
    model, loss_fn, inputs, targets = _setup("cnn")
    model[1].momentum = 0.5
    stats = [b.clone() for b in model.buffers()]
    U = torch.eye(3, 2, dtype=DT)
    V = torch.eye(18, 2, dtype=DT)
    h1 = directional_curvature(model, loss_fn, inputs, targets, "0", U, V)
    h2 = directional_curvature(model, loss_fn, inputs, targets, "0", U, V, method="hvp")
    for a, b in zip(stats, model.buffers()):
        assert torch.equal(a, b)
    _close(h1, h2, 1e-10, h1.abs().max())
    assert model.training and model[1].training


class _Cube(torch.autograd.Function):
    """x^3 with a backward formula only (no forward-mode AD rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_auto_falls_back_to_hvp_without_forward_ad():
    torch.manual_seed(5)
    lin = nn.Linear(3, 2).to(DT)
    model = nn.Sequential(lin)
    model.forward = lambda x: _Cube.apply(lin(x))
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    loss_fn = nn.MSELoss()
    U, V = torch.eye(2, 2, dtype=DT), torch.eye(3, 2, dtype=DT)
    with pytest.raises(RuntimeError):
        directional_curvature(model, loss_fn, x, y, "0", U, V, method="forward")
    h = directional_curvature(model, loss_fn, x, y, "0", U, V, method="auto")
    w0 = lin.weight.detach()
    H = torch.autograd.functional.hessian(  # reverse-over-reverse: no forward AD needed
        lambda w: loss_fn(functional_call(model, {"0.weight": w}, (x,)), y), w0
    ).reshape(6, 6)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(2, -1)
    _close(h, torch.einsum("ki,ij,kj->k", D, H, D), 1e-8, H.abs().max())


def test_progress_bar_does_not_change_results(capsys, monkeypatch):
    model, loss_fn, inputs, targets = _setup("mlp")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars show on terminals only
    a = block_eigenvalues(model, loss_fn, inputs, targets, "0", 3,
                          generator=torch.Generator().manual_seed(1))
    b = block_eigenvalues(model, loss_fn, inputs, targets, "0", 3, progress=True,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert "lanczos" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors


def test_zero_directions_give_empty_results():
    model, loss_fn, inputs, targets = _setup("mlp")
    assert block_hvp(model, loss_fn, inputs, targets, "0", torch.zeros(0, 5, 4, dtype=DT)).shape \
        == (0, 5, 4)
    for method in ("forward", "hvp"):
        h = directional_curvature(model, loss_fn, inputs, targets, "0",
                                  torch.zeros(5, 0, dtype=DT), torch.zeros(4, 0, dtype=DT),
                                  method=method)
        assert h.shape == (0,)
    P = sum(p.numel() for p in model.parameters())
    assert model_hvp(model, loss_fn, inputs, targets, torch.zeros(0, P, dtype=DT)).shape == (0, P)


def test_errors_name_the_layer():
    model, loss_fn, inputs, targets = _setup("mlp")
    V = torch.zeros(2, 5, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"layer '0'.*V must have shape \[k, 5, 4\]"):
        block_hvp(model, loss_fn, inputs, targets, "0", torch.zeros(2, 4, 5, dtype=DT))
    with pytest.raises(TypeError, match=r"layer '0'.*dtype torch.float32.*V.to"):
        block_hvp(model, loss_fn, inputs, targets, "0", V.float())
    with pytest.raises(ValueError, match=r"layer '0'.*on meta"):
        block_hvp(model, loss_fn, inputs, targets, "0", V.to("meta"))
    with pytest.raises(ValueError, match=r"layer '3'.*empty batch"):
        block_hvp(model, loss_fn, inputs[:0], targets[:0], "3", torch.zeros(1, 3, 5, dtype=DT))
    bad = inputs.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"layer '3'.*loss is nan"):
        block_hvp(model, loss_fn, bad, targets, "3", torch.zeros(1, 3, 5, dtype=DT))
    with pytest.raises(RuntimeError, match=r"layer '0'.*loss is nan"):
        directional_curvature(model, loss_fn, bad, targets, "0", torch.eye(5, 1, dtype=DT),
                              torch.eye(4, 1, dtype=DT))
    with pytest.raises(ValueError, match=r"layer '0'.*same k"):
        directional_curvature(model, loss_fn, inputs, targets, "0", torch.eye(5, 2, dtype=DT),
                              torch.eye(4, 1, dtype=DT))
    with pytest.raises(ValueError, match=r"layer '0'.*scalar"):
        block_hvp(model, nn.CrossEntropyLoss(reduction="none"), inputs, targets, "0", V)
    with pytest.raises(ValueError, match="method must be one of"):
        directional_curvature(model, loss_fn, inputs, targets, "0", torch.eye(5, 1, dtype=DT),
                              torch.eye(4, 1, dtype=DT), method="fd")
    with pytest.raises(ValueError, match="max_batch"):
        block_hvp(model, loss_fn, inputs, targets, "0", V, max_batch=0)
    with pytest.raises(ValueError, match=r"model Sequential.*v must have shape"):
        model_hvp(model, loss_fn, inputs, targets, torch.zeros(3, dtype=DT))
    assert model.training
