"""A small GPT on the Python standard library's own source, trained with CurvatureLens attached.

Run: ``python examples/transformer_lm.py [--steps 300] [--d 64] [--blocks 2]``. The text is a few
modules of the standard library read from disk (nothing is downloaded); the model is a
character-level GPT built from ``nn.MultiheadAttention`` with its head tied to the token
embedding. curvlens measures every weight matrix: the attention's q, k and v (reported as
``...in_proj_weight.q`` etc.), ``out_proj``, the MLPs, the position embedding and, once, the tied
embedding/head (with both names in its ``aliases``).
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from curvlens.lens import CurvatureLens  # curvlens
from curvlens.report import table  # curvlens

MODULES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "colorsys.py")


def stdlib_text(limit: int) -> str:
    """Up to ``limit`` characters of standard-library source, read from this Python's install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in MODULES
                   if (root / name).is_file())
    return text[:limit]


class Block(nn.Module):
    """Pre-norm causal self-attention and an MLP, each with a residual connection."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        causal = torch.triu(torch.full((T, T), -math.inf, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``blocks`` blocks, a head tied to the token embedding."""

    def __init__(self, vocab: int, d: int, blocks: int, heads: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, vocab]
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln_f(self.blocks(self.wte(tokens) + self.wpe(pos))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy, a mean over every position of the batch."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lanczos-k", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    text = stdlib_text(args.chars)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    g = torch.Generator().manual_seed(0)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(data) - args.context - 1, (size,), generator=g)
        idx = start[:, None] + torch.arange(args.context + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    model = GPT(len(chars), args.d, args.blocks, args.heads, args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_fixed, y_fixed = batch(args.batch)  # a fixed batch for the measurement

    lens = CurvatureLens(model, lm_loss, top_k=args.top_k, every=args.every,  # curvlens
                         lanczos_k=args.lanczos_k, analyze_options={"bootstrap": args.bootstrap},
                         on_unsupported="skip")  # LayerNorm scales and biases are vectors
    with lens:  # curvlens: hooks on, removed on exit
        for step in range(args.steps):
            xb, yb = batch(args.batch)
            loss = lm_loss(model(xb), yb)
            loss.backward()
            lens.step()  # curvlens: records every `every` steps
            opt.step()
            opt.zero_grad()
            if step % max(1, args.steps // 5) == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}")
    report = lens.analyze(x_fixed, y_fixed, epoch=0)  # curvlens
    print(table(report))
    tied = report.layers["wte"]
    print(f"tied embedding/head measured once as {tied.name!r}, aliases {tied.aliases}")


if __name__ == "__main__":
    main()
