"""``curvlens demo``: a digits CNN trained with the lens attached, a report every epoch.

The run is the lens's intended use: :class:`~curvlens.lens.CurvatureLens` in the training
loop (``step()`` after each backward), :meth:`~curvlens.lens.CurvatureLens.analyze` on fixed
data after each epoch, the per-layer table printed, and the run written as JSON (every epoch),
JSON (last epoch), CSV and PNG figures. The fixed data is measured as a careful user would: the
gradient, its singular values and the noise floor on 16384 training images under random
one-pixel shifts (after five epochs, the layers' top ``K = 10`` gradient singular values need
about that many samples to clear the half-batch noise floor; 256 images leave every layer
untrusted), the curvatures on the first two batches (512 samples; the ``curvature_noise`` flag
checks that they were enough). With ``optimizer="spectral-newton"``
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
from curvlens._tasks import DigitsCNN, digits_data, shifted
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


def _analysis_data(x: torch.Tensor, y: torch.Tensor, samples: int, batch: int,
                   generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` training images ``[B, 1, 8, 8]`` (each drawn about equally often), each moved
    by a random one-pixel shift, in batches of ``batch``."""
    idx = torch.cat([torch.randperm(len(y), generator=generator)
                     for _ in range(-(-samples // len(y)))])[:samples]
    return list(zip(shifted(x[idx], generator).split(batch), y[idx].split(batch)))


def _analyze_args(fixed: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, Any]:
    """``lens.analyze``'s data: the batches, or the inputs and targets of a single batch."""
    return fixed[0] if len(fixed) == 1 else (fixed, None)


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
    samples: int = 16384,
    fixed_batch: int = 256,
    curvature_batches: int = 2,
    top_k: int = 10,
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
        samples: number of analysis samples (training images under random one-pixel shifts):
            the gradient, its singular values and the noise floor are measured on all of them.
        fixed_batch: samples per analysis batch.
        curvature_batches: the curvatures (``h_k``, Lanczos, Kronecker factors) are measured on
            the first this many analysis batches (all of them when there are fewer; at least 2
            unless the analysis is a single batch).
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
    for name, value in (("samples", samples), ("fixed_batch", fixed_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
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
    fixed = _analysis_data(x_train, y_train, samples, fixed_batch,
                           torch.Generator().manual_seed(seed + 2))
    options: dict[str, Any] = {"bootstrap": bootstrap}
    n_curv = min(curvature_batches, len(fixed))
    if len(fixed) > 1:
        options["curvature_batches"] = n_curv
    lens = CurvatureLens(model, loss_fn, top_k=top_k, every=every, lanczos_k=lanczos_k,
                         analyze_options=options)
    opt = _optimizer(kind, model, lens, lr)
    g = torch.Generator().manual_seed(seed + 1)
    result = DemoResult()
    say(f"curvlens demo: digits CNN, {len(y_train)} training / {len(data.y_test)} test images, "
        f"{kind.value}, {epochs} epochs")
    say(f"analysis after each epoch, K={top_k}: the gradient on {samples} training images under "
        f"random one-pixel shifts ({len(fixed)} batches of {len(fixed[0][1])}), the curvatures "
        f"on the first {sum(len(b[1]) for b in fixed[:n_curv])}")
    with lens:
        if kind is DemoOptimizer.NEWTON:  # alpha="auto" needs a first measurement
            lens.analyze(*_analyze_args(fixed), epoch=-1)
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
            report = lens.analyze(*_analyze_args(fixed), epoch=epoch)
            model.eval()
            with torch.no_grad():
                acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
            result.test_accuracy.append(acc)
            report.meta["test_accuracy"] = acc
            say(f"\nepoch {epoch + 1}/{epochs}: test accuracy {100 * acc:.1f}%")
            say(table(report))
    reports = [r for r in lens.history if r.epoch is not None and r.epoch >= 0]
    run_meta = {"task": "digits-cnn", "optimizer": kind.value, "seed": seed, "epochs": epochs,
                "test_accuracy": result.test_accuracy, "analysis_samples": samples,
                "analysis_shifted": True}
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
