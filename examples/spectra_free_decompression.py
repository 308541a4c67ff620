"""Free decompression: predict a 1200 x 1200 Wishart spectrum from a 300 x 300 submatrix.

Usage: python examples/spectra_free_decompression.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from curvlens.spectra import free_decompress, submatrix_eigenvalues  # noqa: E402


def main(out: Path, n: int = 1200, big_n: int = 2400, n_s: int = 300) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((n, big_n))
    s = x @ x.T / big_n
    true = np.linalg.eigvalsh(s)
    sub = submatrix_eigenvalues(torch.from_numpy(s), n_s,
                                generator=torch.Generator().manual_seed(0)).numpy()
    pred = free_decompress(sub, n)
    q = (np.arange(n) + 0.5) / n
    w1_pred = np.mean(np.abs(np.sort(true) - pred.eigenvalues()))
    w1_base = np.mean(np.abs(np.sort(true) - np.quantile(sub, q)))
    print(f"W1 to the true spectrum: decompressed {w1_pred:.4f}, submatrix as is {w1_base:.4f}")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(true, bins=60, density=True, alpha=0.4, label=f"true eigenvalues ({n}x{n})")
    ax.hist(sub, bins=40, density=True, histtype="step", label=f"submatrix ({n_s}x{n_s})")
    ax.plot(pred.x, pred.density, "k", label="free decompression")
    ax.set_xlim(true.min() - 0.3, true.max() + 0.3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spectra_free_decompression.png", dpi=120)
    print(f"wrote {out / 'spectra_free_decompression.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "curvlens-out"))
