"""The examples run end to end at small sizes (their command-line flags)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformer_lm_example(capsys):
    example = _load("transformer_lm")
    assert len(example.stdlib_text(5000)) == 5000  # text that ships with Python
    example.main("--steps 3 --d 8 --blocks 1 --heads 2 --context 8 --batch 6 --chars 5000 "
                 "--top-k 3 --every 1 --lanczos-k 0 --bootstrap 0".split())
    out = capsys.readouterr().out
    assert "curvlens report" in out and "in_proj_weight" not in out.split("curvlens report")[0]
    assert "~proj_weight.q" in out and "aliases ['wte.weight', 'head.weight']" in out
