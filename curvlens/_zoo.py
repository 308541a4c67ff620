"""Architectures of ``curvlens reproduce --full``, built only from Linear, Conv2d and Embedding.

Every weight matrix is a plain module (attention has separate ``q``, ``k``, ``v`` and ``proj``
Linear layers), so each one is measured on its own whatever the support for fused modules:

* :class:`ResNetDigits`: a small residual network (no normalization) on 8x8 digits;
* :class:`ViTDigits`: a vision transformer on 2x2 patches of the digits;
* :class:`GPT`: a GPT-style causal language model (untied head) for characters;
* :class:`DeepMLP`: a tanh MLP, the student of the synthetic teacher task.

Attention is written out (``softmax(q k^T / sqrt(d)) v``) because exact Hessian-vector products
need a double backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNetDigits", "ViTDigits", "GPT", "DeepMLP"]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.short = nn.Conv2d(cin, cout, 1, stride=stride) if stride > 1 or cin != cout else None
        with torch.no_grad():
            self.conv2.weight.mul_(0.5)  # keeps the un-normalized residual stream stable

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.short is None else self.short(x)
        return F.relu(skip + self.conv2(F.relu(self.conv1(x))))


class ResNetDigits(nn.Module):
    """stem conv, three stages of two residual blocks (16, 32, 64 channels), linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(1, w, 3, padding=1)
        self.blocks = nn.Sequential(
            _Residual(w, w, 1), _Residual(w, w, 1),
            _Residual(w, 2 * w, 2), _Residual(2 * w, 2 * w, 1),
            _Residual(2 * w, 4 * w, 2), _Residual(4 * w, 4 * w, 1),
        )
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 1, 8, 8]
        x = self.blocks(F.relu(self.stem(x)))  # [B, 4w, 2, 2]
        return self.head(x.mean(dim=(2, 3)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.heads, -1).transpose(1, 2)
                   for f in (self.q, self.k, self.v))  # [B, h, T, C/h]
        att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, h, T, T]
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        out = att.softmax(-1) @ v  # [B, h, T, C/h]
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    """Pre-LN transformer block: attention, then an MLP with up- and down-projections."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, causal)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ViTDigits(nn.Module):
    """2x2 patches of an 8x8 digit (16 tokens) -> Linear patch embedding + position embedding,
    ``depth`` bidirectional blocks, mean pooling, linear head."""

    def __init__(self, dim: int = 48, heads: int = 4, depth: int = 5, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.pos = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, causal=False) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 1, 8, 8]
        B = x.shape[0]
        p = x.reshape(B, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(B, 16, 4)  # [B, 16, 4]
        h = self.patch(p) + self.pos(torch.arange(16, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(dim=1))


class GPT(nn.Module):
    """Token and position embeddings, ``depth`` causal blocks, final LayerNorm, untied head."""

    def __init__(self, vocab: int, *, dim: int = 64, heads: int = 4, depth: int = 6,
                 ctx: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, causal=True) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:  # idx: [B, T] -> logits [B, T, vocab]
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


class DeepMLP(nn.Module):
    """``dim -> width -> ... -> out`` with tanh (``depth`` Linear layers)."""

    def __init__(self, dim: int = 32, out: int = 8, width: int = 96, depth: int = 5) -> None:
        super().__init__()
        sizes = [dim] + [width] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, dim] or [B, 1, 8, 8] (flattened)
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)
