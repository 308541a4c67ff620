"""curvlens: layer-by-layer curvature of neural networks while they train.

The public API, grouped by what it is for (data flows top to bottom). See README.md for a tour
and the documentation (docs/) for the definition of every quantity.
"""

from curvlens import spectra  # spectral tools from companion papers, as a subpackage
from curvlens._modes import BatchNormPolicy
from curvlens.analysis import analyze_layer
from curvlens.callbacks import LensCallback
from curvlens.fit import (
    PowerLawFit,
    compare_rank_models,
    fit_power_law,
    fit_rank_decay,
    participation_ratio,
    zeta_bound,
)
from curvlens.hessian import block_hvp, directional_curvature, measurement_mode, model_hvp
from curvlens.hessian_spectrum import (
    block_eigenvalues,
    hessian_density,
    hessian_trace,
    model_eigenvalues,
)
from curvlens.hooks import Capture
from curvlens.kronecker import KroneckerFactors, kronecker_curvature, kronecker_factors
from curvlens.layers import (
    LayerInfo,
    LayerKind,
    LayerSpec,
    MatrixSlot,
    find_layers,
    register_layer,
    register_matrix_view,
    weight_matrix,
)
from curvlens.lens import CurvatureLens, KroneckerSource
from curvlens.linalg.lanczos import lanczos
from curvlens.linalg.slq import spectral_density
from curvlens.linalg.svd import gradient_svd
from curvlens.linalg.trace import hutchinson_trace
from curvlens.measure import analyze_model
from curvlens.optim import SpectralNewton, split_parameters
from curvlens.results import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    # what is measured
    "LayerInfo",
    "LayerKind",
    "LayerSpec",
    "MatrixSlot",
    "find_layers",
    "register_layer",
    "register_matrix_view",
    "weight_matrix",
    "Capture",
    # numerical kernels (model-agnostic)
    "gradient_svd",
    "lanczos",
    "hutchinson_trace",
    "spectral_density",
    # curvature of a model
    "block_hvp",
    "model_hvp",
    "directional_curvature",
    "block_eigenvalues",
    "model_eigenvalues",
    "hessian_trace",
    "hessian_density",
    "measurement_mode",
    "BatchNormPolicy",
    "KroneckerFactors",
    "kronecker_factors",
    "kronecker_curvature",
    # statistics on spectra
    "PowerLawFit",
    "fit_power_law",
    "fit_rank_decay",
    "compare_rank_models",
    "participation_ratio",
    "zeta_bound",
    # the paper's quantities
    "LayerReport",
    "Report",
    "analyze_layer",
    "analyze_model",
    # training-loop integration
    "CurvatureLens",
    "KroneckerSource",
    "LensCallback",
    # optimizer
    "SpectralNewton",
    "split_parameters",
    # spectral tools from companion papers (a subpackage)
    "spectra",
]
