"""Optimizers driven by curvature measurements: SpectralNewton and its functional kernels."""

from curvlens.optim._functional import (
    DampingMode,
    scale_to_rms,
    spectral_transform,
    spectral_update,
    spectral_update_cholesky,
    spectral_update_eigh,
    spectral_update_svd,
)
from curvlens.optim.spectral_newton import DEFAULT_ALPHA, SpectralNewton, split_parameters

__all__ = [
    "SpectralNewton",
    "split_parameters",
    "DEFAULT_ALPHA",
    "DampingMode",
    "spectral_transform",
    "spectral_update",
    "spectral_update_svd",
    "spectral_update_cholesky",
    "spectral_update_eigh",
    "scale_to_rms",
]
