"""curvlens: layer-by-layer curvature of neural networks while they train.

The public API, grouped by what it is for. See README.md for a tour and shared/SPEC.md for the
definitions of every quantity.
"""

from curvlens.layers import (
    LayerInfo,
    LayerKind,
    LayerSpec,
    find_layers,
    register_layer,
    weight_matrix,
)

__version__ = "0.1.0"

__all__ = [
    # what is measured
    "LayerInfo",
    "LayerKind",
    "LayerSpec",
    "find_layers",
    "register_layer",
    "weight_matrix",
]
