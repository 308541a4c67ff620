"""The documentation's API reference covers the public API (``make docs`` builds it)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import curvlens
import curvlens.spectra

DOCS = Path(__file__).resolve().parents[1] / "docs"
_DIRECTIVE = re.compile(r"^\.\. auto(?:class|function|data|module|exception|method)::\s+(\S+)",
                        re.MULTILINE)


def documented() -> set[str]:
    """Every object an ``.. auto*::`` directive of docs/ documents, by qualified name."""
    return {m for path in DOCS.rglob("*.rst") for m in _DIRECTIVE.findall(path.read_text())}


def _resolve(qualname: str) -> object:
    parts = qualname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualname)


@pytest.mark.parametrize("module", [curvlens, curvlens.spectra], ids=lambda m: m.__name__)
def test_every_public_name_is_in_the_api_reference(module):
    names = documented()
    missing = [n for n in module.__all__ if f"{module.__name__}.{n}" not in names]
    assert not missing, (f"add these names of {module.__name__}.__all__ to docs/api*.rst "
                         f"(e.g. '.. autofunction:: {module.__name__}.{(missing or ['x'])[0]}'): "
                         f"{missing}")


def test_every_documented_name_exists():
    for qualname in sorted(documented()):
        _resolve(qualname)  # raises on a stale entry
