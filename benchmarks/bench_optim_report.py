"""Reporting for ``bench_optim.py``: the printed summary, the Markdown table and the figure."""

from __future__ import annotations

from dataclasses import asdict

import torch


def adamw_target(results: dict) -> float:
    """AdamW's mean final training loss: the "epochs to AdamW" criterion."""
    return sum(r.train_loss[-1] for r in results["adamw"][1]) / len(results["adamw"][1])


def _stats(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.4f} [{min(xs):.4f}, {max(xs):.4f}]" if xs else "n/a"


def report(task: str, results: dict, horizon: int, log=print) -> dict:
    """Summary rows per method, printed as a table (``horizon``: the last epoch counted)."""
    target = adamw_target(results)

    def mean(runs, attr):
        return sum(getattr(r, attr) for r in runs) / len(runs)

    muon_step = mean(results["muon"][1], "step_time")
    log(f"\n== {task}: final test metrics (mean [min, max] over seeds); AdamW's final train loss "
        f"{target:.4g} (epochs to it counted up to {horizon})")
    log(f"{'method':<7} {'lr':>7} {'test loss':>26} {'test acc':>26} {'epochs to AdamW':>16} "
        f"{'step/Muon':>9}")
    summary = {}
    for m, (lr, runs) in results.items():
        reach = []
        for r in runs:
            hit = [e + 1 for e, tl in enumerate(r.train_loss + r.extra_train_loss)
                   if tl <= target]
            reach.append(hit[0] if hit else None)
        row = dict(lr=lr, companion_lr=runs[0].companion_lr,
                   test_loss=[r.test_loss[-1] for r in runs],
                   test_acc=[r.test_acc[-1] for r in runs],
                   train_loss=[r.train_loss[-1] for r in runs], epochs_to_adamw=reach,
                   horizon=horizon,
                   step_ms=1e3 * mean(runs, "step_time"),
                   step_vs_muon=mean(runs, "step_time") / muon_step,
                   epoch_s=mean(runs, "epoch_time"), diverged=sum(r.diverged for r in runs),
                   runs=[asdict(r) for r in runs])
        summary[m] = row
        log(f"{m:<7} {lr:>7g} {_stats(row['test_loss']):>26} {_stats(row['test_acc']):>26} "
            f"{','.join('-' if e is None else str(e) for e in reach):>16} "
            f"{row['step_vs_muon']:>9.2f}" + (f"  diverged={row['diverged']}"
                                              if row["diverged"] else ""))
    return summary


def table(summary: dict) -> str:
    """A Markdown table of the summary (what README and the docs quote)."""
    lines = ["| task | method | lr | test loss | test accuracy | epochs to AdamW's train loss "
             "(- : not by the horizon) |", "|---|---|---|---|---|---|"]
    for task, rows in summary.items():
        for m, row in rows.items():
            reach = ",".join("-" if e is None else str(e) for e in row["epochs_to_adamw"])
            reach += f" (horizon {row['horizon']})" if "horizon" in row else ""
            lr = f"{row['lr']:g}" + (f" (AdamW {c:g})" if (c := row.get("companion_lr")) else "")
            lines.append(f"| {task} | {m} | {lr} | {_stats(row['test_loss'])} | "
                         f"{_stats(row['test_acc'])} | {reach} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Train loss and test loss per epoch (mean, min-max over seeds) for each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for m, res in summary[task].items():
            for ax, attr in zip(axes[row], ("train_loss", "test_loss")):
                curves = [r[attr] for r in res["runs"]]
                n = min(len(c) for c in curves)
                ys = torch.tensor([c[:n] for c in curves])
                ep = range(1, n + 1)
                ax.plot(ep, ys.mean(0), label=f"{m} lr={res['lr']:g}")
                ax.fill_between(ep, ys.min(0).values, ys.max(0).values, alpha=0.2)
                ax.set_title(f"{task}: {attr.replace('_', ' ')} (mean, min-max over seeds)")
                ax.set_xlabel("epoch")
        axes[row][0].set_yscale("log")
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
