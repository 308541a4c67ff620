"""Tests of ``curvlens reproduce --full``: the suite, the paper-style table, its files."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from curvlens._paper_table import PAPER, layer_role, paper_table, summary_numbers
from curvlens._reproduce import FULL_TASKS, run_reproduce
from curvlens.cli import main
from curvlens.layers import find_layers
from curvlens.report import load_reports, median_interval
from curvlens.results import LayerReport, Report


def test_full_suite_architectures_have_93_matrices():
    from curvlens import _tasks as T
    from curvlens import _zoo as Z

    models = [T.DigitsCNN(), Z.DeepMLP(64, 10, 128, 6), Z.ResNetDigits(),
              Z.ViTDigits(dim=32, depth=4), Z.GPT(90, dim=48, depth=5), Z.DeepMLP(depth=10)]
    counts = [len(find_layers(m, None, on_unsupported="skip")) for m in models]
    assert counts == [4, 6, 16, 27, 33, 10] and sum(counts) >= 93
    images = torch.zeros(2, 1, 8, 8)
    for model in models[:4]:
        assert model(images).shape == (2, 10)
    assert models[4](torch.zeros(2, 64, dtype=torch.long)).shape == (2, 64, 90)
    assert models[5](torch.zeros(2, 32)).shape == (2, 8)


@pytest.mark.slow
def test_full_suite_has_93_layers_from_5_architectures_on_3_data_sets():
    counts, roles = {}, set()
    for task, build in FULL_TASKS.items():
        model, _, data = build(0.001, 0, 16)  # one or two training steps
        found = find_layers(model, None, on_unsupported="skip")
        counts[task] = len(found)
        roles |= {layer_role(task, name, LayerReport(kind=info.kind.value))
                  for name, info in found.items()}
        assert isinstance(data, list) and len(data) >= 2  # batches: two halves for the floor
        assert sum(len(x) for x, _ in data) == (2 if task == "stdlib-gpt" else 16)
    assert sum(counts.values()) >= 93, counts
    assert {"digits-cnn", "digits-resnet", "digits-vit", "stdlib-gpt", "teacher-mlp"} <= set(
        counts)
    assert {"conv", "attention", "mlp-up", "mlp-down", "embedding", "lm-head", "head",
            "mlp"} <= roles


def test_layer_roles():
    conv, lin, emb = (LayerReport(kind=k) for k in ("conv", "linear", "embedding"))
    head = LayerReport(kind="head")
    assert layer_role("digits-resnet", "blocks.0.conv1", conv) == "conv"
    assert layer_role("stdlib-gpt", "blocks.3.attn.q", lin) == "attention"
    assert layer_role("stdlib-gpt", "blocks.3.up", lin) == "mlp-up"
    assert layer_role("stdlib-gpt", "blocks.3.down", lin) == "mlp-down"
    assert layer_role("stdlib-gpt", "tok", emb) == "embedding"
    assert layer_role("stdlib-gpt", "head", head) == "lm-head"
    assert layer_role("digits-vit", "head", head) == "head"
    assert layer_role("teacher-mlp", "layers.2", lin) == "mlp"


def _layer(alpha: float, gamma: float, s: float, flags: str = "") -> LayerReport:
    return LayerReport(kind="conv", alpha=alpha, gamma=gamma, s_rayleigh=s,
                       predicted_s=alpha * gamma, transfer_error_rayleigh=abs(s - alpha * gamma)
                       / s, alpha_ci=(alpha - 0.1, alpha + 0.1), top_k=20, k_kept=15,
                       trust_flags={"alpha": flags, "gamma": "", "s_rayleigh": "",
                                    "s_lanczos": ""})


def test_summary_medians_use_trusted_layers_with_order_statistic_intervals():
    layers = {f"c{i}": _layer(1.5 + 0.1 * i, 1.0, 1.6 + 0.1 * i) for i in range(8)}
    layers["bad"] = _layer(9.0, 1.0, 1.0, flags="noise_floor")
    results = {"digits-cnn": Report(layers=layers)}
    nums = summary_numbers(results)
    alphas = [1.5 + 0.1 * i for i in range(8)]
    assert nums["layers"] == 9 and nums["trusted"] == 8
    med, lo, hi = nums["roles"]["conv"]["alpha"]
    assert med == pytest.approx(statistics.median(alphas))
    assert (lo, hi) == median_interval(alphas)
    assert nums["roles"]["conv"]["paper"] == PAPER["conv"]
    text = paper_table(results)
    assert "9.00±.10!" in text and "1 left out: noise_floor 1" in text
    assert "alpha ~ 2" in text and "(paper: ~2% over 93 layers)" in text


@pytest.mark.slow
def test_full_reproduce_end_to_end_tiny(tmp_path):
    lines: list[str] = []
    results = run_reproduce(full=True, tasks=["digits-vit", "teacher-mlp"], scale=0.01,
                            fixed_batch=64, top_k=6, lanczos_k=4, out=tmp_path,
                            printer=lines.append, progress=False)
    text = "\n".join(lines)
    assert "attention" in text and "alpha 1.17-1.43" in text
    assert "K = 6 (the paper used K = 20)" in text and "teacher-mlp " in text
    assert "analyzed 10 layers on 64 samples" in text
    reports = load_reports(tmp_path / "reproduce.json")
    assert [r.meta["task"] for r in reports] == ["digits-vit", "teacher-mlp"]
    assert all(r.layers[n].trust_flags for r in reports for n in r.layers)
    meta = json.loads((tmp_path / "reproduce.json").read_text())["meta"]
    assert meta["full"] and meta["seconds"] > 0
    assert meta["summary"]["layers"] == sum(len(r.layers) for r in results.values())
    assert (tmp_path / "reproduce.png").stat().st_size > 0
    assert (tmp_path / "reproduce.txt").read_text().startswith("task ")
    vit = results["digits-vit"].layers["blocks.0.attn.q"]
    assert math.isfinite(vit.alignment_score) and 0 <= vit.alignment_score <= 1


def test_reproduce_cli_rejects_unknown_full_tasks(capsys):
    assert main(["reproduce", "--full", "--tasks", "chars"]) == 2
    assert "unknown tasks ['chars']" in capsys.readouterr().err


def test_shifted_moves_each_image_by_one_of_the_nine_offsets():
    from curvlens._tasks import shifted

    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=g) + 0.1  # no zeros: a shift is visible
    out = shifted(x, torch.Generator().manual_seed(1))
    seen = set()
    for a, b in zip(x, out):
        hits = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.zeros_like(a)  # brute force: copy the overlapping window
                ref[:, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)] = \
                    a[:, max(0, dy):8 - max(0, -dy), max(0, dx):8 - max(0, -dx)]
                if torch.equal(ref, b):
                    hits.append((dy, dx))
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 9
