"""Layer registry: discovery, kinds, matrix views, user registration and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlens.layers import (
    LayerKind,
    LayerSpec,
    MatrixSlot,
    find_layers,
    layer_spec,
    register_layer,
    register_matrix_view,
    resolve_layer,
    weight_matrix,
)
from tests.conftest import build_case


def test_finds_layers_by_qualified_name_with_kinds():
    model, *_ = build_case("attention")
    found = find_layers(model)
    assert list(found) == ["q", "k", "v", "proj", "head"]
    assert [i.kind for i in found.values()] == [LayerKind.LINEAR] * 4 + [LayerKind.HEAD]
    cnn, *_ = build_case("cnn")
    kinds = {n: i.kind.value for n, i in find_layers(cnn).items()}
    assert kinds == {"0": "conv", "2": "conv", "5": "head"}
    assert find_layers(cnn)["2"].matrix_shape == (4, 2 * 9)


def test_matrix_views_share_storage():
    conv = nn.Conv2d(3, 4, (2, 3))
    W = weight_matrix(conv)
    assert W.shape == (4, 18) and W.data_ptr() == conv.weight.data_ptr()
    emb = nn.Embedding(10, 4)
    assert weight_matrix(emb).shape == (10, 4)
    assert layer_spec(emb).inputs_are_columns is False


def test_on_unsupported_policies():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"outside supported layers: \['1.weight', '1.bias'\]"):
        find_layers(model, on_unsupported="error")
    with pytest.warns(UserWarning, match="on_unsupported='skip'"):
        assert list(find_layers(model, on_unsupported="warn")) == ["0", "2"]
    assert list(find_layers(model, on_unsupported="skip")) == ["0", "2"]
    with pytest.raises(ValueError, match="on_unsupported must be one of"):
        find_layers(model, on_unsupported="ignore")


def test_frozen_layers_are_left_out_and_named_when_asked_for():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert list(find_layers(model)) == ["2"]
    with pytest.raises(ValueError, match="layer '0' is frozen"):
        find_layers(model, ["0"])
    with pytest.raises(ValueError, match=r"layer '1' \(Tanh\) is not supported: it has no"):
        find_layers(model, ["1"])
    with pytest.raises(ValueError, match="'x' is not a module"):
        resolve_layer(model, "x")


def test_register_a_new_module_type():
    class Bilinearish(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2, 2))

        def forward(self, x):
            return x @ self.weight.flatten(1).T

    spec = LayerSpec(
        kind=LayerKind.LINEAR,
        matrix=lambda m: m.weight.flatten(1),
        input_rows=lambda m, x: x.reshape(-1, x.shape[-1]),
        grad_rows=lambda m, g: g.reshape(-1, g.shape[-1]),
        locations=lambda m, x: 1,
    )
    register_layer(Bilinearish, spec)
    model = nn.Sequential(Bilinearish())
    info = resolve_layer(model, model[0])
    assert info.name == "0" and info.matrix_shape == (3, 4)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int, spec)


class TiedLM(nn.Module):
    """Embedding and head share one weight; an LSTM; a bare matrix and a bare 3-D parameter."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.mix = nn.Parameter(torch.randn(d, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))  # [1, T, d]: viewed as [T, d]
        self.cls = nn.Parameter(torch.randn(1, 1, d))  # a vector: not a matrix
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens):
        h = self.wte(tokens) + self.pos[:, : tokens.shape[1]] + self.cls
        h = self.rnn(h)[0] @ self.mix
        return self.head(self.norm(h))


def test_every_matrix_is_found_by_its_parameters():
    model = TiedLM()
    stray = r"outside supported layers: \['norm.weight', 'norm.bias'\]"
    with pytest.warns(UserWarning, match=stray):
        found = find_layers(model)
    assert list(found) == ["mix", "pos", "wte", "rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    wte = found["wte"]
    assert wte.aliases == ("wte.weight", "head.weight")  # tied: measured once, all names
    assert wte.spec is None and "tied weight" in wte.reason
    assert wte.kind is LayerKind.EMBEDDING
    rnn = found["rnn.weight_hh_l0"]
    assert rnn.kind is LayerKind.RECURRENT and rnn.matrix_shape == (16, 4)
    assert rnn.spec is None and "no capture adapter for LSTM.weight_hh_l0" in rnn.reason
    assert found["mix"].kind is LayerKind.MATRIX
    assert found["pos"].matrix_shape == (5, 4)
    assert found["pos"].matrix().data_ptr() == model.pos.data_ptr()
    assert list(find_layers(model, ["head.weight"])) == ["wte"]  # by any alias


def test_row_blocks_embed_and_extract():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.arange(12.0).reshape(2, 2, 3))

    register_matrix_view(Pair, lambda m: [MatrixSlot("w", "top", (0, 1)),
                                          MatrixSlot("w", "bottom", (1, 2))])
    model = nn.Sequential(Pair())
    found = find_layers(model)
    bottom = found["0.bottom"]
    assert bottom.full_shape == (2, 6) and bottom.matrix_shape == (1, 6)
    assert torch.equal(bottom.matrix(), torch.arange(6.0, 12.0).reshape(1, 6))
    D = torch.randn(3, 1, 6)
    full = bottom.embed(D)  # [3, 2, 2, 3]
    assert full.shape == (3, 2, 2, 3) and torch.equal(full[:, 0], torch.zeros(3, 2, 3))
    assert torch.equal(bottom.extract(full), D)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_matrix_view(int, lambda m: [])


def test_register_an_adapter_for_a_parameter_that_is_not_weight():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_in = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(x @ self.W_in.T)

    spec = LayerSpec(
        kind=LayerKind.LINEAR,
        matrix=lambda m: m.W_in,
        input_rows=lambda m, x: x.reshape(-1, x.shape[-1]),
        grad_rows=lambda m, g: g.reshape(-1, g.shape[-1]),
        locations=lambda m, x: 1,
    )
    model = nn.Sequential(Cell(), nn.Linear(4, 2).double())
    assert find_layers(model)["0.W_in"].spec is None
    register_layer(Cell, spec, param="W_in")
    info = find_layers(model)["0.W_in"]
    assert info.spec is spec and info.kind is LayerKind.LINEAR
    from curvlens.kronecker import kronecker_factors

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    f = kronecker_factors(model, nn.MSELoss(), x, y, layers=["0.W_in"])
    torch.testing.assert_close(f["0.W_in"].C_A, x.T @ x / 8, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="param must be"):
        register_layer(Cell, spec, param="")


def test_recurrent_weight_curvature_equals_dense_hessian():
    from torch.func import functional_call, hessian

    from curvlens.hessian import directional_curvature
    from curvlens.hessian_spectrum import block_eigenvalues

    torch.manual_seed(0)
    model = nn.LSTM(3, 4, batch_first=True).double()

    def out(m, x):
        return m(x)[0][:, -1]

    net = _Last(model)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    info = find_layers(net)["rnn.weight_hh_l0"]
    params = dict(net.named_parameters())
    W = params["rnn.weight_hh_l0"].detach()
    H = hessian(lambda w: loss_fn(functional_call(net, {**params, "rnn.weight_hh_l0": w},
                                                  (x,)), y))(W).reshape(W.numel(), -1)
    U = torch.linalg.qr(torch.randn(16, 3, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(4, 3, dtype=torch.float64))[0]
    D = torch.einsum("mk,nk->kmn", U, V).reshape(3, -1)
    h = directional_curvature(net, loss_fn, x, y, info, U, V)
    torch.testing.assert_close(h, torch.einsum("ki,ij,kj->k", D, H, D), rtol=0, atol=1e-6)
    lam = block_eigenvalues(net, loss_fn, x, y, info, 3)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=0, atol=1e-6)


class _Last(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]
