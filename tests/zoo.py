"""A model zoo at small widths: the architectures curvlens's users study, as test cases.

Each builder returns a :class:`ZooCase` (model, loss, a fixed batch, analyze options). The
builders are importable from other test files (``from tests.zoo import ZOO, finite_share``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ZooCase:
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    inputs: Any
    targets: Any
    options: dict[str, Any] = field(default_factory=dict)


#: analyze options that keep the zoo fast: small window, no bootstrap, no Lanczos.
FAST = {"top_k": 8, "lanczos_k": 0, "bootstrap": 0, "noise_floor": False}


def trained(case: ZooCase, steps: int = 40, lr: float = 3e-3) -> ZooCase:
    """``case`` after a few Adam steps on its own batch (a model that has started to fit its data,
    as the ones users measure, rather than one at initialization)."""
    opt = torch.optim.Adam(case.model.parameters(), lr=lr)
    args = case.inputs if isinstance(case.inputs, tuple) else (case.inputs,)
    case.model.train()
    for _ in range(steps):
        opt.zero_grad()
        case.loss_fn(case.model(*args), case.targets).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return case


def _gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resnet18(seed: int = 0) -> ZooCase:
    """torchvision ResNet-18 on 16 x 16 images (batch-norm measured in eval mode)."""
    from torchvision.models import resnet18 as build

    g = _gen(seed)
    model = build(num_classes=5)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    return ZooCase(model, nn.CrossEntropyLoss(), x, y, {"kronecker_backend": None})


class EncoderClassifier(nn.Module):
    """Linear in -> nn.TransformerEncoder -> mean over tokens -> Linear head."""

    def __init__(self, d: int = 8, layers: int = 2, norm_first: bool = False,
                 batch_first: bool = True, features: int = 5, classes: int = 6) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(features, d)
        block = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.inp(x))
        return self.head(h.mean(1 if self.batch_first else 0))


def encoder(norm_first: bool, batch_first: bool, seed: int = 0) -> ZooCase:
    g = _gen(seed)
    model = EncoderClassifier(norm_first=norm_first, batch_first=batch_first)
    shape = (8, 6) if batch_first else (6, 8)
    x = torch.randn(*shape, 5, generator=g)
    y = torch.randint(0, 6, (8,), generator=g)
    return ZooCase(model, nn.CrossEntropyLoss(), x, y)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP (GPT-2 style)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        causal = torch.triu(torch.full((T, T), -math.inf, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, blocks, a head tied to the token embedding.

    With ``internal_loss`` the model takes the targets and returns ``{"loss", "logits"}``, as
    HuggingFace models do.
    """

    def __init__(self, vocab: int = 11, d: int = 8, blocks: int = 2, context: int = 8,
                 internal_loss: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.internal_loss = internal_loss

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        logits = self.lm_head(self.ln_f(self.blocks(self.wte(tokens) + self.wpe(pos))))
        if not self.internal_loss:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return {"loss": loss, "logits": logits}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a mean over all tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpt(seed: int = 0, internal_loss: bool = False) -> ZooCase:
    g = _gen(seed)
    model = TinyGPT(internal_loss=internal_loss)
    x = torch.randint(0, 11, (6, 8), generator=g)
    y = torch.randint(0, 11, (6, 8), generator=g)
    if internal_loss:
        return ZooCase(model, lambda out, _: out["loss"], (x, y), y)
    return ZooCase(model, lm_loss, x, y)


class RecurrentLM(nn.Module):
    """Embedding -> LSTM or GRU -> Linear head over the vocabulary."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, vocab: int = 11, d: int = 6,
                 hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = cell(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(tokens))[0])


def lstm_lm(seed: int = 0) -> ZooCase:
    g = _gen(seed)
    x = torch.randint(0, 11, (6, 7), generator=g)
    y = torch.randint(0, 11, (6, 7), generator=g)
    return ZooCase(RecurrentLM(nn.LSTM), lm_loss, x, y)


class GRUClassifier(nn.Module):
    """A GRU over feature sequences, its last state to a Linear head."""

    def __init__(self, features: int = 5, hidden: int = 8, classes: int = 6) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def gru(seed: int = 0) -> ZooCase:
    g = _gen(seed)
    x = torch.randn(8, 6, 5, generator=g)
    y = torch.randint(0, 6, (8,), generator=g)
    return ZooCase(GRUClassifier(), nn.CrossEntropyLoss(), x, y)


def mobilenet(seed: int = 0) -> ZooCase:
    """torchvision MobileNetV3-small (hardswish, hardsigmoid, squeeze-excitation, batch-norm
    momentum 0.01) at width 0.25 on 32 x 32 images, measured with batch statistics: a few steps
    after initialization its running statistics are still far from the data, and eval-mode
    outputs barely depend on the input (the report says so)."""
    from torchvision.models import mobilenet_v3_small

    g = _gen(seed)
    model = mobilenet_v3_small(num_classes=5, width_mult=0.25)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    return ZooCase(model, nn.CrossEntropyLoss(), x, y,
                   {"batch_norm": "batch", "kronecker_backend": None})


def vit(seed: int = 0) -> ZooCase:
    """torchvision VisionTransformer (nn.MultiheadAttention inside) on 16 x 16 images."""
    from torchvision.models import VisionTransformer

    g = _gen(seed)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    return ZooCase(model, nn.CrossEntropyLoss(), x, y)


ZOO: dict[str, Callable[[], ZooCase]] = {
    "resnet18": resnet18,
    "encoder-post-norm-batch_first": lambda: encoder(False, True),
    "encoder-pre-norm-seq_first": lambda: encoder(True, False),
    "gpt-tied": gpt,
    "gpt-internal-loss": lambda: gpt(internal_loss=True),
    "lstm-lm": lstm_lm,
    "gru": gru,
    "vit": vit,
    "mobilenet_v3_small": mobilenet,
}


def matrix_count(model: nn.Module) -> int:
    """Trainable weights with >= 2 non-trivial dims, each tensor once (tied weights once), an
    attention ``in_proj_weight`` counted as its three matrices q, k and v."""
    packed = {id(m.in_proj_weight) for m in model.modules()
              if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None}
    return sum(3 if id(p) in packed else 1 for p in model.parameters()
               if p.requires_grad and sum(d > 1 for d in p.shape) >= 2)


def finite_share(report: Any) -> float:
    """Share of the report's matrices with finite alpha, gamma and s_rayleigh."""
    ok = [all(math.isfinite(getattr(rep, f)) for f in ("alpha", "gamma", "s_rayleigh"))
          for rep in report.layers.values()]
    return sum(ok) / len(ok)
