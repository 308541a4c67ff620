"""AdamW vs Spectral Newton (its default policy, alone and with the lens) on the digits CNN.

Run: ``python examples/compare_optimizers.py [--epochs 5] [--seed 0]``. Each run trains the same
initialization on the same batches; the lens measures alpha every epoch, and the run with the
lens attached feeds each layer's exponent to the optimizer (when its interval is narrow). Prints
test accuracy per epoch and the measured alphas. ``benchmarks/bench_optim.py`` is the tuned,
multi-seed comparison with torch.optim.Muon.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from curvlens._tasks import DigitsCNN, digits_data
from curvlens.lens import CurvatureLens
from curvlens.optim.spectral_newton import SpectralNewton


def run(name: str, epochs: int, seed: int, data) -> list[float]:
    torch.manual_seed(seed)
    model = DigitsCNN()
    loss_fn = nn.CrossEntropyLoss()
    lens = CurvatureLens(model, loss_fn, top_k=12, every=20, lanczos_k=0,
                         analyze_options={"bootstrap": 0})
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    elif name == "sn":
        opt = SpectralNewton(model, lr=3e-3)  # the default policy
    else:
        opt = SpectralNewton(model, lr=3e-3, lens=lens, auto_every=1)
    g = torch.Generator().manual_seed(seed + 1)
    x_fixed, y_fixed = data.x_train[:256], data.y_train[:256]
    accs = []
    with lens:
        lens.analyze(x_fixed, y_fixed, epoch=-1)  # a first alpha for the auto run
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(data.y_train), generator=g).split(64):
                loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
                lens.step()
                opt.step()
                opt.zero_grad()
            lens.analyze(x_fixed, y_fixed, epoch=epoch)
            model.eval()
            with torch.no_grad():
                accs.append(float((model(data.x_test).argmax(1) == data.y_test).float().mean()))
    alphas = {k: round(v, 2) for k, v in lens.latest_alphas().items()}
    print(f"{name:<10} test acc by epoch {[f'{100 * a:.1f}' for a in accs]}  alpha {alphas}")
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = digits_data(args.seed)
    for name in ("adamw", "sn", "sn-lens"):
        run(name, args.epochs, args.seed, data)


if __name__ == "__main__":
    main()
