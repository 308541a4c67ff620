"""Cost of curvlens on a ResNet-18 and a GPT-2-small-shaped LM, as ratios to a plain training step.

Two parts, each run in its own process so that its peak RSS is its own:

* ``resnet``: torchvision ``resnet18(num_classes=10)`` on 32x32 inputs, batch 64, SGD. Paired
  rounds, interleaved so that machine load hits every mode alike: a plain step (forward,
  backward, optimizer step), a recording step (the same inside ``with lens:`` with
  ``lens.step()`` recording gradient spectra and running Kronecker factors), and a
  non-recording step (hooks present, nothing recorded). Reports the recording step's extra cost
  and the ``lens.step()`` call itself in plain steps (target <= 1.5), ``lens.analyze()`` with
  ``top_k=10`` and ``lanczos_k=10`` on the batch in plain steps (target <= 120; also once with
  ``gauss_newton=False``, every matrix by Hessian-vector products, and the largest difference
  of the two reports' ``h_k`` and eigenvalues relative to each layer's largest), and the
  overhead of training at ``every=50`` (target <= 1.05x), both derived from the per-step
  medians, ``(49 * non-recording + recording) / (50 * plain)``, and measured directly on
  ``rounds`` pairs of 50-step runs, plain and with the lens (which has recorded once before,
  as in a training run past its first step), the order alternating from pair to pair (not with
  ``--quick``).
* ``gpt``: a GPT-2-small-shaped LM (vocabulary 50257, width 768, 12 heads, 2 blocks, context
  64, batch 4, the output layer tied to the token embedding). Trains with the lens attached
  (every step recorded), reads the running factors, then runs ``lens.analyze()`` on every
  weight matrix (``top_k=10``; the tied one once) and Lanczos (K=10) on the 38.6M-dimensional
  tied block within the default memory budget, until its basis has been full and restarted a
  few times. Target: peak RSS <= 6 GB. Its steps and Hessian-vector products cost several
  seconds on one thread, so it reports a few rounds only, and Lanczos on the largest block only
  (``lanczos_k=0`` in that ``analyze``).

On a CUDA device (``--device cuda``) the same runs on the GPU: every timing waits for the
device's queued work, and each part also reports its peak GPU memory
(``torch.cuda.max_memory_allocated``).

Usage: ``python benchmarks/bench_scale.py [--part resnet|gpt|all] [--rounds N] [--quick]
[--threads N] [--device cpu|cuda] [--out DIR]``. ``--part all`` (the default) runs the parts
one after the other in subprocesses and writes ``bench_scale.json`` and ``bench_scale.log``
under ``--out`` (default: benchmarks/results). Run it under ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from curvlens.lens import CurvatureLens  # noqa: E402


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


_DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def peak_gpu_gb() -> float | None:
    """Peak memory torch allocated on the CUDA device so far (None on the CPU)."""
    return torch.cuda.max_memory_allocated(_DEVICE) / 1e9 if _DEVICE.type == "cuda" else None


# ----------------------------------------------------------------------------- ResNet-18


def resnet_part(args: argparse.Namespace) -> dict[str, Any]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(_DEVICE)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g).to(_DEVICE)
    y = torch.randint(0, 10, (64,), generator=g).to(_DEVICE)
    rec = CurvatureLens(model, loss_fn, top_k=10, every=1, lanczos_k=10)
    quiet = CurvatureLens(model, loss_fn, top_k=10, every=10**9)
    quiet.num_steps = 1  # never a recording step: hooks present, nothing recorded
    call: list[float] = []

    def plain() -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def with_lens(lens: CurvatureLens) -> None:
        with lens:
            loss_fn(model(x), y).backward()
            if lens is rec:
                call.append(_timed(lens.step))
            else:
                lens.step()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        plain()
        with_lens(rec)
        with_lens(quiet)
    call.clear()
    times: dict[str, list[float]] = {"plain": [], "recording": [], "non-recording": []}
    for _ in range(args.rounds):
        times["plain"].append(_timed(plain))
        times["recording"].append(_timed(lambda: with_lens(rec)))
        times["non-recording"].append(_timed(lambda: with_lens(quiet)))
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_s = med["plain"]
    out: dict[str, Any] = {
        "model": "torchvision resnet18(num_classes=10), 32x32, batch 64, SGD",
        "rounds": args.rounds,
        "plain_step_s": plain_s,
        "recording_step_s": med["recording"],
        "non_recording_step_s": med["non-recording"],
        "lens_step_call_plain_steps": statistics.median(call) / plain_s,
        "recording_extra_plain_steps": (med["recording"] - plain_s) / plain_s,
        "every50_overhead_derived": (49 * med["non-recording"] + med["recording"]) / (50 * plain_s),
    }
    # analyze: paired with plain steps right before and after it
    analyze_s, plain_near = [], []
    for r in range(1 if args.quick else 2):
        before = _timed(plain)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        analyze_s.append(_timed(lambda: rec.analyze(x, y, epoch=r)))  # noqa: B023
        plain_near.append((before + _timed(plain)) / 2)
    if args.profile:
        out["analyze_profile"] = _profile(lambda: rec.analyze(x, y))
    out["analyze_s"] = statistics.median(analyze_s)
    out["analyze_plain_steps"] = statistics.median(
        a / p for a, p in zip(analyze_s, plain_near))
    routed = [n for n, r in rec.history[-1].layers.items()
              if any("exact from the Gauss-Newton" in note for note in r.notes)]
    out["gauss_newton_matrices"] = len(routed)
    if not args.quick:  # the same analyze with products everywhere (gauss_newton=False)
        before = _timed(plain)
        model.load_state_dict(state)  # as at the last analyze (plain steps moved it since)
        rec.analyze_options["gauss_newton"] = False
        holder: list = []
        seconds = _timed(lambda: holder.append(rec.analyze(x, y)))
        products = holder[0]
        del rec.analyze_options["gauss_newton"]
        fast = rec.history[-2]
        out["analyze_products_s"] = seconds
        out["analyze_products_plain_steps"] = seconds / ((before + _timed(plain)) / 2)
        out["routes_max_rel_diff"] = {
            field: max(abs(a - b) / max(abs(v) for v in getattr(products.layers[n], field))
                       for n in fast.layers
                       for a, b in zip(getattr(fast.layers[n], field),
                                       getattr(products.layers[n], field)))
            for field in ("h", "lambda_top")}
    if not args.quick:
        out["every50_overhead_measured"] = _every50(model, loss_fn, opt, x, y, args)
    out["peak_rss_gb"] = peak_rss_gb()
    out["peak_gpu_gb"] = peak_gpu_gb()
    report = rec.history[-1]
    alphas = [r.alpha for r in report.layers.values()]
    out["layers"] = len(report.layers)
    out["finite_alpha"] = sum(1 for a in alphas if math.isfinite(a))
    return out


def _profile(fn, top: int = 25) -> list[str]:
    """The ``top`` functions by cumulative time of one call of ``fn`` (cProfile)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    print("\n".join(lines[-top - 1:]))
    return lines[-top - 1:]


def _every50(model, loss_fn, opt, x, y, args) -> float:
    """Median ratio of 50 training steps with a lens at ``every=50`` to 50 plain steps.

    The lens has recorded once before the timed steps (its first recording allocates the
    running factors, a one-off cost of a training run, not of every 50 steps); the timed steps
    then hold exactly one recording step, the 50th."""
    def run(use_lens: bool) -> float:
        lens = CurvatureLens(model, loss_fn, top_k=10, every=50)

        def loop(steps: int = 50) -> None:
            for _ in range(steps):
                loss_fn(model(x), y).backward()
                if use_lens:
                    lens.step()
                opt.step()
                opt.zero_grad(set_to_none=True)

        if not use_lens:
            return _timed(loop)
        with lens:
            loop(1)
            return _timed(loop)

    ratios = []
    for r in range(max(2, args.rounds)):  # the order alternates: no bias from going first
        if r % 2:
            lens_s, plain_s = run(True), run(False)
        else:
            plain_s, lens_s = run(False), run(True)
        ratios.append(lens_s / plain_s)
    return statistics.median(ratios)


# ----------------------------------------------------------------------------- GPT-shaped LM


class Block(nn.Module):
    """Pre-norm transformer block; attention written out (softmax of q k^T) so that every
    op has a double backward."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.attn(self.ln1(x)).split(D, -1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)  # [B, h, T, T]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """GPT-2-small-shaped: token and position embeddings, blocks, final norm, tied head."""

    def __init__(self, vocab: int = 50257, d: int = 768, blocks: int = 2, heads: int = 12,
                 context: int = 64) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gpt_part(args: argparse.Namespace) -> dict[str, Any]:
    from curvlens._budget import resolve_budget
    from curvlens.hessian_spectrum import block_eigenvalues, lanczos_max_basis

    torch.manual_seed(0)
    vocab = 50257
    model = TinyGPT(vocab=vocab).to(_DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (4, 64), generator=g).to(_DEVICE)
    tgt = torch.randint(0, vocab, (4, 64), generator=g).to(_DEVICE)
    out: dict[str, Any] = {
        "model": "GPT-2-small-shaped: vocab 50257, d 768, 12 heads, 2 blocks, 4 x 64 tokens, "
                 "tied head",
        "parameters": sum(p.numel() for p in model.parameters()),
    }

    def plain() -> None:
        lm_loss(model(idx), tgt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Lanczos runs separately below, on the largest block only: on one CPU thread each
    # Hessian-vector product of this model costs several seconds
    lens = CurvatureLens(model, lm_loss, top_k=10, every=1, lanczos_k=0, on_unsupported="skip")
    steps = {"plain": [], "recording": []}
    with lens:
        for _ in range(1 if args.quick else 2):
            steps["plain"].append(_timed(plain))

            def recording() -> None:
                lm_loss(model(idx), tgt).backward()
                lens.step()
                opt.step()
                opt.zero_grad(set_to_none=True)

            lens._paused = False
            steps["recording"].append(_timed(recording))
    plain_s = statistics.median(steps["plain"])
    out["plain_step_s"] = plain_s
    out["recording_step_plain_steps"] = statistics.median(steps["recording"]) / plain_s
    factors = lens.running_factors()
    out["running_factor_forms"] = {
        name: [type(f.C_A).__name__, type(f.C_delta).__name__] for name, f in factors.items()
        if not isinstance(f.C_A, torch.Tensor) or not isinstance(f.C_delta, torch.Tensor)}
    out["rss_after_training_gb"] = peak_rss_gb()
    holder: list = []
    out["analyze_s"] = _timed(lambda: holder.append(lens.analyze(idx, tgt)))
    report = holder[0]
    out["analyze_plain_steps"] = out["analyze_s"] / plain_s
    out["layers"] = sorted(report.layers)
    out["finite_alpha"] = sum(1 for r in report.layers.values() if math.isfinite(r.alpha))
    out["nan_reasons"] = {n: r.nan_reasons.get("alpha", "") for n, r in report.layers.items()
                          if not math.isfinite(r.alpha)}
    out["rss_after_analyze_gb"] = peak_rss_gb()
    out["gpu_after_analyze_gb"] = peak_gpu_gb()
    # Lanczos (K=10) on the 38.6M-dim tied block within the default budget, run until the
    # basis is full and restarted (thick restart) a few times: the memory it can ever take
    dim, k = model.wte.weight.numel(), 2 if args.quick else 10
    budget = resolve_budget(None, _DEVICE)
    cap = lanczos_max_basis(dim, k, "largest", torch.float32, budget, "wte")
    num_iter = 6 if args.quick else (cap or 40) + 6
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not converged in num_iter: expected
        vals = block_eigenvalues(model, lm_loss, idx, tgt, "wte", k, num_iter=num_iter)
    _sync()
    out["tied_block_lanczos"] = {"k": k, "dim": dim, "max_basis": cap, "num_iter": num_iter,
                                 "budget_gb": budget / 1e9,
                                 "values": vals.tolist(), "seconds": time.perf_counter() - start}
    out["peak_rss_gb"] = peak_rss_gb()
    out["peak_gpu_gb"] = peak_gpu_gb()
    return out


# ----------------------------------------------------------------------------- driver


def _print_resnet(r: dict[str, Any]) -> None:
    print(f"ResNet-18 ({r['model']}), median of {r['rounds']} interleaved rounds")
    print(f"  plain step {r['plain_step_s']:.3f} s; recording step {r['recording_step_s']:.3f} s;"
          f" non-recording {r['non_recording_step_s']:.3f} s")
    print(f"  lens.step() call      {r['lens_step_call_plain_steps']:6.2f} plain steps")
    print(f"  recording extra cost  {r['recording_extra_plain_steps']:6.2f} plain steps "
          f"(target <= 1.5)")
    print(f"  analyze (K=10, L=10)  {r['analyze_plain_steps']:6.1f} plain steps "
          f"({r['analyze_s']:.1f} s; target <= 120)")
    print(f"  Gauss-Newton route on {r['gauss_newton_matrices']} of {r['layers']} matrices")
    if "analyze_products_s" in r:
        print(f"  analyze by products   {r['analyze_products_plain_steps']:6.1f} plain steps "
              f"({r['analyze_products_s']:.1f} s, gauss_newton=False); the two reports differ "
              f"by at most {r['routes_max_rel_diff']}")
    print(f"  every=50 overhead     {r['every50_overhead_derived']:6.3f}x derived"
          + (f", {r['every50_overhead_measured']:.3f}x measured"
             if "every50_overhead_measured" in r else "") + " (target <= 1.05)")
    print(f"  layers {r['layers']}, finite alpha {r['finite_alpha']}; peak RSS "
          f"{r['peak_rss_gb']:.2f} GB" + _gpu(r))
    _print_load(r)


def _gpu(r: dict[str, Any]) -> str:
    return "" if r.get("peak_gpu_gb") is None else f"; peak GPU memory {r['peak_gpu_gb']:.2f} GB"


def _print_load(r: dict[str, Any]) -> None:
    if "load_average" in r:
        print("  load average at the end (1, 5, 15 min): "
              + ", ".join(f"{v:.2f}" for v in r["load_average"]))


def _print_gpt(r: dict[str, Any]) -> None:
    print(f"GPT ({r['model']}; {r['parameters'] / 1e6:.1f}M parameters)")
    print(f"  plain step {r['plain_step_s']:.2f} s; recording step "
          f"{r['recording_step_plain_steps']:.2f} plain steps")
    print(f"  non-dense running factors: {r['running_factor_forms']}")
    print(f"  analyze {r['analyze_s']:.0f} s = {r['analyze_plain_steps']:.1f} plain steps; "
          f"{len(r['layers'])} matrices, finite alpha {r['finite_alpha']}")
    if r["nan_reasons"]:
        print(f"  NaN alpha: {r['nan_reasons']}")
    if "tied_block_lanczos" in r:
        print(f"  tied-block Lanczos: {r['tied_block_lanczos']}")
    print(f"  peak RSS {r['peak_rss_gb']:.2f} GB (after training {r['rss_after_training_gb']:.2f},"
          f" after analyze {r['rss_after_analyze_gb']:.2f}; target <= 6)" + _gpu(r))
    _print_load(r)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("resnet", "gpt", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]: on CUDA every timing "
                        "waits for the device and the peak GPU memory is reported")
    parser.add_argument("--quick", action="store_true", help="smoke run (2 rounds, no every=50 "
                        "run, no GPT Lanczos at K=10)")
    parser.add_argument("--profile", action="store_true", help="cProfile one ResNet analyze()")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--json", help="write this part's results to this file (internal)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    torch.set_num_threads(args.threads)
    global _DEVICE
    _DEVICE = torch.device(args.device)
    if args.part != "all":
        result = (resnet_part if args.part == "resnet" else gpt_part)(args)
        result["threads"] = args.threads
        result["load_average"] = list(os.getloadavg())  # (1, 5, 15 min) at the end of the part
        (_print_resnet if args.part == "resnet" else _print_gpt)(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return result
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick, "threads": args.threads,
                               "device": args.device,
                               "torch": torch.__version__}
    log_lines = []
    for part in ("resnet", "gpt"):
        path = os.path.join(args.out, f".bench_scale_{part}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--rounds",
               str(args.rounds), "--threads", str(args.threads), "--device", args.device,
               "--json", path]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True,
                              text=True, check=False)
        log_lines.append(proc.stdout + proc.stderr)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            print(proc.stderr, end="")
            results[part] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        with open(path) as f:
            results[part] = json.load(f)
        os.remove(path)
    with open(os.path.join(args.out, "bench_scale.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "bench_scale.log"), "w") as f:
        f.write("".join(log_lines))
    return results


if __name__ == "__main__":
    main()
