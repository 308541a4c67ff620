"""Overhead of curvlens's capture hooks on a training step.

Times a plain training step (forward, backward, SGD step) and the same step inside
``curvlens.hooks.Capture`` recording every layer's input and output gradient (the records are
cleared each step, as the lens does), for a small CNN and a small attention model. Prints the
ratio captured / plain; the target is <= 1.3x. The last column adds the Kronecker-factor
accumulation of that step, which the lens does only on its every-N-th step.

Run: ``python benchmarks/bench_capture.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from curvlens.hooks import Capture
from curvlens.kronecker import FactorAccumulator, batch_scale


class Attention(nn.Module):
    def __init__(self, d: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        q, k, v = self.qkv(x).chunk(3, -1)
        att = (q @ k.mT / q.shape[-1] ** 0.5).softmax(-1)
        x = x + self.proj(att @ v)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def time_steps(model, x, y, steps, capture=None, factors=False) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    acc = FactorAccumulator(capture.layers) if (capture is not None and factors) else None
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        loss.backward()
        if capture is not None:
            if acc is not None:
                for name, record in capture.records.items():
                    acc.add_record(name, record, scale=batch_scale(loss_fn, x.shape[0]),
                                   samples=x.shape[0])
            capture.clear()
        opt.step()
        opt.zero_grad()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = {
        "cnn": (cnn(), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))),
        "attention": (Attention(), torch.randn(32, 32, 64), torch.randint(0, 10, (32,))),
    }
    print(f"{'model':<10} {'plain ms':>9} {'capture ms':>11} {'ratio':>6} {'+factors':>9}")
    for name, (model, x, y) in tasks.items():
        plain = time_steps(model, x, y, args.steps)
        with Capture(model) as cap:
            captured = time_steps(model, x, y, args.steps, cap)
            with_factors = time_steps(model, x, y, max(5, args.steps // 3), cap, factors=True)
        plain2 = time_steps(model, x, y, args.steps)  # guard against drift
        base = min(plain, plain2)
        print(f"{name:<10} {1e3 * base:9.2f} {1e3 * captured:11.2f} {captured / base:6.2f}x "
              f"{with_factors / base:8.2f}x")
    print("target: capture ratio <= 1.30x (factor accumulation runs only every N steps)")


if __name__ == "__main__":
    main()
