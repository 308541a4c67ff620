"""SpectralNewton vs torch.optim.AdamW vs Muon on a digits CNN and a character-level transformer.

Protocol (all CPU, one thread, float32):

* Methods. ``adamw``: ``torch.optim.AdamW`` on every parameter (weight decay 0.01).
  ``muon``: ``torch.optim.Muon`` (Nesterov 0.95, weight decay 0.01, shape adjust "original") on the
  hidden Linear/Conv weights -- conv weights through 2-D views ``weight.flatten(1)`` that share
  storage, their gradients reshaped the same way -- and AdamW (lr ``COMPANION_LR``) on the rest,
  routed by ``curvlens.optim.split_parameters``. ``sn``: ``curvlens.optim.SpectralNewton`` with
  the same routing and companion AdamW, swept over ``alpha in {1, 1.5, 2, auto}`` and damping
  ``{0.1, 0.01 (absolute), relative delta=0.01}``.
* ``alpha="auto"`` reads a per-layer alpha measured on a fixed batch of 256 training samples by
  ``benchmarks._tasks.MeasuredAlphaLens`` (exact HVPs along the top-12 gradient singular
  directions, OLS of log h on log sigma) before training and every ``MEASURE_EVERY`` epochs; it
  stands in for ``curvlens.CurvatureLens`` (same ``latest_alphas()`` interface). Its cost is
  reported separately, not in the epoch time.
* Data: digits 70/30 train/test, 20% of train held out as validation; chars 80/10/10 of the
  text. Digits trains 30 epochs of batch 64; chars 12 "epochs" of 25 steps, batch 16 x 32 chars
  (a 2-block, 64-wide transformer). The chars sweep is smaller (CPU budget): SpectralNewton
  alpha in {1, 1.5, 2, auto} at d = 0.01, plus relative damping for alpha in {2, auto}, lr grid
  ``CHAR_SN_GRID``.
* Learning rates. Each method/config runs seed 0 over its grid in ``LR_GRID``; the lr with the
  best final validation accuracy (digits) / loss (chars) is kept and seeds 1, 2 run at it. Test
  metrics are never used for selection.
* Metrics: final test accuracy / loss (mean and min-max over seeds); the first epoch at which
  each run's full-train-set loss reaches AdamW's mean final train loss; mean optimizer-step time
  and training-epoch time (forward + backward + step), as ratios to Muon and AdamW.

Usage: ``python benchmarks/bench_optim.py [--quick] [--epochs N] [--seeds N]
[--task digits|chars|all] [--out DIR]``. ``--quick`` is a smoke run (tiny grids, 2 epochs,
1 seed) used by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._tasks import (  # noqa: E402
    CharTransformer,
    DigitsCNN,
    MeasuredAlphaLens,
    char_batches,
    char_data,
    digits_data,
    lm_loss,
)
from curvlens.optim import SpectralNewton, split_parameters  # noqa: E402

COMPANION_LR = {"digits": 3e-3, "chars": 3e-3}
LR_GRID = {
    "adamw": [1e-3, 3e-3, 1e-2],
    "muon": [0.01, 0.03, 0.1],
    "sn": [0.003, 0.01, 0.03, 0.1],
}
ALPHAS = [1.0, 1.5, 2.0, "auto"]
DAMPINGS = [("absolute", 0.1), ("absolute", 0.01), ("relative", 0.01)]
CHAR_SN_GRID = [0.003, 0.01, 0.03]
MEASURE_EVERY = 5


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
    val_score: list[float] = field(default_factory=list)  # accuracy (digits) / -loss (chars)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    step_time: float = 0.0  # mean seconds per optimizer step
    epoch_time: float = 0.0  # mean seconds per training epoch
    lens_time: float = 0.0  # total seconds spent measuring alpha
    alphas: dict = field(default_factory=dict)
    diverged: bool = False


# --------------------------------------------------------------------------- tasks


def _lens(model, loss):
    spectral, _ = split_parameters(model)
    return MeasuredAlphaLens(model, loss, {k.removesuffix(".weight"): v
                                           for k, v in spectral.items()}, top_k=8)


def run_digits(cfg: Config, lr: float, seed: int, epochs: int) -> Run:
    train, val, test = _DATA.get("digits") or _DATA.setdefault("digits", digits_data())
    torch.manual_seed(seed)
    model = DigitsCNN()
    lens = None
    if cfg.alpha == "auto":
        fixed = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(99))[:256]
        lens = _lens(model, lambda: nn.functional.cross_entropy(model(train.x[fixed]),
                                                                train.y[fixed]))
    opt = build(cfg, model, lr, COMPANION_LR["digits"], lens)
    gen = torch.Generator().manual_seed(1000 + seed)

    @torch.no_grad()
    def evaluate():
        out = {}
        for name, split in (("train", train), ("val", val), ("test", test)):
            logits = model(split.x)
            out[name] = (float(nn.functional.cross_entropy(logits, split.y)),
                         float((logits.argmax(1) == split.y).float().mean()))
        return out["train"][0], out["val"][1], *out["test"]

    return _loop(model, opt, lens, epochs,
                 lambda: [(train.x[i], train.y[i])
                          for i in torch.randperm(len(train.y), generator=gen).split(64)],
                 nn.functional.cross_entropy, evaluate)


def run_chars(cfg: Config, lr: float, seed: int, epochs: int, *, steps_per_epoch: int = 25,
              batch: int = 16, ctx: int = 32) -> Run:
    data = _DATA.get("chars") or _DATA.setdefault("chars", char_data())
    torch.manual_seed(seed)
    model = CharTransformer(data.vocab, ctx=ctx)
    eval_gen = torch.Generator().manual_seed(7)
    evals = {name: list(char_batches(ids, batch=64, ctx=ctx, n=2, gen=eval_gen))
             for name, ids in (("train", data.train), ("val", data.val), ("test", data.test))}
    lens = None
    if cfg.alpha == "auto":
        xf, yf = evals["train"][0]
        lens = _lens(model, lambda: lm_loss(model(xf), yf))
    opt = build(cfg, model, lr, COMPANION_LR["chars"], lens)
    gen = torch.Generator().manual_seed(1000 + seed)

    @torch.no_grad()
    def evaluate():
        out = {}
        for name, bs in evals.items():
            losses, accs = [], []
            for x, y in bs:
                logits = model(x)
                losses.append(float(lm_loss(logits, y)))
                accs.append(float((logits.argmax(-1) == y).float().mean()))
            out[name] = (sum(losses) / len(losses), sum(accs) / len(accs))
        return out["train"][0], -out["val"][0], *out["test"]

    return _loop(model, opt, lens, epochs,
                 lambda: list(char_batches(data.train, batch=batch, ctx=ctx, n=steps_per_epoch,
                                           gen=gen)),
                 lm_loss, evaluate)


_DATA: dict = {}


def _loop(model, opt, lens, epochs, batches_fn, loss_fn, evaluate) -> Run:
    run = Run()
    step_times, epoch_times = [], []
    for epoch in range(epochs):
        if lens is not None and epoch % MEASURE_EVERY == 0:
            t = time.perf_counter()
            lens.measure()
            run.lens_time += time.perf_counter() - t
        batches = batches_fn()
        t_epoch = time.perf_counter()
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            t = time.perf_counter()
            opt.step()
            step_times.append(time.perf_counter() - t)
        epoch_times.append(time.perf_counter() - t_epoch)
        model.eval()
        tr, va, te, acc = evaluate()
        model.train()
        run.train_loss.append(tr)
        run.val_score.append(va)
        run.test_loss.append(te)
        run.test_acc.append(acc)
        if not (math.isfinite(tr) and math.isfinite(te)):
            run.diverged = True
            break
    run.step_time = sum(step_times) / max(len(step_times), 1)
    run.epoch_time = sum(epoch_times) / max(len(epoch_times), 1)
    if lens is not None:
        run.alphas = lens.latest_alphas()
    return run


# --------------------------------------------------------------------------- sweep and report


def _score(run: Run) -> float:
    if run.diverged or not run.val_score:
        return -math.inf
    return run.val_score[-1]


def sweep(task: str, configs: list[Config], grids: dict, seeds: int, epochs: int,
          log=print) -> dict[Config, tuple[float, list[Run]]]:
    """Seed 0 over the lr grid, pick by final validation score, then seeds 1.. at that lr."""
    runner = run_digits if task == "digits" else run_chars
    results = {}
    for cfg in configs:
        t0 = time.perf_counter()
        tuned = {lr: runner(cfg, lr, 0, epochs) for lr in grids[cfg.method]}
        best = max(tuned, key=lambda lr: _score(tuned[lr]))
        runs = [tuned[best]] + [runner(cfg, best, s, epochs) for s in range(1, seeds)]
        results[cfg] = (best, runs)
        log(f"  [{task}] {cfg.label:<24} lr={best:<6g} "
            f"val={ {lr: round(_score(r), 4) for lr, r in tuned.items()} } "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return results


def _stats(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    return f"{m:.4f} [{min(xs):.4f}, {max(xs):.4f}]"


def report(task: str, results: dict, log=print) -> dict:
    adamw = next(v for k, v in results.items() if k.method == "adamw")[1]
    muon = next(v for k, v in results.items() if k.method == "muon")[1]
    target = sum(r.train_loss[-1] for r in adamw) / len(adamw)

    def mean(runs, attr):
        return sum(getattr(r, attr) for r in runs) / len(runs)

    log(f"\n== {task}: final test metrics over seeds (mean [min, max]); AdamW final train loss "
        f"{target:.4f}")
    log(f"{'config':<24} {'lr':>7} {'test acc':>26} {'test loss':>26} {'epochs to AdamW loss':>22}"
        f" {'step/Muon':>9} {'step/AdamW':>10} {'epoch/Muon':>10} {'epoch/AdamW':>11}")
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
            step_vs_adamw=mean(runs, "step_time") / mean(adamw, "step_time"),
            epoch_vs_muon=mean(runs, "epoch_time") / mean(muon, "epoch_time"),
            epoch_vs_adamw=mean(runs, "epoch_time") / mean(adamw, "epoch_time"),
            step_ms=1e3 * mean(runs, "step_time"), lens_s=mean(runs, "lens_time"),
            alphas=runs[0].alphas, diverged=sum(r.diverged for r in runs),
        )
        summary[cfg.label] = row
        log(f"{cfg.label:<24} {lr:>7g} {_stats(row['test_acc']):>26} "
            f"{_stats(row['test_loss']):>26} {str(reach):>22} {row['step_vs_muon']:>9.2f} "
            f"{row['step_vs_adamw']:>10.2f} {row['epoch_vs_muon']:>10.2f} "
            f"{row['epoch_vs_adamw']:>11.2f}" + (f"  diverged={row['diverged']}"
                                                  if row["diverged"] else ""))
    for cfg, (_, runs) in results.items():
        if cfg.alpha == "auto" and runs[0].alphas:
            log(f"measured alphas ({cfg.label}, seed 0, last): "
                f"{ {k: round(v, 2) for k, v in runs[0].alphas.items()} }; "
                f"lens time {summary[cfg.label]['lens_s']:.1f}s/run")
            break
    return summary


def plot(all_results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(all_results)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        results = all_results[task]
        sn = {c: v for c, v in results.items() if c.method == "sn"}
        best_sn = max(sn, key=lambda c: sum(_score(r) for r in sn[c][1]))
        shown = [c for c in results if c.method != "sn"] + [best_sn]
        default = Config("sn", 2.0, "absolute", 0.01)
        if default in sn and default != best_sn:
            shown.append(default)
        paper = Config("sn", 2.0, "absolute", 0.1)
        if paper in sn and paper not in shown:
            shown.append(paper)
        for cfg in shown:
            runs = results[cfg][1]
            for ax, attr in zip(axes[row], ("train_loss", "test_acc" if task == "digits"
                                            else "test_loss")):
                n = min(len(getattr(r, attr)) for r in runs)
                ys = torch.tensor([getattr(r, attr)[:n] for r in runs])
                ep = range(1, n + 1)
                ax.plot(ep, ys.mean(0), label=cfg.label)
                ax.fill_between(ep, ys.min(0).values, ys.max(0).values, alpha=0.2)
                ax.set_title(f"{task}: {attr}")
                ax.set_xlabel("epoch")
        axes[row][0].set_yscale("log")
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny grids, 2 epochs")
    ap.add_argument("--epochs", type=int, default=None, help="digits epochs (default 30)")
    ap.add_argument("--char-epochs", type=int, default=None, help="chars epochs of 25 steps "
                    "(default 12)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per config (default 3)")
    ap.add_argument("--task", choices=["digits", "chars", "all"], default="all")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    epochs = args.epochs or (2 if quick else 30)
    char_epochs = args.char_epochs or (2 if quick else 12)
    seeds = args.seeds or (1 if quick else 3)
    grids = {k: v[1:2] for k, v in LR_GRID.items()} if quick else LR_GRID
    alphas = [2.0, "auto"] if quick else ALPHAS
    dampings = DAMPINGS[1:2] if quick else DAMPINGS
    sn_configs = [Config("sn", a, m, d) for a in alphas for m, d in dampings]
    configs = [Config("adamw"), Config("muon"), *sn_configs]
    os.makedirs(args.out, exist_ok=True)
    all_results, summary = {}, {}
    tasks = ["digits", "chars"] if args.task == "all" else [args.task]
    for task in tasks:
        t0 = time.perf_counter()
        ep = epochs if task == "digits" else char_epochs
        cfgs, task_grids = configs, grids
        if task == "chars" and not quick:  # smaller transformer sweep (CPU budget)
            cfgs = [c for c in configs if c.method != "sn" or (c.mode, c.damping) ==
                    ("absolute", 0.01) or (c.mode == "relative" and c.alpha in (2.0, "auto"))]
            task_grids = {**grids, "sn": CHAR_SN_GRID}
        all_results[task] = sweep(task, cfgs, task_grids, seeds, ep)
        summary[task] = report(task, all_results[task])
        print(f"[{task}] total {time.perf_counter() - t0:.0f}s")
    stem = os.path.join(args.out, "bench_optim" + ("" if args.task == "all" else f"_{args.task}"))
    plot(all_results, stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"wrote {stem}.png and {stem}.json")
    return summary


if __name__ == "__main__":
    main()
