"""Random-feature spectra inherit the data's power law, with a log correction for p >= 2.

Usage: python examples/spectra_random_features.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from curvlens.spectra import random_feature_spectrum, rf_slopes, rf_theory_curve  # noqa: E402


def main(out: Path, v: int = 6000, d: int = 500, alpha: float = 1.5) -> None:
    out.mkdir(parents=True, exist_ok=True)
    h = torch.arange(1, v + 1, dtype=torch.float64) ** (-alpha)
    w = torch.randn(v, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    j = torch.arange(1, d + 1, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in (1, 2, 3):
        lam = random_feature_spectrum(w, h, p)
        s = rf_slopes(lam, p)
        theory = rf_theory_curve(j, p, alpha)
        theory = theory * lam[9] / theory[9]
        (line,) = ax.loglog(j, lam, label=f"p={p}: raw {s.alpha_raw:.2f}, "
                                          f"log-corrected {s.alpha_corrected:.2f}")
        ax.loglog(j, theory, "--", color=line.get_color(), lw=1)
        print(f"p={p}: raw alpha {s.alpha_raw:.3f}, corrected {s.alpha_corrected:.3f} "
              f"(true {alpha}), ranks {s.j_min}..{s.j_max}")
    ax.set_xlabel("rank j")
    ax.set_ylabel("eigenvalue of K")
    ax.set_title(f"dashed: (log^(p-1)(j+1)/j)^alpha, alpha={alpha}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "spectra_random_features.png", dpi=120)
    print(f"wrote {out / 'spectra_random_features.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "curvlens-out"))
