"""``curvlens reproduce``: the paper-style table across several architectures and data sets.

Trains each task briefly, analyzes every supported layer on a fixed batch with
:class:`~curvlens.lens.CurvatureLens` (with ``full``: the gradient on many samples, given as a
list of batches and measured as their mean, the curvatures on its first batches), and prints
one row per layer (alpha, gamma, s, alpha*gamma, transfer error), alpha by layer type, and the
median transfer error over all layers, the headline number of "Spectral Asymptotics of Neural
Network Loss Landscapes: An Exact Decomposition of the Curvature Exponent" (Calvo, 2026,
arXiv:2606.02596: ~2% over 93 layers, alpha ~ 2 for convolutions, ~1-1.4 for transformer
layers).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlens import _tasks as T
from curvlens import _zoo as Z
from curvlens._table import _num, _pct
from curvlens.lens import CurvatureLens
from curvlens.report import save_reports

__all__ = ["TASKS", "FULL_TASKS", "FULL_SAMPLES", "FULL_CURVATURE", "run_reproduce",
           "reproduce_table"]


def _train(model: nn.Module, loss_fn: Callable, batches: Callable[[], Any], steps: int,
           lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        x, y = batches()
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _class_task(model_fn: Callable[[], nn.Module], scale: float, seed: int, fixed: int,
                lr: float, steps: int = 150) -> tuple[nn.Module, Callable, tuple]:
    data = T.digits_data(seed)
    torch.manual_seed(seed)
    model = model_fn()
    g = torch.Generator().manual_seed(seed + 1)
    n = len(data.y_train)

    def batches() -> tuple:
        idx = torch.randint(0, n, (64,), generator=g)
        return data.x_train[idx], data.y_train[idx]

    loss_fn = nn.CrossEntropyLoss()
    _train(model, loss_fn, batches, int(steps * scale), lr)
    idx = torch.randperm(n, generator=g)[:fixed]
    return model, loss_fn, (data.x_train[idx], data.y_train[idx])


def _digits_cnn(scale: float, seed: int, fixed: int) -> tuple:
    return _class_task(T.DigitsCNN, scale, seed, fixed, 3e-3)


def _digits_mlp(scale: float, seed: int, fixed: int) -> tuple:
    return _class_task(T.DigitsMLP, scale, seed, fixed, 3e-3)


def _chars(scale: float, seed: int, fixed: int) -> tuple:
    train, _, vocab = T.char_data(100_000)
    torch.manual_seed(seed)
    model = T.CharTransformer(vocab, ctx=32)
    g = torch.Generator().manual_seed(seed + 1)
    _train(model, T.lm_loss, lambda: T.char_batch(train, 16, 32, g), int(200 * scale), 3e-3)
    return model, T.lm_loss, T.char_batch(train, max(2, fixed // 32), 32, g)


def _teacher(scale: float, seed: int, fixed: int) -> tuple:
    data = T.teacher_data(seed=seed)
    torch.manual_seed(seed)
    model = T.TeacherStudent()
    g = torch.Generator().manual_seed(seed + 1)
    n = len(data.y_train)

    def batches() -> tuple:
        idx = torch.randint(0, n, (64,), generator=g)
        return data.x_train[idx], data.y_train[idx]

    loss_fn = nn.MSELoss()
    _train(model, loss_fn, batches, int(300 * scale), 3e-3)
    return model, loss_fn, (data.x_train[:fixed], data.y_train[:fixed])


#: task name -> builder ``(scale, seed, fixed_batch) -> (model, loss_fn, (x, y))``
TASKS: dict[str, Callable[[float, int, int], tuple]] = {
    "digits-cnn": _digits_cnn,
    "digits-mlp": _digits_mlp,
    "chars": _chars,
    "teacher": _teacher,
}


def _chunks(x: Any, y: Any, size: int) -> list[tuple[Any, Any]]:
    """``(x, y)`` as a list of batches of ``size`` (at most half the samples, so the noise floor
    compares two halves of the batches)."""
    size = max(1, min(size, len(x) // 2))
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _full_digits(model_fn: Callable[[], nn.Module], lr: float, steps: int = 1000) -> Callable:
    """A digits model trained on, and measured on, the training split under random one-pixel
    shifts (:func:`curvlens._tasks.shifted`): ``fixed`` fresh draws of the augmented split."""

    def build(scale: float, seed: int, fixed: int) -> tuple:
        data = T.digits_data(seed)
        torch.manual_seed(seed)
        model = model_fn()
        g = torch.Generator().manual_seed(seed + 1)
        x, y, n = data.x_train, data.y_train, len(data.y_train)

        def batches() -> tuple:
            idx = torch.randint(0, n, (64,), generator=g)
            return T.shifted(x[idx], g), y[idx]

        loss_fn = nn.CrossEntropyLoss()
        _train(model, loss_fn, batches, int(steps * scale), lr)
        g.manual_seed(seed + 2)
        idx = torch.randint(0, n, (fixed,), generator=g)
        return model, loss_fn, _chunks(T.shifted(x[idx], g), y[idx], 256)

    return build


def _full_gpt(scale: float, seed: int, fixed: int) -> tuple:
    train, _, vocab = T.char_data(200_000)
    torch.manual_seed(seed)
    model = Z.GPT(vocab, dim=48, depth=5, ctx=64)
    g = torch.Generator().manual_seed(seed + 1)
    _train(model, T.lm_loss, lambda: T.char_batch(train, 32, 64, g), int(1000 * scale), 2e-3)
    return model, T.lm_loss, _chunks(*T.char_batch(train, max(2, fixed // 16), 64, g), 16)


def _full_teacher(scale: float, seed: int, fixed: int) -> tuple:
    data = T.teacher_data(n=5 * max(8192, fixed) // 4, seed=seed)  # a training split >= fixed
    torch.manual_seed(seed)
    model = Z.DeepMLP(depth=10)
    g = torch.Generator().manual_seed(seed + 1)
    n = len(data.y_train)

    def batches() -> tuple:
        idx = torch.randint(0, n, (128,), generator=g)
        return data.x_train[idx], data.y_train[idx]

    _train(model, nn.MSELoss(), batches, int(2000 * scale), 1e-3)
    return model, nn.MSELoss(), _chunks(data.x_train[:fixed], data.y_train[:fixed], 1024)


def _digits_deep_mlp() -> nn.Module:
    return Z.DeepMLP(dim=64, out=10, width=128, depth=6)


#: The ``--full`` suite: 6 architectures (CNN, ResNet, ViT, GPT-style LM, two MLPs) on 3 data
#: sets, 96 weight matrices. Builders return the fixed data as a list of batches, measured as
#: the mean over all samples. ``fixed`` counts images / teacher samples; the language model
#: uses ``fixed // 16`` windows of 64 characters.
FULL_TASKS: dict[str, Callable[[float, int, int], tuple]] = {
    "teacher-mlp": _full_teacher,
    "digits-mlp": _full_digits(_digits_deep_mlp, 2e-3),
    "digits-cnn": _full_digits(T.DigitsCNN, 3e-3),
    "digits-resnet": _full_digits(Z.ResNetDigits, 2e-3),
    "digits-vit": _full_digits(lambda: Z.ViTDigits(dim=32, depth=4), 1e-3),
    "stdlib-gpt": _full_gpt,
}

#: Samples of each ``--full`` task's gradient (``fixed_batch`` overrides them): enough for most
#: layers to have K/2 of their top-10 singular values above the noise floor, which falls only as
#: 1/sqrt(N) (``benchmarks/results/floor_exploration.txt``, gradients only). The gradient costs
#: one forward and backward pass per sample.
FULL_SAMPLES: dict[str, int] = {
    "teacher-mlp": 32768, "digits-mlp": 131072, "digits-cnn": 524288, "digits-resnet": 131072,
    "digits-vit": 65536, "stdlib-gpt": 131072,
}
#: Samples (the first batches of the fixed data) on which ``--full`` measures each task's
#: curvatures (``h_k``, Lanczos, Kronecker factors; ``curvature_batches`` of
#: :func:`curvlens.measure.analyze_model`). They cost about ``K`` plus two to three times
#: ``lanczos_k`` forward and backward passes per sample and matrix; each layer's
#: ``curvature_noise`` says whether they were enough.
FULL_CURVATURE: dict[str, int] = {
    "teacher-mlp": 4096, "digits-mlp": 4096, "digits-cnn": 4096, "digits-resnet": 3072,
    "digits-vit": 1024, "stdlib-gpt": 1024,
}
#: The fit window ``K`` of ``--full`` (the paper used 20; see ``run_reproduce``).
FULL_TOP_K = 10


def reproduce_table(results: dict[str, Any]) -> str:
    """The paper-style table of ``{task: Report}``: rows, alpha by type, median error."""
    head = f"{'task':<11}{'layer':<18}{'kind':<10}{'alpha':>6}{'gamma':>6}{'s':>6}" \
           f"{'a*g':>6}{'err':>7}"
    lines = [head, "-" * len(head)]
    by_kind: dict[str, list[float]] = {}
    errors: list[float] = []
    for task, report in results.items():
        for name, rep in report.layers.items():
            short = name if len(name) <= 17 else "~" + name[-16:]
            lines.append(f"{task:<11}{short:<18}{rep.kind:<10}{_num(rep.alpha):>6}"
                         f"{_num(rep.gamma):>6}{_num(rep.s_rayleigh):>6}"
                         f"{_num(rep.predicted_s):>6}{_pct(rep.transfer_error_rayleigh):>7}")
            if math.isfinite(rep.alpha):
                by_kind.setdefault(rep.kind, []).append(rep.alpha)
            if math.isfinite(rep.transfer_error_rayleigh):
                errors.append(rep.transfer_error_rayleigh)
    lines.append("-" * len(head))
    lines.append("alpha by layer type (median [min, max], n):")
    for kind, alphas in by_kind.items():
        lines.append(f"  {kind:<10} {statistics.median(alphas):.2f} "
                     f"[{min(alphas):.2f}, {max(alphas):.2f}]  n={len(alphas)}")
    med = statistics.median(errors) if errors else math.nan
    lines.append(f"median transfer error |s - alpha*gamma|/s over {len(errors)} layers: "
                 f"{_pct(med)}  (paper: ~2% over 93 layers)")
    return "\n".join(lines)


def run_reproduce(
    *,
    tasks: list[str] | None = None,
    full: bool = False,
    scale: float = 1.0,
    seed: int = 0,
    fixed_batch: int | None = None,
    top_k: int | None = None,
    lanczos_k: int | None = None,
    bootstrap: int = 200,
    out: str | Path | None = None,
    printer: Callable[[str], Any] = print,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train and analyze each task; print the table; optionally write JSON, table and figure.

    Args:
        tasks: names from :data:`TASKS` (or :data:`FULL_TASKS` with ``full``; default: all).
        full: the paper-style suite (6 architectures, 3 data sets, 96 layers), trained
            longer, the gradient measured on many samples (:data:`FULL_SAMPLES`, as a list of
            batches) and the curvatures on its first :data:`FULL_CURVATURE`, with the published
            numbers beside the measured ones; 11 minutes measured on 2 CPU cores shared with
            other jobs (one torch thread).
        scale: multiplies the training steps.
        seed: seed of data, initialization and batches.
        fixed_batch: samples measured per task (default 256; with ``full``, the per-task
            :data:`FULL_SAMPLES`; the curvatures then use at most :data:`FULL_CURVATURE`).
        top_k, lanczos_k, bootstrap: analysis settings (``top_k`` default 20, 10 with ``full``:
            a window the noise floor of the affordable samples leaves room for, where the paper
            used 20; ``lanczos_k`` default 0, 8 with ``full``: Lanczos gives the independent s
            and the alignment score).
        out: directory for ``reproduce.json`` (every report, the summary numbers and the time
            taken), ``reproduce.txt`` (the table) and, with ``full``, ``reproduce.png``
            (``None``: write nothing).
        printer: where progress lines and the table go.
        progress: a tqdm bar over the tasks (``None``: only on a terminal).

    Returns:
        ``{task: Report}``.
    """
    from tqdm.auto import tqdm

    from curvlens._paper_table import paper_table

    catalog = FULL_TASKS if full else TASKS
    names = list(catalog) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in catalog]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(catalog)}"
                         + ("" if full else " (or pass full=True / --full for the full suite)"))
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    samples = {t: fixed_batch or (FULL_SAMPLES[t] if full else 256) for t in names}
    curvature = {t: min(FULL_CURVATURE[t], samples[t]) for t in names} if full else {}
    top_k = (FULL_TOP_K if full else 20) if top_k is None else top_k
    lanczos_k = (8 if full else 0) if lanczos_k is None else lanczos_k
    settings = dict(scale=scale, seed=seed, fixed_batch=fixed_batch, samples=samples,
                    top_k=top_k, lanczos_k=lanczos_k, curvature=curvature)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    bar = tqdm(names, desc="reproduce", unit="task", disable=None if progress is None
               else not progress)
    for task in bar:
        bar.set_postfix_str(task)
        t0 = time.perf_counter()
        model, loss_fn, data = catalog[task](scale, seed, samples[task])
        t1 = time.perf_counter()
        options: dict[str, Any] = {"bootstrap": bootstrap}
        if isinstance(data, list) and task in curvature:
            options["curvature_batches"] = _leading(data, curvature[task] / samples[task])
        lens = CurvatureLens(model, loss_fn, top_k=top_k, lanczos_k=lanczos_k,
                             on_unsupported="skip", analyze_options=options)
        report = lens.analyze(*data) if isinstance(data, tuple) else lens.analyze(data, None)
        report.meta.update(task=task, train_seconds=round(t1 - t0, 1),
                           analyze_seconds=round(time.perf_counter() - t1, 1))
        results[task] = report
        on = report.meta.get("batch_size")
        cs = report.meta.get("curvature_samples", on)
        printer(f"{task}: trained in {t1 - t0:.0f} s, analyzed {len(report.layers)} layers on "
                f"{on} samples" + (f" (curvatures on {cs})" if cs != on else "")
                + f" in {time.perf_counter() - t1:.0f} s")
        if out is not None and task != names[-1]:  # partial results survive an interruption
            _write(results, Path(out), names, full, time.perf_counter() - start, None,
                   settings)
    seconds = time.perf_counter() - start
    text = paper_table(results) if full else reproduce_table(results)
    text += f"\ntotal time: {seconds:.0f} s"
    printer(text)
    if out is not None:
        for line in _write(results, Path(out), names, full, seconds, text, settings):
            printer(line)
    return results


def _leading(data: list[tuple[Any, Any]], fraction: float) -> int | None:
    """How many leading batches hold ``fraction`` of the samples (at least 2; ``None``: all)."""
    want, seen, count = fraction * sum(len(x) for x, _ in data), 0, 0
    for x, _ in data:
        if seen >= want:
            break
        seen, count = seen + len(x), count + 1
    count = max(2, count)
    return None if count >= len(data) else count


def _write(results: dict[str, Any], out: Path, names: list[str], full: bool, seconds: float,
           text: str | None, settings: dict[str, Any]) -> list[str]:
    """Write reproduce.json / .txt (/ .png with ``full``); ``text=None``: a partial run."""
    from curvlens._paper_table import paper_figure, paper_table, summary_numbers

    meta = {"tasks": names, "done": list(results), "full": full, **settings,
            "seconds": round(seconds, 1), "summary": summary_numbers(results)}
    path = save_reports(list(results.values()), out / "reproduce.json", meta=meta)
    if text is None:
        text = (paper_table(results) if full else reproduce_table(results)) + (
            f"\npartial: {len(results)} of {len(names)} tasks after {seconds:.0f} s")
    (out / "reproduce.txt").write_text(text + "\n", encoding="utf-8")
    lines = [f"wrote {path} and {out / 'reproduce.txt'}"]
    if full:
        try:
            lines.append(f"wrote {paper_figure(results, out / 'reproduce.png')}")
        except ImportError as err:
            lines.append(f"no figure: {err}")
    return lines
