"""Shared test cases: small float64 models that cover every supported layer type.

Each case is data (``model_fn``, ``loss_fn``, ``data_fn``, ``seed``) turned into a fixture with a
readable id, so a new architecture is one more dict.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyAttention(nn.Module):
    """One self-attention block built from nn.Linear, mean-pooled into a classifier head."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d]
        att = (self.q(x) @ self.k(x).mT / x.shape[-1] ** 0.5).softmax(-1)  # [B, T, T]
        h = x + self.proj(att @ self.v(x))
        return self.head(torch.tanh(h).mean(1))


class TinyEmbedding(nn.Module):
    """Embedding -> mean over tokens -> tanh -> Linear head."""

    def __init__(self, vocab: int = 7, dim: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [B, T]
        return self.head(torch.tanh(self.hidden(self.emb(tokens).mean(1))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def _cnn1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3))


def _class_data(shape: tuple, classes: int = 3, batch: int = 6):
    def make(generator: torch.Generator):
        x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
        y = torch.randint(0, classes, (batch,), generator=generator)
        return x, y

    return make


def _token_data(vocab: int = 7, length: int = 4, classes: int = 3, batch: int = 6):
    def make(generator: torch.Generator):
        x = torch.randint(0, vocab, (batch, length), generator=generator)
        y = torch.randint(0, classes, (batch,), generator=generator)
        return x, y

    return make


CASES = {
    "mlp": dict(model_fn=_mlp, loss_fn=nn.CrossEntropyLoss, data_fn=_class_data((5,)), seed=0),
    "cnn": dict(model_fn=_cnn, loss_fn=nn.CrossEntropyLoss, data_fn=_class_data((2, 6, 6)),
                seed=1),
    "cnn1d": dict(model_fn=_cnn1d, loss_fn=nn.CrossEntropyLoss, data_fn=_class_data((2, 7)),
                  seed=4),
    "embedding": dict(model_fn=TinyEmbedding, loss_fn=nn.CrossEntropyLoss,
                      data_fn=_token_data(), seed=2),
    "attention": dict(model_fn=TinyAttention, loss_fn=nn.CrossEntropyLoss,
                      data_fn=_class_data((4, 6)), seed=3),
}


def build_case(name: str):
    """``(model [float64], loss_fn, x, y)`` of a named case, seeded."""
    case = CASES[name]
    torch.manual_seed(case["seed"])
    model = case["model_fn"]().double()
    generator = torch.Generator().manual_seed(case["seed"])
    x, y = case["data_fn"](generator)
    return model, case["loss_fn"](), x, y


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    """Every case in :data:`CASES` as ``(model, loss_fn, x, y)``."""
    return build_case(request.param)
