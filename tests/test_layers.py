"""Layer registry: discovery, kinds, matrix views, user registration and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlens.layers import (
    LayerKind,
    LayerSpec,
    find_layers,
    layer_spec,
    register_layer,
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
    with pytest.raises(ValueError, match=r"layer '1' \(Tanh\) is not supported"):
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
