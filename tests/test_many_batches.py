"""analyze over an iterable of batches equals analyze over their concatenation."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

from curvlens.hessian_spectrum import block_eigenvalues
from curvlens.kronecker import kronecker_factors
from curvlens.measure import analyze_model

DT = torch.float64
FIELDS = ("sigma", "h", "h_kron", "lambda_top", "alpha", "gamma", "s_rayleigh", "s_lanczos",
          "b_chi", "b_lambda_A", "noise_norm", "noise_floor", "k_kept", "alpha_above_floor",
          "weight_alpha")


def _case():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x = torch.randn(48, 2, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 5, (48,), generator=g)
    return model, nn.CrossEntropyLoss(), x, y


def _batches(x, y, n=4):
    return [(xb, yb) for xb, yb in zip(x.chunk(n), y.chunk(n))]


def test_analyze_over_four_batches_equals_their_concatenation():
    model, loss_fn, x, y = _case()
    opts = dict(top_k=4, lanczos_k=3, bootstrap=50)
    whole = analyze_model(model, loss_fn, x, y, **opts)
    parts = analyze_model(model, loss_fn, _batches(x, y), None, **opts)
    assert list(parts.layers) == list(whole.layers)
    for name, rep in whole.layers.items():
        other = parts.layers[name]
        for field in FIELDS:
            a = torch.as_tensor(getattr(rep, field), dtype=DT)
            b = torch.as_tensor(getattr(other, field), dtype=DT)
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13, equal_nan=True,
                                       msg=f"{name} {field}")
        assert any("4 batches" in n for n in other.notes)
    assert math.isfinite(whole.layers["3"].alpha) and math.isfinite(whole.layers["3"].noise_norm)


class _Counted:
    """A re-iterable of batches that counts how many of its batches are alive at once."""

    def __init__(self, batches):
        self.batches, self.alive, self.peak = batches, 0, 0

    def __iter__(self):
        for xb, yb in self.batches:
            xb = xb.clone()
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(xb, self._freed)
            yield xb, yb

    def _freed(self):
        self.alive -= 1


class _Sized(_Counted):
    def __len__(self):
        return len(self.batches)


# Lanczos is about 90% of its products (about 20 per matrix and analysis, each
# over all eight batches, rebuilt per product when streamed): the fast suite checks the gradient
# fields and h_k here, and Lanczos over batches of unequal sizes in
# test_factors_and_eigenvalues_over_batches_and_unequal_sizes; the slow suite adds it here
@pytest.mark.parametrize("lanczos_k", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_summed_loss_over_unequal_batches_and_streamed_halves(lanczos_k):
    model, _, x, y = _case()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")  # measured as the mean over the samples
    sizes = [5, 7, 6, 6, 4, 8, 6, 6]  # halves of 24 samples each, as the concatenation's
    batches = _Counted(list(zip(x.split(sizes), y.split(sizes))))
    opts = dict(top_k=3, lanczos_k=lanczos_k, bootstrap=0)
    whole = analyze_model(model, loss_fn, x, y, **opts)
    # a budget too small for the eight batches' gradient graphs (about 0.2 MB): every product
    # streams the batches; the default budget keeps the graphs and shares them across matrices
    streamed = analyze_model(model, loss_fn, batches, None, memory_budget=100_000, **opts)
    # streamed: the batch in use, the next being made, and the first batch of two passes that
    # set up the measurement context; never all eight (the noise floor's halves once were)
    assert batches.peak <= 4
    kept = analyze_model(model, loss_fn, batches, None, **opts)
    assert batches.peak >= 8
    # with a len(), the gradients and the floor's halves are running sums over the batches
    sized = analyze_model(model, loss_fn, _Sized(batches.batches), None, **opts)
    for parts in (streamed, kept, sized):
        for name, rep in whole.layers.items():
            for field in ("sigma", "h", "h_kron", "lambda_top", "noise_norm", "alpha"):
                if field == "lambda_top" and not lanczos_k:
                    assert not len(getattr(parts.layers[name], field))
                    continue
                a = torch.as_tensor(getattr(rep, field), dtype=DT)
                b = torch.as_tensor(getattr(parts.layers[name], field), dtype=DT)
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13, equal_nan=True,
                                           msg=f"{name} {field}")
        assert parts.meta["loss_reduction"] == "sum"


def test_factors_and_eigenvalues_over_batches_and_unequal_sizes():
    model, loss_fn, x, y = _case()
    batches = [(x[:5], y[:5]), (x[5:30], y[5:30]), (x[30:], y[30:])]  # 5, 25, 18 samples
    f_all = kronecker_factors(model, loss_fn, x, y)
    f_parts = kronecker_factors(model, loss_fn, batches, None)
    for name, f in f_all.items():
        torch.testing.assert_close(f_parts[name].C_A, f.C_A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(f_parts[name].C_delta, f.C_delta, rtol=1e-12, atol=1e-15)
        assert f_parts[name].num_samples == 48
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    lam = block_eigenvalues(model, loss_fn, x, y, "3", 4, generator=gen())
    lam_parts = block_eigenvalues(model, loss_fn, batches, None, "3", 4, generator=gen())
    torch.testing.assert_close(lam_parts, lam, rtol=1e-10, atol=1e-14)


def test_one_shot_iterators_and_bad_batches_are_refused():
    model, loss_fn, x, y = _case()
    with pytest.raises(ValueError, match="one-shot iterator"):
        analyze_model(model, loss_fn, iter(_batches(x, y)), None, top_k=3)
    with pytest.raises(ValueError, match=r"batch 0 of the fixed data"):
        kronecker_factors(model, loss_fn, [x], None)


def test_lens_analyze_takes_a_list_of_batches():
    from curvlens.lens import CurvatureLens

    model, loss_fn, x, y = _case()
    lens = CurvatureLens(model, loss_fn, top_k=3, lanczos_k=0, analyze_options={"bootstrap": 0})
    report = lens.analyze(_batches(x, y, 2), None)
    direct = analyze_model(model, loss_fn, x, y, top_k=3, lanczos_k=0, bootstrap=0)
    torch.testing.assert_close(torch.tensor(report.layers["5"].h),
                               torch.tensor(direct.layers["5"].h), rtol=1e-10, atol=0)
