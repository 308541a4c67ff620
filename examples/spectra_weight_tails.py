"""Weight-spectrum tails: ESD of a heavy-tailed (Student-t) and a Gaussian matrix, CSN fit.

Usage: python examples/spectra_weight_tails.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from curvlens.spectra import esd, weight_tail_stats  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    mats = {"Student-t (mu=1)": rng.standard_t(1.0, (1000, 500)),
            "Gaussian": rng.standard_normal((1000, 500))}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, w in mats.items():
        stats = weight_tail_stats(torch.from_numpy(w))
        lam = esd(torch.from_numpy(w)).numpy()
        bins = np.geomspace(lam.min(), lam.max(), 60)
        hist, edges = np.histogram(lam, bins=bins, density=True)
        centers = np.sqrt(edges[1:] * edges[:-1])
        ax.loglog(centers[hist > 0], hist[hist > 0], "o", ms=3, label=f"{label} ESD")
        x = np.geomspace(stats.xmin, lam.max(), 50)
        frac = stats.n_tail / lam.size
        line = frac * (stats.alpha - 1) / stats.xmin * (x / stats.xmin) ** (-stats.alpha)
        ax.loglog(x, line, "-", label=f"CSN fit alpha={stats.alpha:.2f}+-{stats.alpha_sigma:.2f}")
        print(f"{label}: alpha={stats.alpha:.3f} (theory 1.5 for mu=1), spikes={stats.n_spikes}, "
              f"stable rank={stats.stable_rank:.1f}")
    ax.set_xlabel("eigenvalue of W^T W")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "spectra_weight_tails.png", dpi=120)
    print(f"wrote {out / 'spectra_weight_tails.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "curvlens-out"))
