"""The memory budget: option parsing, refusals before allocation, bounded Lanczos bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlens._budget import MemoryBudgetError, check_fits, resolve_budget
from curvlens.hessian_spectrum import block_eigenvalues, lanczos_max_basis

DT = torch.float64


def test_resolve_budget_parses_and_defaults():
    assert resolve_budget("2GB") == 2 * 10**9
    assert resolve_budget("512 MiB") == 512 * 1024**2
    assert resolve_budget(1e6) == 10**6
    default = resolve_budget(None)
    assert 64 * 1024**2 <= default <= 4 * 1024**3
    for bad in ("lots", "-1GB", 0, True, [1]):
        with pytest.raises(ValueError, match="memory_budget"):
            resolve_budget(bad)


def test_check_fits_names_layer_size_and_option():
    check_fits(100, 100, what="x", layer="a")
    with pytest.raises(MemoryBudgetError, match=r"layer 'blocks.0.fc': a dense factor needs "
                                                r"1 KiB but memory_budget is 100 B; raise "
                                                r"memory_budget="):
        check_fits(1024, 100, what="a dense factor", layer="blocks.0.fc")


def _mlp_case():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x = torch.randn(32, 6, generator=g, dtype=DT)
    y = torch.randn(32, 3, generator=g, dtype=DT)
    return model, nn.MSELoss(), x, y


def _dense_block(model, loss_fn, x, y, name):
    w = dict(model.named_parameters())[f"{name}.weight"]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(wt):
        return loss_fn(torch.func.functional_call(model, {**params, f"{name}.weight": wt}, (x,)), y)

    H = torch.func.hessian(loss_of)(w.detach())
    return H.reshape(w.numel(), w.numel())


def test_block_eigenvalues_within_a_small_budget_restart_and_match_dense():
    model, loss_fn, x, y = _mlp_case()
    H = _dense_block(model, loss_fn, x, y, "0")  # dim 72
    exact = torch.linalg.eigvalsh(H).flip(0)[:4]
    per_vec = 72 * 8
    budget = (4 + 10) * per_vec  # room for 10 basis vectors: thick restarts
    assert lanczos_max_basis(72, 4, "largest", DT, budget, "0") == 10
    top = block_eigenvalues(model, loss_fn, x, y, "0", 4, memory_budget=budget, num_iter=2000,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(top, exact, rtol=1e-7, atol=1e-10 * float(exact[0]))
    assert lanczos_max_basis(72, 4, "largest", DT, 10**9, "0") is None  # everything fits


def test_block_eigenvalues_refused_before_allocation_names_the_layer():
    model, loss_fn, x, y = _mlp_case()
    with pytest.raises(MemoryBudgetError, match=r"layer '2'.*Lanczos for 5 eigenvalues.*"
                                                r"memory_budget.*lower lanczos_k"):
        block_eigenvalues(model, loss_fn, x, y, "2", 5, memory_budget=8 * 36 * 6)


def test_lens_step_skips_a_layer_whose_recording_fails_and_training_goes_on():
    import warnings

    from curvlens.lens import CurvatureLens

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 4), nn.Tanh(), nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss()
    # a dense 300 x 300 input side does not fit 2000 bytes, nor does its sketch
    lens = CurvatureLens(model, loss_fn, top_k=3, every=1, memory_budget=2000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught, lens:
        warnings.simplefilter("always")
        for _ in range(3):
            loss_fn(model(torch.randn(8, 300)), torch.randint(0, 3, (8,))).backward()
            lens.step()
            opt.step()
            opt.zero_grad()
    mine = [w for w in caught if "recording failed" in str(w.message)]
    assert len(mine) == 1 and "layer '0'" in str(mine[0].message)
    assert list(lens.skipped_layers) == ["0"]
    assert "MemoryBudgetError" in lens.skipped_layers["0"]
    assert "memory_budget" in lens.skipped_layers["0"]
    factors = lens.running_factors()
    assert list(factors) == ["2"] and factors["2"].num_samples == 24
    assert [s for s, _ in lens.gradient_spectra["2"]] == [0, 1, 2]
