"""Small tasks that ship without download, for ``curvlens demo`` and ``curvlens reproduce``.

* ``digits``: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes), a seeded 80/20
  train/test split; :class:`DigitsCNN` and :class:`DigitsMLP`.
* ``chars``: a small causal transformer (nanoGPT layout, explicit attention because the exact
  Hessian-vector products need double backward) on the text of Python's standard library
  (sorted ``*.py`` files under ``os.path.dirname(os.__file__)``).
* ``vit``: :class:`DigitsViT`, a small vision transformer on the digits upscaled to 16 x 16
  (:func:`upscaled_digits`), 4 x 4 patches.
* ``teacher``: a controlled synthetic regression task: Gaussian inputs with a power-law
  covariance, targets from a random two-layer tanh teacher plus noise; an MLP student.

Together they reproduce the per-layer table of Calvo, 2026, arXiv:2606.02596, on data that needs
no download; the vision transformer is the optimizer benchmark's third architecture.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Dataset",
    "digits_data",
    "shifted",
    "DigitsCNN",
    "DigitsMLP",
    "stdlib_text",
    "CharTransformer",
    "char_data",
    "upscaled_digits",
    "DigitsViT",
    "char_batch",
    "lm_loss",
    "teacher_data",
    "TeacherStudent",
]


@dataclass
class Dataset:
    """A train/test split of tensors (``x`` inputs, ``y`` targets)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


# --------------------------------------------------------------------------- digits


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Digits as ``[N, 1, 8, 8]`` float32 in ``[0, 1]`` with labels ``[N]``, seeded split.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits task needs scikit-learn: pip install scikit-learn (or curvlens[examples])"
        ) from None
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(X[train], y[train], X[test], y[test])


def shifted(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image ``[B, C, H, W]`` moved by a random whole-pixel offset in ``{-1, 0, 1}^2``
    (zero padding): the augmentation of the ``reproduce --full`` digits models."""
    H, W = x.shape[-2:]
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=generator)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            sel = (dy == i) & (dx == j)
            out[sel] = pad[sel, ..., i:i + H, j:j + W]
    return out


class DigitsCNN(nn.Module):
    """conv(1->16) - conv(16->32) - maxpool - fc(512->64) - head(64->10), ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 1, 8, 8]
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)  # [B, 512]
        return self.head(F.relu(self.fc(x)))


class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 with tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 1, 8, 8] or [B, 64]
        x = x.flatten(1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


# --------------------------------------------------------------------------- chars


def stdlib_text(n_chars: int = 200_000) -> str:
    """The first ``n_chars`` characters of the standard library's sorted ``*.py`` files.

    Non-printable characters become ``"?"`` so the vocabulary stays ASCII.
    """
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append("".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text))
        total += len(parts[-1])
        if total >= n_chars:
            break
    if not parts:
        raise RuntimeError(f"no .py files found under {root!r} for the character-level task")
    return "".join(parts)[:n_chars]


def char_data(n_chars: int = 200_000) -> tuple[Tensor, Tensor, int]:
    """``(train_ids, test_ids, vocab)``: the stdlib text as token ids, 90/10 split."""
    text = stdlib_text(n_chars)
    lut = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([lut[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(lut)


def char_batch(ids: Tensor, batch: int, ctx: int, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
    """Random windows ``x [batch, ctx]`` and next-character targets ``y [batch, ctx]``."""
    start = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=generator)
    rows = ids[start[:, None] + torch.arange(ctx + 1)]
    return rows[:, :-1], rows[:, 1:]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, h, T, T]
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        a = att.softmax(-1) @ v  # [B, h, T, C/h]
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token and position embeddings, pre-LN blocks, final LayerNorm, linear head."""

    def __init__(self, vocab: int, *, dim: int = 48, heads: int = 4, layers: int = 2,
                 ctx: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:  # idx: [B, T] -> logits [B, T, vocab]
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def upscaled_digits(seed: int = 0, size: int = 16) -> Dataset:
    """:func:`digits_data` bilinearly upscaled to ``[N, 1, size, size]``."""
    d = digits_data(seed)
    up = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
          for x in (d.x_train, d.x_test)]
    return Dataset(up[0], d.y_train, up[1], d.y_test)


class DigitsViT(nn.Module):
    """Patch embedding (4 x 4), learned positions, pre-LN blocks (no mask), mean pool, head."""

    def __init__(self, *, size: int = 16, patch: int = 4, dim: int = 48, heads: int = 4,
                 layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, causal=False) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 1, size, size] -> logits [B, classes]
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B, T, dim]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(1))


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy over every position (``logits [B, T, V]``)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------- teacher


def teacher_data(n: int = 2048, dim: int = 32, out: int = 8, *, seed: int = 0,
                 decay: float = 1.0, noise: float = 0.05) -> Dataset:
    """Inputs ``x ~ N(0, diag(j^-decay))``; targets ``W2 tanh(W1 x) + noise``; 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float32) ** (-decay / 2)
    x = torch.randn(n, dim, generator=g) * scale
    W1 = torch.randn(64, dim, generator=g) / math.sqrt(float((scale ** 2).sum()))
    W2 = torch.randn(out, 64, generator=g) / 8.0
    y = torch.tanh(x @ W1.T * 2.0) @ W2.T + noise * torch.randn(n, out, generator=g)
    cut = int(0.8 * n)
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:])


class TeacherStudent(nn.Module):
    """Student MLP ``dim -> 64 -> 64 -> out`` with tanh."""

    def __init__(self, dim: int = 32, out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
