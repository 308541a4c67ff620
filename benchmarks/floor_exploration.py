"""How many layers clear the half-batch noise floor, by training length and number of samples.

Cheap (gradients only, no Hessian-vector products): for each ``reproduce --full`` architecture,
train with the suite's optimizer and batches, and at a few checkpoints measure on ``N`` samples
the mean gradient ``G = (G1 + G2) / 2`` of two halves and the floor ``2 ||(G1 - G2) / 2||_2``.
A layer meets the criterion when at least ``max(5, ceil(W / 2))`` of its ``W`` window values
(top ``K``, cut at the gradient's numerical rank) lie above the floor, as in the trust flags.
Prints, per task, checkpoint and ``N``: train loss, the fraction of layers meeting it for
``K = 10`` and ``K = 20``, and the median count above the floor.

The ``-aug`` tasks train and measure the digits models under random one-pixel shifts
(:func:`curvlens._tasks.shifted`), so ``N`` can exceed the 1438 training images. Output:
``benchmarks/results/floor_exploration.txt``.

With ``--reproduce TASK N [N ...]`` it measures instead the model and data that
``curvlens reproduce --full`` builds for ``TASK`` (trained as there, fixed data drawn for the
largest ``N``), on the first ``N`` samples of that data (the language model: ``N // 16``
windows): how many layers have at least 5 of their top 10 singular values above the floor, and
the count per layer. That is what chose ``FULL_SAMPLES`` in ``curvlens._reproduce``.

Run: ``nice -n 10 python benchmarks/floor_exploration.py [task ...]`` or
``nice -n 10 python benchmarks/floor_exploration.py --reproduce digits-vit 8192 32768``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from torch import nn

from curvlens import _tasks as T
from curvlens import _zoo as Z
from curvlens._batches import FixedData
from curvlens._fixed_gradients import mean_gradients, noise_norms
from curvlens.layers import find_layers


def _count(G: torch.Tensor, noise: float, K: int) -> tuple[int, int]:
    """``(values above the floor, window W)`` in the top-``K`` window cut at numerical rank."""
    s = torch.linalg.svdvals(G.double())[:K]
    tol = max(G.shape) * torch.finfo(torch.float32).eps * float(s[0])
    keep = s > tol
    return int((keep & (s > 2 * noise)).sum()), int(keep.sum())


def _measure(model: nn.Module, loss_fn, batches: list) -> dict[str, tuple[torch.Tensor, float]]:
    found = find_layers(model, None, on_unsupported="skip")
    half = len(batches) // 2
    g1 = mean_gradients(model, loss_fn, FixedData(batches[:half], single=False), found)
    g2 = mean_gradients(model, loss_fn, FixedData(batches[half:2 * half], single=False), found)
    noise = noise_norms(g1, g2)
    return {n: ((g1[n] + g2[n]) / 2, noise[n]) for n in noise}


def _row(task: str, step: int, n: int, loss: float, res: dict, seconds: float) -> str:
    out = [f"{task:<14}{step:>6}{n:>7}{loss:>8.3f}"]
    for K in (10, 20):
        counts = [_count(G, noise, K) for G, noise in res.values()]
        ok = sum(a >= max(5, math.ceil(w / 2)) for a, w in counts)
        out.append(f"{ok:>4}/{len(counts):<3}{statistics.median(a for a, _ in counts):>5.0f}")
    return "".join(out) + f"{seconds:>6.1f}"


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list:
    size = min(size, len(x) // 2)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _sampler(x: torch.Tensor, y: torch.Tensor, batch: int, augment: bool = False):
    """Random training batches (under random one-pixel shifts with ``augment``)."""
    g = torch.Generator().manual_seed(1)

    def draw() -> tuple:
        idx = torch.randint(0, len(y), (batch,), generator=g)
        return (T.shifted(x[idx], g) if augment else x[idx]), y[idx]

    return draw


def _digits(model_fn, augment: bool = False):
    """Digits; with ``augment`` trained on, and measured on, the shifted training split."""
    data = T.digits_data(0)
    x, y, n = data.x_train, data.y_train, len(data.y_train)

    def pool(N: int) -> list:
        if not augment:
            return _chunks(x[:N], y[:N], N // 2)
        gp = torch.Generator().manual_seed(5)
        idx = torch.randint(0, n, (N,), generator=gp)
        return _chunks(T.shifted(x[idx], gp), y[idx], 2048)

    sizes = [1438, 8192, 32768] if augment else [512, n - n % 2]
    return model_fn(), nn.CrossEntropyLoss(), _sampler(x, y, 64, augment), pool, sizes


def _teacher():
    data = T.teacher_data(n=81920, seed=0)
    x, y = data.x_train, data.y_train
    return (Z.DeepMLP(depth=10), nn.MSELoss(), _sampler(x, y, 128),
            lambda N: _chunks(x[:N], y[:N], 1024), [512, 4096, 32768])


def _gpt():
    train, _, vocab = T.char_data(400_000)
    g = torch.Generator().manual_seed(1)
    fixed = T.char_batch(train, 4096, 64, torch.Generator().manual_seed(7))

    def pool(N: int) -> list:
        return _chunks(fixed[0][:N], fixed[1][:N], 64)

    return (Z.GPT(vocab, dim=48, depth=5, ctx=64), T.lm_loss,
            lambda: T.char_batch(train, 32, 64, g), pool, [32, 256, 1024, 4096])


def _mlp() -> nn.Module:
    return Z.DeepMLP(dim=64, out=10, width=128, depth=6)


def _vit() -> nn.Module:
    return Z.ViTDigits(dim=32, depth=4)


TASKS = {
    "teacher-mlp": (_teacher, 1e-3, [50, 200, 500, 2000]),
    "digits-mlp": (lambda: _digits(_mlp), 2e-3, [25, 50, 100, 200, 1000]),
    "digits-cnn": (lambda: _digits(T.DigitsCNN), 3e-3, [25, 50, 100, 200, 1000]),
    "digits-resnet": (lambda: _digits(Z.ResNetDigits), 2e-3, [25, 50, 100, 200, 1000]),
    "digits-vit": (lambda: _digits(_vit), 1e-3, [25, 50, 100, 200, 1000]),
    "digits-cnn-aug": (lambda: _digits(T.DigitsCNN, True), 3e-3, [200, 1000, 3000]),
    "digits-mlp-aug": (lambda: _digits(_mlp, True), 2e-3, [200, 1000, 3000]),
    "digits-resnet-aug": (lambda: _digits(Z.ResNetDigits, True), 2e-3, [200, 1000, 3000]),
    "stdlib-gpt": (_gpt, 2e-3, [50, 100, 200, 400, 1000]),
}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print(f"{'task':<14}{'step':>6}{'N':>7}{'loss':>8}{'K=10 ok med':>12}{'K=20 ok med':>12}"
          f"{'s':>6}")
    for name in names:
        build, lr, checkpoints = TASKS[name]
        torch.manual_seed(0)
        model, loss_fn, train_batch, pool, sizes = build()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        step = 0
        for stop in checkpoints:
            model.train()
            while step < stop:
                x, y = train_batch()
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            model.eval()
            for N in sizes:
                t0 = time.perf_counter()
                batches = pool(N)
                with torch.no_grad():
                    loss = sum(float(loss_fn(model(x), y)) * len(x) for x, y in batches) / N
                res = _measure(model, loss_fn, batches)
                print(_row(name, step, N, loss, res, time.perf_counter() - t0), flush=True)


def reproduce_check(task: str, sizes: list[int]) -> None:
    """Layers of a ``reproduce --full`` task with K/2 of K = 10 values above the floor, by N."""
    from curvlens._reproduce import FULL_TASKS

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, loss_fn, data = FULL_TASKS[task](1.0, 0, max(sizes))
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    print(f"{task}: trained and drew {len(x)} samples in {time.perf_counter() - t0:.0f} s")
    model.eval()
    size = 16 if task == "stdlib-gpt" else 256
    for n in sizes:
        n = n // 16 if task == "stdlib-gpt" else n
        t0 = time.perf_counter()
        res = _measure(model, loss_fn, _chunks(x[:n], y[:n], size))
        counts = [_count(G, noise, 10)[0] for G, noise in res.values()]
        print(f"{task} N={n} ok={sum(c >= 5 for c in counts)}/{len(counts)} counts={counts} "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reproduce"]:
        reproduce_check(sys.argv[2], [int(n) for n in sys.argv[3:]])
    else:
        main(sys.argv[1:] or list(TASKS))
