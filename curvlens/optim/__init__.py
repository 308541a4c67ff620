"""Optimizers driven by curvature measurements: SpectralNewton, its policy and its kernels."""

from curvlens.optim._kernels import (
    DampingMode,
    scale_to_rms,
    spectral_transform,
    spectral_update,
    spectral_update_cholesky,
    spectral_update_eigh,
    spectral_update_svd,
    update_bound,
)
from curvlens.optim._policy import (
    LayerChoice,
    Role,
    choose,
    policy_weight_decay,
    roles,
    split_parameters,
)
from curvlens.optim.spectral_newton import DEFAULT_ALPHA, SpectralNewton

__all__ = [
    "SpectralNewton",
    "split_parameters",
    "DEFAULT_ALPHA",
    "Role",
    "LayerChoice",
    "roles",
    "choose",
    "policy_weight_decay",
    "DampingMode",
    "spectral_transform",
    "spectral_update",
    "spectral_update_svd",
    "spectral_update_cholesky",
    "spectral_update_eigh",
    "scale_to_rms",
    "update_bound",
]
