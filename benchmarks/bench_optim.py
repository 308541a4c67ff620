"""SpectralNewton vs torch.optim.AdamW vs Muon on a digits CNN and a character-level transformer.

Protocol (all CPU, one thread per run, float32; runs spread over ``--jobs`` processes):

* Tasks (models and data from ``curvlens._tasks``). ``digits``: ``DigitsCNN`` on scikit-learn's
  digits (80/20 train/test split of ``digits_data``; 20% of the training set held out as
  validation), 30 epochs of batch 64. ``chars``: ``CharTransformer`` (2 pre-LN blocks, width 48)
  on the standard library's text (``char_data``: 90/10 train/test; the last 1/9 of the training
  text is validation), 12 "epochs" of 25 steps of 16 windows x 32 characters.
* Methods. ``adamw``: ``torch.optim.AdamW`` on every parameter (weight decay 0.01).
  ``muon``: ``torch.optim.Muon`` (Nesterov 0.95, weight decay 0.01, shape adjust "original") on the
  hidden Linear/Conv weights -- conv weights through 2-D views ``weight.flatten(1)`` that share
  storage, their gradients reshaped the same way -- and AdamW (lr ``COMPANION_LR``) on the rest,
  routed by ``curvlens.optim.split_parameters``. ``sn``: ``curvlens.optim.SpectralNewton`` with
  the same routing and companion AdamW, swept over ``alpha in {1, 1.5, 2, auto}`` x damping
  ``{0.1, 0.01 (absolute), relative delta = 0.01}``.
* ``alpha="auto"`` reads ``curvlens.CurvatureLens.latest_alphas()``: the lens is attached with
  ``with lens:`` and ``lens.step()`` after every backward, and ``lens.analyze(x, y)`` runs before
  every epoch on a fixed batch (digits: 256 training images; chars: 16 training windows), cheaply:
  the spectral layers only, ``top_k=LENS_TOP_K``, ``LENS_BOOTSTRAP`` bootstrap resamples, no
  Lanczos, no Kronecker factors, no noise floor. Its time is reported separately (``lens_s``),
  not in the epoch time.
* Learning rates. Stage 1: seed 0 over the method's grid in ``LR_GRID`` for ``TUNE_EPOCHS``
  epochs; the lr with the best final validation accuracy (digits; ties broken by validation
  loss) / loss (chars) is kept. Stage 2: seeds 0, 1, 2 at that lr for the full epochs. Test
  metrics are never used for selection.
* Metrics: final test accuracy / loss (mean and min-max over seeds); the first epoch at which
  each run's training loss (whole digits training set; chars: two fixed batches) reaches AdamW's
  mean final training loss; mean optimizer-step time and epoch time (forward + backward + step)
  as ratios to Muon and AdamW, measured in training; and a separate step-time measurement:
  ``opt.step()`` on fixed gradients, methods interleaved, median over ``STEP_REPS`` repeats.

Usage: ``python benchmarks/bench_optim.py [--quick] [--epochs N] [--char-epochs N] [--seeds N]
[--task digits|chars|all] [--jobs N] [--out DIR]``. ``--quick`` is a smoke run (one lr per
method, 2 epochs, 1 seed, two SpectralNewton configs) used by the tests.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvlens._tasks import (  # noqa: E402
    CharTransformer,
    DigitsCNN,
    char_batch,
    char_data,
    digits_data,
    lm_loss,
)
from curvlens.lens import CurvatureLens  # noqa: E402
from curvlens.optim import DampingMode, SpectralNewton, split_parameters  # noqa: E402

COMPANION_LR = {"digits": 3e-3, "chars": 3e-3}
LR_GRID = {
    "digits": {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3]},
    "chars": {"adamw": [3e-3, 1e-2, 3e-2], "muon": [3e-3, 0.01, 0.03, 0.1]},
}
# SpectralNewton's lr scale depends on the damping and on the gradients' scale: T(sigma) ~
# sigma / d where sigma^alpha << d (absolute damping; the transformer's gradients are smaller,
# so it wants larger lrs), and relative damping makes the update ~ sigma^(1 - alpha) / sigma_1
# (scale-free for alpha = 1, growing as gradients shrink for alpha > 1). Grids were centred by
# a pilot scan and widened where a full run found the best lr at an edge.
SN_LR_GRID = {
    ("digits", "absolute", 0.1): [0.03, 0.1, 0.3, 1.0],
    ("digits", "absolute", 0.01): [0.001, 0.003, 0.01, 0.03, 0.1],
    ("digits", "relative", 0.01): [1e-4, 3e-4, 1e-3, 3e-3],
    ("digits", "relative", 0.01, 1.0): [0.003, 0.01, 0.03, 0.1],  # ~ U V^T: Muon's lr scale
    ("digits", "relative", 0.01, 1.5): [1e-3, 3e-3, 0.01, 0.03],
    ("digits", "relative", 0.01, 2.0): [1e-5, 3e-5, 1e-4, 3e-4],
    ("chars", "absolute", 0.1): [0.3, 1.0, 3.0, 10.0],
    ("chars", "absolute", 0.01): [0.03, 0.1, 0.3, 1.0],
    ("chars", "relative", 0.01): [1e-4, 3e-4, 1e-3, 3e-3],
    ("chars", "relative", 0.01, 1.0): [0.01, 0.03, 0.1, 0.3],
    ("chars", "relative", 0.01, 2.0): [1e-5, 3e-5, 1e-4, 3e-4],
}
EPOCHS = {"digits": 30, "chars": 12}
TUNE_EPOCHS = {"digits": 15, "chars": 8}
ALPHAS = [1.0, 1.5, 2.0, "auto"]
DAMPINGS = [("absolute", 0.1), ("absolute", 0.01), ("relative", 0.01)]
LENS_TOP_K = 6
LENS_BOOTSTRAP = 20
STEP_REPS = 200
_SN_DEFAULTS = inspect.signature(SpectralNewton).parameters


@dataclass(frozen=True)
class Config:
    method: str  # adamw | muon | sn
    alpha: float | str = 2.0
    mode: str = "absolute"
    damping: float = 0.01

    @property
    def label(self) -> str:
        if self.method != "sn":
            return self.method
        d = f"rel{self.damping:g}" if self.mode == "relative" else f"d={self.damping:g}"
        return f"sn a={self.alpha} {d}"


DEFAULT = Config("sn", _SN_DEFAULTS["alpha"].default,
                 DampingMode(_SN_DEFAULTS["damping_mode"].default).value,
                 _SN_DEFAULTS["damping"].default)  # SpectralNewton's own defaults
PAPER = Config("sn", 2.0, "absolute", 0.1)


class MuonWithAdamW:
    """torch.optim.Muon on hidden matrices (conv through flat 2-D views), AdamW on the rest."""

    def __init__(self, model: nn.Module, lr: float, companion_lr: float) -> None:
        spectral, other = split_parameters(model)
        self.pairs = [(p, p.data.view(p.shape[0], -1)) for p in spectral.values()]
        self.muon = torch.optim.Muon([v for _, v in self.pairs], lr=lr, weight_decay=0.01)
        self.adamw = torch.optim.AdamW(other.values(), lr=companion_lr, weight_decay=0.01)

    def step(self) -> None:
        for p, v in self.pairs:
            v.grad = None if p.grad is None else p.grad.view_as(v)
        self.muon.step()
        self.adamw.step()

    def zero_grad(self) -> None:
        self.adamw.zero_grad()
        for p, v in self.pairs:
            p.grad = v.grad = None


def build(cfg: Config, model: nn.Module, lr: float, companion_lr: float, lens=None):
    if cfg.method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if cfg.method == "muon":
        return MuonWithAdamW(model, lr, companion_lr)
    return SpectralNewton(model, lr=lr, alpha=cfg.alpha, damping=cfg.damping,
                          damping_mode=cfg.mode, adamw_lr=companion_lr, lens=lens,
                          auto_every=1, check_finite=False)


@dataclass
class Run:
    train_loss: list[float] = field(default_factory=list)
    val_score: list[tuple] = field(default_factory=list)  # larger is better
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    step_time: float = 0.0  # mean seconds per optimizer step
    epoch_time: float = 0.0  # mean seconds per training epoch
    lens_time: float = 0.0  # total seconds in lens.analyze
    alphas: dict = field(default_factory=dict)
    diverged: bool = False


# --------------------------------------------------------------------------- tasks

_DATA: dict = {}


def _digits() -> tuple[tuple[Tensor, Tensor], ...]:
    """``(train, val, test)`` pairs: ``digits_data``'s split, 20% of train held out (seeded)."""
    if "digits" not in _DATA:
        d = digits_data(seed=0)
        perm = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(1))
        n_val = len(perm) // 5
        va, tr = perm[:n_val], perm[n_val:]
        _DATA["digits"] = ((d.x_train[tr], d.y_train[tr]), (d.x_train[va], d.y_train[va]),
                           (d.x_test, d.y_test))
    return _DATA["digits"]


def _chars() -> tuple[Tensor, Tensor, Tensor, int]:
    """``(train, val, test, vocab)``: ``char_data``'s split, the last 1/9 of train as val."""
    if "chars" not in _DATA:
        train, test, vocab = char_data()
        cut = len(train) - len(train) // 9
        _DATA["chars"] = (train[:cut], train[cut:], test, vocab)
    return _DATA["chars"]


def _lens(model: nn.Module, loss_fn) -> CurvatureLens:
    names = [n.removesuffix(".weight") for n in split_parameters(model)[0]]
    return CurvatureLens(model, loss_fn, layers=names, top_k=LENS_TOP_K, every=100,
                         kronecker="none", lanczos_k=0,
                         analyze_options={"bootstrap": LENS_BOOTSTRAP, "noise_floor": False})


def run_one(task: str, cfg: Config, lr: float, seed: int, epochs: int) -> Run:
    """Train one model from scratch; evaluate after every epoch."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1000 + seed)
    if task == "digits":
        train, val, test = _digits()
        torch.manual_seed(seed)
        model, loss_fn = DigitsCNN(), nn.functional.cross_entropy
        fixed = train[0][:256], train[1][:256]
        evals = {"train": [train], "val": [val], "test": [test]}

        def batches():
            return [(train[0][i], train[1][i])
                    for i in torch.randperm(len(train[1]), generator=gen).split(64)]
    else:
        train, val, test, vocab = _chars()
        torch.manual_seed(seed)
        model, loss_fn = CharTransformer(vocab), lm_loss
        eval_gen = torch.Generator().manual_seed(7)
        evals = {name: [char_batch(ids, 64, 32, eval_gen) for _ in range(2)]
                 for name, ids in (("train", train), ("val", val), ("test", test))}
        fixed = char_batch(train, 16, 32, torch.Generator().manual_seed(8))

        def batches():
            return [char_batch(train, 16, 32, gen) for _ in range(25)]

    lens = _lens(model, loss_fn) if cfg.alpha == "auto" and cfg.method == "sn" else None
    opt = build(cfg, model, lr, COMPANION_LR[task], lens)

    @torch.no_grad()
    def evaluate() -> dict[str, tuple[float, float]]:
        out = {}
        for name, bs in evals.items():
            losses, accs = [], []
            for x, y in bs:
                logits = model(x)
                losses.append(float(loss_fn(logits, y)))
                accs.append(float((logits.argmax(-1) == y).float().mean()))
            out[name] = (sum(losses) / len(losses), sum(accs) / len(accs))
        return out

    run = Run()
    step_times, epoch_times = [], []
    with lens if lens is not None else _Null():
        for _ in range(epochs):
            if lens is not None:
                t = time.perf_counter()
                lens.analyze(*fixed)
                run.lens_time += time.perf_counter() - t
            epoch_batches = batches()
            t_epoch = time.perf_counter()
            for x, y in epoch_batches:
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                if lens is not None:
                    lens.step()
                t = time.perf_counter()
                opt.step()
                step_times.append(time.perf_counter() - t)
            epoch_times.append(time.perf_counter() - t_epoch)
            model.eval()
            ev = evaluate()
            model.train()
            run.train_loss.append(ev["train"][0])
            va_loss, va_acc = ev["val"]
            run.val_score.append((va_acc, -va_loss) if task == "digits" else (-va_loss,))
            run.test_loss.append(ev["test"][0])
            run.test_acc.append(ev["test"][1])
            if not (math.isfinite(ev["train"][0]) and math.isfinite(ev["test"][0])):
                run.diverged = True
                break
    run.step_time = sum(step_times) / max(len(step_times), 1)
    run.epoch_time = sum(epoch_times) / max(len(epoch_times), 1)
    if lens is not None:
        run.alphas = lens.latest_alphas()
    return run


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run_job(job: tuple) -> Run:
    return run_one(*job)


# --------------------------------------------------------------------------- step time


def step_timing(task: str, configs: list[Config], reps: int) -> dict[str, float]:
    """Median seconds of ``opt.step()`` on fixed gradients, methods interleaved."""
    torch.set_num_threads(1)
    opts = {}
    for cfg in configs:
        torch.manual_seed(0)
        if task == "digits":
            train = _digits()[0]
            model, x, y = DigitsCNN(), train[0][:64], train[1][:64]
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            tr, _, _, vocab = _chars()
            model = CharTransformer(vocab)
            lm_loss(model(char_batch(tr, 16, 32, torch.Generator().manual_seed(0))[0]),
                    char_batch(tr, 16, 32, torch.Generator().manual_seed(0))[1]).backward()
        lr = 1e-4  # tiny steps: parameters stay put, the work is the same
        opts[cfg.label] = build(cfg if cfg.alpha != "auto" else Config("sn", 2.0, cfg.mode,
                                                                        cfg.damping),
                                model, lr, 1e-4)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps):
        for label, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- sweep and report


def lr_grid(task: str, cfg: Config) -> list[float]:
    if cfg.method != "sn":
        return LR_GRID[task][cfg.method]
    return (SN_LR_GRID.get((task, cfg.mode, cfg.damping, cfg.alpha))
            or SN_LR_GRID[(task, cfg.mode, cfg.damping)])


def _score(run: Run) -> tuple:
    if run.diverged or not run.val_score:
        return (-math.inf,)
    return run.val_score[-1]


def sweep(tasks: list[str], configs: dict[str, list[Config]], grids, seeds: int,
          epochs: dict, tune_epochs: dict, jobs: int, log=print) -> dict:
    """Stage 1: seed 0 over the lr grid (short runs); stage 2: ``seeds`` full runs at the best."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        stage1 = [(t, c, lr, 0, tune_epochs[t]) for t in tasks for c in configs[t]
                  for lr in grids(t, c)]
        tuned_runs = dict(zip(stage1, pool.map(_run_job, stage1)))
        best = {}
        for t in tasks:
            for c in configs[t]:
                tuned = {lr: tuned_runs[(t, c, lr, 0, tune_epochs[t])]
                         for lr in grids(t, c)}
                best[(t, c)] = max(tuned, key=lambda lr: _score(tuned[lr]))
                edge = (" (grid edge)" if len(tuned) > 1 and best[(t, c)] in (min(tuned),
                                                                             max(tuned)) else "")
                log(f"  [{t}] {c.label:<22} lr={best[(t, c)]:<6g}{edge:<12} val "
                    f"{ {lr: round(_score(r)[0], 4) for lr, r in tuned.items()} }", flush=True)
        stage2 = [(t, c, best[(t, c)], s, epochs[t]) for t in tasks for c in configs[t]
                  for s in range(seeds)]
        final = dict(zip(stage2, pool.map(_run_job, stage2)))
    return {t: {c: (best[(t, c)], [final[(t, c, best[(t, c)], s, epochs[t])]
                                   for s in range(seeds)]) for c in configs[t]} for t in tasks}


def _stats(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{sum(xs) / len(xs):.4f} [{min(xs):.4f}, {max(xs):.4f}]"


def report(task: str, results: dict, step_ms: dict[str, float], log=print) -> dict:
    adamw = next(v for k, v in results.items() if k.method == "adamw")[1]
    muon = next(v for k, v in results.items() if k.method == "muon")[1]
    target = sum(r.train_loss[-1] for r in adamw) / len(adamw)

    def mean(runs, attr):
        return sum(getattr(r, attr) for r in runs) / len(runs)

    log(f"\n== {task}: final test metrics over seeds (mean [min, max]); AdamW final train loss "
        f"{target:.4g}; step/Muon* = separate fixed-gradient timing (median of {STEP_REPS})")
    log(f"{'config':<22} {'lr':>6} {'test acc':>24} {'test loss':>24} {'epochs to AdamW loss':>20}"
        f" {'step/Muon':>9} {'step/Muon*':>10} {'step/AdamW':>10} {'epoch/Muon':>10} "
        f"{'lens s':>6}")
    summary = {}
    for cfg, (lr, runs) in results.items():
        reach = []
        for r in runs:
            hit = [e + 1 for e, tl in enumerate(r.train_loss) if tl <= target]
            reach.append(hit[0] if hit else None)
        row = dict(
            lr=lr, test_acc=[r.test_acc[-1] for r in runs],
            test_loss=[r.test_loss[-1] for r in runs],
            train_loss=[r.train_loss[-1] for r in runs], epochs_to_adamw=reach,
            step_vs_muon=mean(runs, "step_time") / mean(muon, "step_time"),
            step_vs_muon_fixed=step_ms.get(cfg.label, math.nan) / step_ms["muon"],
            step_vs_adamw=mean(runs, "step_time") / mean(adamw, "step_time"),
            epoch_vs_muon=mean(runs, "epoch_time") / mean(muon, "epoch_time"),
            epoch_vs_adamw=mean(runs, "epoch_time") / mean(adamw, "epoch_time"),
            step_ms=1e3 * mean(runs, "step_time"),
            step_ms_fixed=1e3 * step_ms.get(cfg.label, math.nan),
            lens_s=mean(runs, "lens_time"), alphas=runs[0].alphas,
            val_final=sum(_score(r)[0] for r in runs) / len(runs),
            diverged=sum(r.diverged for r in runs),
            curves={"train_loss": [r.train_loss for r in runs],
                    "test_acc": [r.test_acc for r in runs],
                    "test_loss": [r.test_loss for r in runs]},
        )
        summary[cfg.label] = row
        reach_s = ",".join("-" if e is None else str(e) for e in reach)
        log(f"{cfg.label:<22} {lr:>6g} {_stats(row['test_acc']):>24} "
            f"{_stats(row['test_loss']):>24} {reach_s:>20} {row['step_vs_muon']:>9.2f} "
            f"{row['step_vs_muon_fixed']:>10.2f} {row['step_vs_adamw']:>10.2f} "
            f"{row['epoch_vs_muon']:>10.2f} {row['lens_s']:>6.1f}"
            + (f"  diverged={row['diverged']}" if row["diverged"] else ""))
    for cfg, (_, runs) in results.items():
        if cfg.alpha == "auto" and runs[0].alphas:
            log(f"measured alphas ({cfg.label}, seed 0, last analyze): "
                f"{ {k: round(v, 2) for k, v in runs[0].alphas.items()} }")
            break
    return summary


def plot(summary: dict, path: str) -> None:
    """Curves (mean, min-max over seeds) of AdamW, Muon, the best SpectralNewton config by
    validation, the defaults and the paper's setting, from :func:`report`'s summary (or JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        rows = summary[task]
        sn = [k for k in rows if k.startswith("sn ")]
        best_sn = max(sn, key=lambda k: rows[k]["val_final"])
        shown = [k for k in rows if not k.startswith("sn ")] + [best_sn]
        for c in (DEFAULT, PAPER):
            if c.label in rows and c.label not in shown:
                shown.append(c.label)
        metric = "test_acc" if task == "digits" else "test_loss"
        for label in shown:
            tag = (" (default)" if label == DEFAULT.label else "") + (
                " (paper)" if label == PAPER.label else "") + (
                " (best SN by val)" if label == best_sn else "")
            for ax, attr in zip(axes[row], ("train_loss", metric)):
                curves = rows[label]["curves"][attr]
                n = min(len(c) for c in curves)
                ys = torch.tensor([c[:n] for c in curves])
                ep = range(1, n + 1)
                ax.plot(ep, ys.mean(0), label=f"{label} lr={rows[label]['lr']:g}{tag}")
                ax.fill_between(ep, ys.min(0).values, ys.max(0).values, alpha=0.2)
                ax.set_title(f"{task}: {attr} (mean, min-max over seeds)")
                ax.set_xlabel("epoch")
        axes[row][0].set_yscale("log")
        if task == "digits":
            axes[row][1].set_ylim(0.95, 1.0)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one lr, 2 epochs, 1 seed")
    ap.add_argument("--epochs", type=int, default=None, help="digits epochs (default 30)")
    ap.add_argument("--char-epochs", type=int, default=None, help="chars epochs of 25 steps "
                    "(default 12)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per config (default 3)")
    ap.add_argument("--task", choices=["digits", "chars", "all"], default="all")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default 2; "
                    "quick: 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a saved run")
    ap.add_argument("--step-time", action="store_true", help="only the fixed-gradient "
                    "optimizer-step timing (all SpectralNewton configs vs Muon and AdamW)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            summary = json.load(f)
        plot(summary, args.replot.removesuffix(".json") + ".png")
        return summary
    torch.set_num_threads(1)
    quick = args.quick
    epochs = {"digits": args.epochs or (2 if quick else EPOCHS["digits"]),
              "chars": args.char_epochs or (2 if quick else EPOCHS["chars"])}
    tune_epochs = {t: min(e, 2 if quick else TUNE_EPOCHS[t]) for t, e in epochs.items()}
    seeds = args.seeds or (1 if quick else 3)
    jobs = args.jobs or (1 if quick else 2)

    def grids(task: str, cfg: Config) -> list[float]:
        g = lr_grid(task, cfg)
        return [g[len(g) // 2]] if quick else g
    alphas = [2.0, "auto"] if quick else ALPHAS
    dampings = DAMPINGS[1:2] if quick else DAMPINGS
    sn_configs = [Config("sn", a, m, d) for a in alphas for m, d in dampings]
    tasks = ["digits", "chars"] if args.task == "all" else [args.task]
    configs = {t: [Config("adamw"), Config("muon"), *sn_configs] for t in tasks}
    if args.step_time:
        out = {}
        for task in tasks:
            ms = step_timing(task, configs[task], STEP_REPS)
            out[task] = {k: {"step_ms": 1e3 * v, "vs_muon": v / ms["muon"],
                             "vs_adamw": v / ms["adamw"]} for k, v in ms.items()}
            print(f"== {task}: opt.step() on fixed gradients, median of {STEP_REPS} (ms, "
                  "ratio to Muon, to AdamW)")
            for k, row in out[task].items():
                print(f"{k:<22} {row['step_ms']:>8.3f} {row['vs_muon']:>6.2f} "
                      f"{row['vs_adamw']:>6.2f}")
        return out
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"sweep: tasks {tasks}, {len(sn_configs)} SpectralNewton configs, seeds {seeds}, "
          f"epochs {epochs} (tuning {tune_epochs}), {jobs} processes", flush=True)
    all_results = sweep(tasks, configs, grids, seeds, epochs, tune_epochs, jobs)
    summary = {}
    for task in tasks:
        step_ms = step_timing(task, configs[task], 20 if quick else STEP_REPS)
        summary[task] = report(task, all_results[task], step_ms)
    print(f"total {time.perf_counter() - t0:.0f}s")
    stem = os.path.join(args.out, "bench_optim" + ("" if args.task == "all" else f"_{args.task}"))
    plot(summary, stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"wrote {stem}.png and {stem}.json")
    return summary


if __name__ == "__main__":
    main()
