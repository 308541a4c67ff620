"""``curvlens demo``: a digits CNN trained with the lens attached, a report every epoch.

The run is the lens's intended use: :class:`~curvlens.lens.CurvatureLens` in the training
loop (``step()`` after each backward), :meth:`~curvlens.lens.CurvatureLens.analyze` on a fixed
batch of training images after each epoch, the per-layer table printed, and the run written as
JSON (every epoch), JSON (last epoch), CSV and PNG figures. With ``optimizer="spectral-newton"``
the optimizer is :class:`curvlens.optim.SpectralNewton` at its default policy with the lens
attached: each hidden layer's exponent is the alpha the lens measured last when its interval is
narrow enough (Calvo, 2026, arXiv:2606.02596).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlens._progress import progress_bar, progress_write
from curvlens._tasks import DigitsCNN, digits_data
from curvlens.lens import CurvatureLens
from curvlens.report import plot, save_reports, table, to_csv, to_json

__all__ = ["DemoOptimizer", "DemoResult", "run_demo"]


class DemoOptimizer(str, Enum):
    ADAMW = "adamw"
    NEWTON = "spectral-newton"


@dataclass
class DemoResult:
    """What the demo produced: the files written, the lens history and the test accuracies."""

    files: dict[str, Path] = field(default_factory=dict)
    reports: list[Any] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _optimizer(kind: DemoOptimizer, model: nn.Module, lens: CurvatureLens,
               lr: float | None) -> torch.optim.Optimizer:
    if kind is DemoOptimizer.ADAMW:
        return torch.optim.AdamW(model.parameters(), lr=lr or 3e-3, weight_decay=0.01)
    from curvlens.optim.spectral_newton import SpectralNewton

    return SpectralNewton(model, lr=lr or 3e-3, lens=lens, auto_every=1)


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    return progress_bar(iterable, enabled=enabled, **kwargs)


def _write(printer: Callable[[str], Any] | None, progress: bool) -> Callable[[str], Any]:
    if printer is not None:
        return printer
    return progress_write if progress else print


def run_demo(
    *,
    epochs: int = 5,
    optimizer: DemoOptimizer | str = DemoOptimizer.ADAMW,
    out: str | Path = "curvlens-out",
    seed: int = 0,
    batch_size: int = 64,
    fixed_batch: int = 256,
    top_k: int = 20,
    lanczos_k: int = 20,
    bootstrap: int = 500,
    every: int = 10,
    lr: float | None = None,
    plots: bool = True,
    progress: bool = True,
    max_train: int | None = None,
    printer: Callable[[str], Any] | None = None,
) -> DemoResult:
    """Train the digits CNN for ``epochs`` epochs with the lens; print and write the reports.

    Args:
        epochs: training epochs (one analysis after each).
        optimizer: ``"adamw"`` or ``"spectral-newton"`` (``alpha="auto"`` from the lens).
        out: output directory (created).
        seed: seed of the split, the initialization and the batch order.
        batch_size: training batch size.
        fixed_batch: number of training images in the analysis batch.
        top_k, lanczos_k, bootstrap, every: lens settings (see :class:`CurvatureLens`).
        lr: learning rate (default 3e-3 for both: SpectralNewton's default policy makes its
            learning rate comparable to AdamW's).
        plots: write the PNG figures (needs matplotlib).
        progress: tqdm progress bars.
        max_train: use only this many training images (for quick tests).
        printer: where tables go (default: ``tqdm.write`` with progress bars, else ``print``).

    Returns:
        A :class:`DemoResult`.
    """
    kind = DemoOptimizer(optimizer) if not isinstance(optimizer, DemoOptimizer) else optimizer
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    say = _write(printer, progress)
    start = time.perf_counter()
    out = Path(out)
    data = digits_data(seed)
    x_train, y_train = data.x_train, data.y_train
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    torch.manual_seed(seed)
    model = DigitsCNN()
    loss_fn = nn.CrossEntropyLoss()
    lens = CurvatureLens(model, loss_fn, top_k=top_k, every=every, lanczos_k=lanczos_k,
                         analyze_options={"bootstrap": bootstrap})
    opt = _optimizer(kind, model, lens, lr)
    g = torch.Generator().manual_seed(seed + 1)
    fixed = torch.randperm(len(y_train), generator=g)[:fixed_batch]
    x_fixed, y_fixed = x_train[fixed], y_train[fixed]
    result = DemoResult()
    say(f"curvlens demo: digits CNN, {len(y_train)} training / {len(data.y_test)} test images, "
        f"{kind.value}, {epochs} epochs, analysis on {len(y_fixed)} fixed training images")
    with lens:
        if kind is DemoOptimizer.NEWTON:  # alpha="auto" needs a first measurement
            lens.analyze(x_fixed, y_fixed, epoch=-1)
        for epoch in range(epochs):
            model.train()
            batches = torch.randperm(len(y_train), generator=g).split(batch_size)
            bar = _progress(batches, progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            unit="batch")
            for idx in bar:
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                lens.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            report = lens.analyze(x_fixed, y_fixed, epoch=epoch)
            model.eval()
            with torch.no_grad():
                acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
            result.test_accuracy.append(acc)
            report.meta["test_accuracy"] = acc
            say(f"\nepoch {epoch + 1}/{epochs}: test accuracy {100 * acc:.1f}%")
            say(table(report))
    reports = [r for r in lens.history if r.epoch is not None and r.epoch >= 0]
    run_meta = {"task": "digits-cnn", "optimizer": kind.value, "seed": seed, "epochs": epochs,
                "test_accuracy": result.test_accuracy}
    files = {
        "run": save_reports(reports, out / "run.json", meta=run_meta),
        "report": to_json(reports[-1], out / "report.json"),
        "csv": to_csv(reports, out / "report.csv"),
    }
    if plots:
        for path in plot(reports[-1], out / "plots", history=reports):
            files[path.stem] = path
    result.files, result.reports = files, reports
    result.seconds = time.perf_counter() - start
    say(f"\ndone in {result.seconds:.0f} s; wrote:")
    for path in files.values():
        say(f"  {path}")
    return result
