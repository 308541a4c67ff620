"""Spectral tools from the companion papers: weight tails, random features, free decompression,
ridge asymptotics. Each is a small exact function on a weight, a covariance or a
spectrum; see the module docstrings for the papers and conventions."""

from curvlens.spectra.decompress_model import (
    LayerDecompression,
    decompress_activation_covariance,
    decompress_hessian_block,
    wasserstein_1,
)
from curvlens.spectra.free_decompression import (
    DecompressedSpectrum,
    FitSize,
    SpectralCurve,
    decompress_characteristics,
    fit_spectral_curve,
    free_decompress,
    marchenko_pastur_stieltjes,
    select_curve_degrees,
    stieltjes,
    submatrix_eigenvalues,
)
from curvlens.spectra.random_features import (
    RFSlopes,
    feature_gram,
    random_feature_covariance,
    random_feature_spectrum,
    rf_slopes,
    rf_theory_curve,
)
from curvlens.spectra.ridge import (
    RidgeCurve,
    deep_linearized_covariance,
    feature_learning_curve,
    gaussian_activation_covariance,
    linearized_layer_covariance,
    ridge_fit,
    ridge_kappa,
    ridge_learning_curve,
    ridge_test_error,
)
from curvlens.spectra.weight_tails import (
    Normalization,
    PowerLawTail,
    WeightTailStats,
    esd,
    fit_powerlaw_tail,
    format_weight_tails,
    hill_estimator,
    model_weight_tails,
    weight_tail_stats,
)

__all__ = [
    # weight-spectrum tails (heavy-tailed self-regularization, WeightWatcher)
    "Normalization",
    "PowerLawTail",
    "WeightTailStats",
    "esd",
    "fit_powerlaw_tail",
    "hill_estimator",
    "weight_tail_stats",
    "model_weight_tails",
    "format_weight_tails",
    # random-feature covariance spectra
    "RFSlopes",
    "feature_gram",
    "random_feature_covariance",
    "random_feature_spectrum",
    "rf_theory_curve",
    "rf_slopes",
    # free decompression
    "DecompressedSpectrum",
    "SpectralCurve",
    "stieltjes",
    "marchenko_pastur_stieltjes",
    "decompress_characteristics",
    "fit_spectral_curve",
    "select_curve_degrees",
    "free_decompress",
    "submatrix_eigenvalues",
    "FitSize",
    "LayerDecompression",
    "decompress_activation_covariance",
    "decompress_hessian_block",
    "wasserstein_1",
    # ridge asymptotics
    "RidgeCurve",
    "ridge_kappa",
    "ridge_test_error",
    "ridge_learning_curve",
    "ridge_fit",
    "gaussian_activation_covariance",
    "linearized_layer_covariance",
    "deep_linearized_covariance",
    "feature_learning_curve",
]
