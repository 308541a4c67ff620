"""SpectralNewton (default policy) vs torch.optim.Muon vs AdamW on three tasks, lr tuned for each.

Protocol (CPU, one thread per run, float32, ``--jobs`` processes):

* Tasks (models and data from ``curvlens._tasks``, all shipped offline). ``digits``:
  ``DigitsCNN`` on scikit-learn's digits (``digits_data``'s 80/20 train/test split; 20% of the
  training part held out as validation), batch 64. ``chars``: ``CharTransformer`` (2 pre-LN blocks,
  width 48) on the standard library's text (``char_data``: 90/10 train/test; the last 1/9 of the
  training text is validation), "epochs" of 25 steps of 16 windows x 32 characters. ``vit``:
  ``DigitsViT`` (4 x 4 patches, 2 blocks, width 48) on the digits upscaled to 16 x 16, same split
  as ``digits``, batch 64.
* Methods. ``adamw``: ``torch.optim.AdamW`` on every parameter (weight decay 0.01). ``muon``:
  ``torch.optim.Muon`` (Nesterov 0.95, weight decay 0.01, its default lr adjustment) on the hidden
  Linear/Conv weights -- conv weights through 2-D views that share storage -- and AdamW on the
  rest, routed by ``curvlens.optim.split_parameters``, at the learning rate AdamW's own sweep chose
  on the task (what a user who has tuned AdamW would pair it with; a fixed ``3e-3`` had left
  Muon's embeddings and head under-trained on the character transformer). ``sn``:
  ``curvlens.optim.SpectralNewton(model, lr=lr)``: the default policy, nothing else set (its
  AdamW part uses the same lr).
* Learning rates: every method gets a grid of ``GRID_SIZE`` values (factor ~3 apart, centred by
  pilot runs so that no method's best value lies at an edge) per task; seed 0 trains at each, the
  lr with the lowest final validation loss is kept, and seeds 1 and 2 train at it (seed 0's run is
  reused). AdamW's sweep runs first (Muon's companion needs its lr). Test metrics are never used
  for selection. A best lr at a grid edge is flagged in the log.
* Schedule: constant learning rates (the protocol of record); ``--schedule cosine`` decays every
  method's learning rates to zero over the run instead (then the grids need re-centring).
  ``--epochs F`` runs a fraction ``F`` of each task's epochs.
* Metrics: final test loss and accuracy (mean and min-max over seeds); the first epoch at which
  each run's training loss (whole digits training set; chars: two fixed batches) reaches AdamW's
  mean final training loss -- a run that has not reached it by its last epoch is re-run (same
  seed, same constant lr) and trained on up to ``--horizon`` times the epochs only to count this
  (its test metrics stay those of the last protocol epoch; "-": not by the horizon); mean
  optimizer-step and epoch times.

Usage: ``python benchmarks/bench_optim.py [--quick] [--task digits|chars|vit|all] [--jobs N]
[--out DIR] [--schedule constant|cosine] [--epochs F] [--horizon H]``; writes
``bench_optim[_TASK].{json,png,md}`` (the table) and prints the log.
``--quick`` is a smoke run (one lr per method, 2 epochs, 1 seed) used by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when imported as a package

from bench_optim_report import adamw_target, plot, report, table  # noqa: E402

from curvlens._tasks import (  # noqa: E402
    CharTransformer,
    DigitsCNN,
    DigitsViT,
    char_batch,
    char_data,
    digits_data,
    lm_loss,
    upscaled_digits,
)
from curvlens.optim import SpectralNewton, split_parameters  # noqa: E402

TASKS = ("digits", "chars", "vit")
METHODS = ("sn", "muon", "adamw")
GRID_SIZE = 4
LR_GRID = {
    "digits": {"sn": [1e-3, 3e-3, 0.01, 0.03], "muon": [3e-4, 1e-3, 3e-3, 0.01],
               "adamw": [1e-3, 3e-3, 0.01, 0.03]},
    "chars": {"sn": [3e-3, 0.01, 0.03, 0.1], "muon": [3e-3, 0.01, 0.03, 0.1],
              "adamw": [1e-3, 3e-3, 0.01, 0.03]},
    "vit": {"sn": [1e-3, 3e-3, 0.01, 0.03], "muon": [3e-4, 1e-3, 3e-3, 0.01],
            "adamw": [3e-4, 1e-3, 3e-3, 0.01]},
}
EPOCHS = {"digits": 30, "chars": 12, "vit": 20}
SCHEDULES = ("constant", "cosine")  # cosine: every lr times 0.5 (1 + cos(pi t / T)), T: all steps
SEEDS = 3
HORIZON = 3.0  # epochs to AdamW's final train loss are counted up to this multiple of the epochs


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


def build(method: str, model: nn.Module, lr: float, companion_lr: float):
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if method == "muon":
        return MuonWithAdamW(model, lr, companion_lr)
    return SpectralNewton(model, lr=lr)  # the default policy, nothing else set


@dataclass
class Run:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    step_time: float = 0.0  # mean seconds per optimizer step
    epoch_time: float = 0.0  # mean seconds per training epoch
    diverged: bool = False
    companion_lr: float | None = None  # Muon's AdamW part
    extra_train_loss: list[float] = field(default_factory=list)  # after the last epoch, to target


_DATA: dict = {}


def _split_digits(d) -> tuple[tuple[Tensor, Tensor], ...]:
    perm = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(1))
    n_val = len(perm) // 5
    va, tr = perm[:n_val], perm[n_val:]
    return (d.x_train[tr], d.y_train[tr]), (d.x_train[va], d.y_train[va]), (d.x_test, d.y_test)


def _data(task: str):
    if task not in _DATA:
        if task == "digits":
            _DATA[task] = _split_digits(digits_data(seed=0))
        elif task == "vit":
            _DATA[task] = _split_digits(upscaled_digits(seed=0))
        else:
            train, test, vocab = char_data()
            cut = len(train) - len(train) // 9
            _DATA[task] = (train[:cut], train[cut:], test, vocab)
    return _DATA[task]


def run_one(task: str, method: str, lr: float, seed: int, epochs: int,
            companion_lr: float = 3e-3, schedule: str = "constant", target: float | None = None,
            horizon: int = 0) -> Run:
    """Train one model from scratch; evaluate after every epoch (``companion_lr``: Muon's AdamW
    part; ``schedule``: one of ``SCHEDULES``). With a ``target`` training loss not reached in
    ``epochs``, keep training (same constant lr) up to epoch ``horizon``, only to count the epochs
    to it: ``extra_train_loss`` gets those epochs' training losses, the other metrics stay at
    ``epochs``."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(seed)
    if task == "chars":
        train, val, test, vocab = _data(task)
        model, loss_fn = CharTransformer(vocab), lm_loss
        eval_gen = torch.Generator().manual_seed(7)
        evals = {name: [char_batch(ids, 64, 32, eval_gen) for _ in range(2)]
                 for name, ids in (("train", train), ("val", val), ("test", test))}

        def batches():
            return [char_batch(train, 16, 32, gen) for _ in range(25)]
    else:
        train, val, test = _data(task)
        model = DigitsCNN() if task == "digits" else DigitsViT()
        loss_fn = nn.functional.cross_entropy
        evals = {"train": [train], "val": [val], "test": [test]}

        def batches():
            return [(train[0][i], train[1][i])
                    for i in torch.randperm(len(train[1]), generator=gen).split(64)]

    opt = build(method, model, lr, companion_lr)
    parts = (opt.muon, opt.adamw) if isinstance(opt, MuonWithAdamW) else (opt,)
    groups = [g for o in parts for g in o.param_groups]
    base_lrs = [g["lr"] for g in groups]
    per_epoch = 25 if task == "chars" else math.ceil(len(train[1]) / 64)
    total_steps, t_step = (epochs * per_epoch if schedule == "cosine" else 0), 0

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

    run = Run(companion_lr=companion_lr if method == "muon" else None)
    step_times, epoch_times = [], []

    def train_epoch() -> None:
        nonlocal t_step
        epoch_batches = batches()
        t_epoch = time.perf_counter()
        for x, y in epoch_batches:
            if total_steps:
                scale = 0.5 * (1 + math.cos(math.pi * t_step / total_steps))
                for g, base in zip(groups, base_lrs):
                    g["lr"] = base * scale
                t_step += 1
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            t = time.perf_counter()
            opt.step()
            step_times.append(time.perf_counter() - t)
        epoch_times.append(time.perf_counter() - t_epoch)

    for _ in range(epochs):
        train_epoch()
        model.eval()
        ev = evaluate()
        model.train()
        run.train_loss.append(ev["train"][0])
        run.val_loss.append(ev["val"][0])
        run.test_loss.append(ev["test"][0])
        run.test_acc.append(ev["test"][1])
        if not all(math.isfinite(ev[k][0]) for k in ev):
            run.diverged = True
            break
    if target is not None and not total_steps and not run.diverged:  # only a constant lr extends
        evals = {"train": evals["train"]}
        while min(run.train_loss + run.extra_train_loss) > target and (
                epochs + len(run.extra_train_loss) < horizon):
            train_epoch()
            model.eval()
            run.extra_train_loss.append(evaluate()["train"][0])
            model.train()
    run.step_time = sum(step_times) / max(len(step_times), 1)
    run.epoch_time = sum(epoch_times) / max(len(epoch_times), 1)
    return run


def _run_job(job: tuple) -> Run:
    return run_one(*job)


def _val(run: Run) -> float:
    return math.inf if run.diverged or not run.val_loss else run.val_loss[-1]


def sweep_task(task: str, grids: dict, seeds: int, epochs: int, pool, log=print,
               schedule: str = "constant") -> dict:
    """Seed 0 over each method's grid (AdamW's first: Muon's companion uses its best lr), then
    the other seeds at the lr with the best val loss."""
    futures, best = {}, {}

    def submit(m: str, lr: float, seed: int) -> None:
        comp = best.get("adamw", 3e-3)
        futures[(m, lr, seed)] = pool.submit(_run_job, (task, m, lr, seed, epochs, comp, schedule))

    def pick(m: str) -> None:
        vals = {lr: _val(futures[(m, lr, 0)].result()) for lr in grids[m]}
        best[m] = min(vals, key=vals.get)
        edge = " (grid edge)" if best[m] in (min(vals), max(vals)) else ""
        comp = f" (AdamW part at {best['adamw']:g})" if m == "muon" else ""
        log(f"  [{task}] {m:<6} lr={best[m]:<7g}{edge:<12} val loss "
            f"{ {lr: round(v, 4) for lr, v in vals.items()} }{comp}", flush=True)

    for m in ("adamw", "sn"):
        for lr in grids[m]:
            submit(m, lr, 0)
    for m, then in (("adamw", "muon"), ("sn", None), ("muon", None)):
        pick(m)  # waits for m's grid; the queue keeps both workers busy meanwhile
        for lr in grids[then] if then else ():
            submit(then, lr, 0)
        for s in range(1, seeds):
            submit(m, best[m], s)
    return {m: (best[m], [futures[(m, best[m], s)].result() for s in range(seeds)])
            for m in METHODS}


def extend(task: str, results: dict, epochs: int, horizon: int, pool, log=print,
           schedule: str = "constant") -> None:
    """Re-run (same seed, same constant lr) each final run that has not reached AdamW's mean final
    training loss by its last epoch, up to epoch ``horizon``, and attach the training losses
    after the last epoch to it; its other metrics stay those of the protocol's ``epochs``."""
    if horizon <= epochs or schedule != "constant":
        return
    target, futures = adamw_target(results), {}
    for m, (lr, runs) in results.items():
        comp = results["adamw"][0]
        for s, r in enumerate(runs):
            if min(r.train_loss) > target and not r.diverged:
                futures[(m, s)] = pool.submit(
                    _run_job, (task, m, lr, s, epochs, comp, schedule, target, horizon))
    for (m, s), fut in futures.items():
        again, run = fut.result(), results[m][1][s]
        if again.train_loss != run.train_loss:  # not reproducible: say so, count the re-run's
            log(f"  [{task}] {m} seed {s}: the re-run's first {epochs} epochs differ")
        run.extra_train_loss = again.extra_train_loss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one lr, 2 epochs, 1 seed")
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default 2; quick: 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--schedule", choices=SCHEDULES, default="constant",
                    help="learning-rate schedule of every method (cosine: to zero at the end)")
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="fraction of each task's epochs to run (1: the full protocol)")
    ap.add_argument("--horizon", type=float, default=HORIZON,
                    help="count epochs to AdamW's final train loss up to this multiple of the "
                         "epochs, training on at the same constant lr (1: within the run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    seeds = 1 if args.quick else SEEDS
    jobs = args.jobs or (1 if args.quick else 2)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_optim" + ("" if args.task == "all" else f"_{args.task}"))
    print(f"tasks {tasks}, methods {METHODS}, grids of {GRID_SIZE}, seeds {seeds}, "
          f"{jobs} processes, {args.schedule} learning rates, epochs x{args.epochs:g}", flush=True)
    t0 = time.perf_counter()
    summary = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for task in tasks:
            grids = {m: ([g[len(g) // 2]] if args.quick else g) for m, g in LR_GRID[task].items()}
            epochs = 2 if args.quick else max(1, round(EPOCHS[task] * args.epochs))
            results = sweep_task(task, grids, seeds, epochs, pool, schedule=args.schedule)
            horizon = epochs if args.schedule != "constant" else round(epochs * args.horizon)
            extend(task, results, epochs, horizon, pool, schedule=args.schedule)
            summary[task] = report(task, results, horizon)
            with open(stem + ".json", "w") as f:  # after every task: partial results survive
                json.dump(summary, f, indent=1)
            print(f"  ({time.perf_counter() - t0:.0f}s so far)", flush=True)
    with open(stem + ".md", "w") as f:
        f.write(table(summary))
    plot(summary, stem + ".png")
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {stem}.json, .md and .png")
    return summary


if __name__ == "__main__":
    main()
