"""Benchmark tasks that ship without download: a digits CNN and a character-level transformer.

* ``digits``: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes), a fixed stratified
  70/30 train/test split (split seed 0); a validation split of the training set for tuning.
* ``chars``: a small causal transformer (nanoGPT layout) on the text of Python's standard library
  source files (``os.path.dirname(os.__file__)``, sorted ``*.py``, first ``n_chars`` characters);
  the last 10% is the test text, the 10% before it validation.

Also :class:`MeasuredAlphaLens`, a minimal stand-in for ``curvlens.CurvatureLens`` that measures
the paper's alpha (OLS slope of ``log h_k`` on ``log sigma_k``, ``h_k = vec(D_k)^T H_WW vec(D_k)``
by exact double-backprop HVPs along the gradient's top singular directions ``D_k = u_k v_k^T``) and
offers it through ``latest_alphas()``, the interface ``SpectralNewton(alpha="auto")`` reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- digits


@dataclass
class Split:
    x: Tensor
    y: Tensor


def digits_data() -> tuple[Split, Split, Split]:
    """``(train, val, test)``: 30% test, then 20% of the rest as validation (for tuning)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0,
                                      stratify=y.numpy())
    idx_tr, idx_va = train_test_split(idx_tr, test_size=0.2, random_state=0,
                                      stratify=y.numpy()[idx_tr])
    return tuple(Split(X[i], y[i]) for i in (idx_tr, idx_va, idx_te))


class DigitsCNN(nn.Module):
    """conv(1->16) - conv(16->32) - maxpool - fc(512->64) - head(64->10), ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.head(F.relu(self.fc(x)))


# --------------------------------------------------------------------------- chars


def stdlib_text(n_chars: int = 300_000) -> str:
    """The first ``n_chars`` characters of the standard library's sorted ``*.py`` files (ASCII)."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        text = "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text)
        parts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "".join(parts)[:n_chars]


@dataclass
class CharData:
    train: Tensor  # [N_train] token ids
    val: Tensor  # [N_val]
    test: Tensor  # [N_test]
    vocab: int


def char_data(n_chars: int = 300_000) -> CharData:
    text = stdlib_text(n_chars)
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lut[c] for c in text], dtype=torch.long)
    a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
    return CharData(ids[:a], ids[a:b], ids[b:], len(chars))


def char_batches(ids: Tensor, *, batch: int, ctx: int, n: int, gen: torch.Generator):
    """``n`` random ``(x, y)`` windows ``[batch, ctx]`` (y shifted by one)."""
    for _ in range(n):
        start = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=gen)
        rows = start[:, None] + torch.arange(ctx + 1)
        w = ids[rows]
        yield w[:, :-1], w[:, 1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # Explicit attention (SDPA on CPU has no double backward, which the HVPs need).
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, h, T, T]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        a = att.masked_fill(mask, float("-inf")).softmax(-1) @ v  # [B, h, T, C/h]
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token + position embeddings, ``layers`` pre-LN blocks, final LN, linear head."""

    def __init__(self, vocab: int, *, dim: int = 64, heads: int = 4, layers: int = 2,
                 ctx: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------- measured alpha


class MeasuredAlphaLens:
    """Measures alpha per layer on a fixed batch; ``latest_alphas()`` returns the last values.

    A stand-in for ``curvlens.CurvatureLens`` (same ``latest_alphas`` interface), kept in the
    benchmark so it does not depend on the lens being finished. Call :meth:`measure` from the
    training loop (the benchmark does so before epoch 0 and every ``every`` epochs).
    """

    def __init__(self, model: nn.Module, loss: Callable[[], Tensor], layers: dict[str, Tensor],
                 *, top_k: int = 12) -> None:
        self.model, self.loss, self.layers, self.top_k = model, loss, layers, top_k
        self.alphas: dict[str, float] = {}

    def latest_alphas(self) -> dict[str, float]:
        return dict(self.alphas)

    def measure(self) -> dict[str, float]:
        weights = list(self.layers.values())
        with torch.enable_grad():
            grads = torch.autograd.grad(self.loss(), weights, create_graph=True)
            for (name, W), g in zip(self.layers.items(), grads):
                G = g.detach().flatten(1).double()
                U, S, Vh = torch.linalg.svd(G, full_matrices=False)
                k = min(self.top_k, int((S > 1e-8 * S[0]).sum()))
                h = []
                for i in range(k):
                    D = torch.outer(U[:, i], Vh[i]).to(W.dtype).view_as(W)
                    (hv,) = torch.autograd.grad(g, W, grad_outputs=D, retain_graph=True)
                    h.append(float((hv * D).sum()))
                h_t, s_t = torch.tensor(h), S[:k].float()
                keep = h_t > 0
                if int(keep.sum()) < 3:
                    self.alphas[name] = math.nan
                    continue
                x, yv = s_t[keep].log(), h_t[keep].log()
                xc = x - x.mean()
                self.alphas[name] = float((xc * (yv - yv.mean())).sum() / (xc * xc).sum())
        return self.latest_alphas()
