"""Sphinx configuration of the curvlens documentation (``make docs``)."""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(".."))

import curvlens  # noqa: E402

project = "curvlens"
author = "the curvlens authors"
copyright = "2026, the curvlens authors"
release = curvlens.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Google-style docstrings with tensor shapes; no NumPy-style sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": False, "show-inheritance": False}
# Some annotations name types only under TYPE_CHECKING; leave them as strings.
autodoc_type_aliases: dict[str, str] = {}

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "alabaster"
html_theme_options = {
    "description": "Layer-by-layer curvature of neural networks while they train",
    "fixed_sidebar": True,
}
html_title = f"curvlens {release}"
nitpicky = False
suppress_warnings: list[str] = []

# torch emits deprecation chatter on import under some versions; it is not ours to fix here.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
