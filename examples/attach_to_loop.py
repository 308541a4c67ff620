"""Attach CurvatureLens to a training loop you already have (a DataLoader loop on digits).

Run: ``python examples/attach_to_loop.py [--epochs 3] [--out curvlens-example]``. The lines
marked ``# curvlens`` are all it takes; the rest is an ordinary PyTorch loop.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlens.lens import CurvatureLens  # curvlens
from curvlens.report import plot, save_reports, table  # curvlens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="curvlens-example")
    args = parser.parse_args()

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    loader = DataLoader(TensorDataset(X[:1500], y[:1500]), batch_size=64, shuffle=True)
    x_fixed, y_fixed = X[:256], y[:256]  # a fixed batch for the end-of-epoch measurement

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    lens = CurvatureLens(model, loss_fn, top_k=20, every=10)  # curvlens
    with lens:  # curvlens: hooks on, removed on exit
        for epoch in range(args.epochs):
            for xb, yb in loader:
                loss = loss_fn(model(xb), yb)
                loss.backward()
                lens.step()  # curvlens: cheap, records every 10 steps
                opt.step()
                opt.zero_grad()
            report = lens.analyze(x_fixed, y_fixed, epoch=epoch)  # curvlens
            print(table(report), end="\n\n")
    print("alpha per layer, last epoch:", {k: round(v, 3) for k, v in lens.latest_alphas().items()})
    print("wrote", save_reports(lens.history, f"{args.out}/run.json"))
    for path in plot(lens.history[-1], f"{args.out}/plots", history=lens.history):
        print("wrote", path)


if __name__ == "__main__":
    main()
