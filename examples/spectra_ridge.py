"""Ridge learning curve: deterministic equivalent vs Monte-Carlo ridge on Gaussian features.

Usage: python examples/spectra_ridge.py OUT_DIR
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from curvlens.spectra import ridge_fit, ridge_learning_curve  # noqa: E402


def main(out: Path, p: int = 100, trials: int = 40) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    eig = torch.arange(1, p + 1, dtype=torch.float64) ** -1.2
    q = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    omega, root = q @ torch.diag(eig) @ q.T, q @ torch.diag(eig.sqrt())
    theta = torch.randn(p, generator=g, dtype=torch.float64)
    sig2 = 0.1
    psi, y2 = omega @ theta, float(theta @ omega @ theta) + sig2
    grid = np.unique(np.geomspace(10, 1000, 40).astype(int))
    points = np.unique(np.geomspace(10, 1000, 10).astype(int))
    fig, ax = plt.subplots(figsize=(6, 4))
    for lam in (1e-4, 1e-2, 1e-1):
        curve = ridge_learning_curve(omega, psi, y2, grid, lam)
        (line,) = ax.loglog(curve.n, curve.test_error, label=f"theory, lambda={lam:g}")
        means, ses = [], []
        for n in points:
            errs = []
            for _ in range(trials):
                phi = torch.randn(int(n), p, generator=g, dtype=torch.float64) @ root.T
                y = phi @ theta + math.sqrt(sig2) * torch.randn(int(n), generator=g,
                                                                dtype=torch.float64)
                d = ridge_fit(phi, y, lam) - theta
                errs.append(float(d @ omega @ d) + sig2)
            means.append(np.mean(errs))
            ses.append(np.std(errs) / math.sqrt(trials))
        ax.errorbar(points, means, yerr=2 * np.array(ses), fmt="o", ms=3, color=line.get_color())
    ax.set_xlabel("training samples n")
    ax.set_ylabel("test MSE (noise included)")
    ax.set_title(f"p={p} Gaussian features; points: Monte Carlo +-2 s.e.")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spectra_ridge.png", dpi=120)
    print(f"wrote {out / 'spectra_ridge.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "curvlens-out"))
