"""Measure the per-layer curvature of a saved checkpoint (no training loop needed).

Run: ``python examples/analyze_checkpoint.py [CHECKPOINT.pt] [--out report.json]``. Without a
checkpoint it first trains the digits CNN for two epochs and saves one, so the script runs as is.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from curvlens._tasks import DigitsCNN, digits_data
from curvlens.lens import CurvatureLens
from curvlens.report import table, to_json


def make_checkpoint(path: str) -> None:
    data = digits_data(0)
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):
        for idx in torch.randperm(len(data.y_train)).split(64):
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            opt.zero_grad()
    torch.save(model.state_dict(), path)
    print(f"trained the digits CNN for 2 epochs and saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="digits_cnn.pt")
    parser.add_argument("--out", default="checkpoint_report.json")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if not os.path.exists(args.checkpoint):
        make_checkpoint(args.checkpoint)

    model = DigitsCNN()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    data = digits_data(0)
    x, y = data.x_train[: args.batch], data.y_train[: args.batch]

    lens = CurvatureLens(model, nn.CrossEntropyLoss(), top_k=20)
    report = lens.analyze(x, y)  # no `with lens:` needed for a one-off measurement
    print(table(report))
    for name, rep in report.layers.items():
        print(f"{name}: alpha budget b(chi)+b(rho_d)+b(rho_A)+b(lam_d)+b(lam_A) = "
              f"{rep.alpha_budget:.4f} vs alpha {rep.alpha:.4f}")
    print("wrote", to_json(report, args.out))


if __name__ == "__main__":
    main()
