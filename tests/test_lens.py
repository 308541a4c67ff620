"""Tests of curvlens.lens: hooks lifecycle, `every`, training identity, running statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlens.kronecker import kronecker_factors
from curvlens.lens import CurvatureLens


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8),
        nn.Tanh(), nn.Linear(8, 5),
    )


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _train(steps: int, lens_kwargs: dict | None, analyze_at: tuple[int, ...] = ()):
    """Seeded training with dropout and random batches; returns (losses, params, lens)."""
    torch.manual_seed(0)
    model = _cnn()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = _data()
    losses = []
    lens = CurvatureLens(model, loss_fn, **lens_kwargs) if lens_kwargs is not None else None
    ctx = lens if lens is not None else torch.enable_grad()
    with ctx:
        for t in range(steps):
            idx = torch.randperm(64)[:16]  # uses the global RNG, like a DataLoader
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            if lens is not None:
                lens.step()
                if t in analyze_at:
                    lens.analyze(x_all[:16], y_all[:16], epoch=t)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()], lens


def test_training_identical_with_step_only():
    plain_losses, plain_params, _ = _train(7, None)
    losses, params, lens = _train(7, {"top_k": 3, "every": 2, "on_unsupported": "skip"})
    assert losses == plain_losses  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert lens.num_steps == 7
    assert _hook_count(lens.model) == 0


def test_every_is_honoured():
    _, _, lens = _train(7, {"top_k": 3, "every": 3, "on_unsupported": "skip"})
    for name, records in lens.gradient_spectra.items():
        assert [s for s, _ in records] == [0, 3, 6], name
    # factors: 3 recorded steps of 16 samples each
    assert lens._recorder.recorded_factor_steps == 3
    assert all(n == 48 for n in lens._recorder.accumulator.num_samples.values())


def test_recorded_spectrum_matches_svd_of_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    lens = CurvatureLens(model, loss_fn, top_k=4, every=1)
    with lens:
        loss_fn(model(x), y).backward()
        lens.step()
    ref = torch.linalg.svdvals(model[0].weight.grad)[:4]
    torch.testing.assert_close(lens.gradient_spectra["0"][0][1], ref, rtol=1e-12, atol=1e-14)
    # head 3x5: window clipped to min(m, n) = 3
    assert lens.gradient_spectra["2"][0][1].numel() == 3


def test_running_factors_equal_batch_factors():
    """Two recorded steps on batches b1, b2 == factors of the concatenated batch (mean loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    lens = CurvatureLens(model, loss_fn, top_k=2, every=1)
    with lens:
        for sl in (slice(0, 6), slice(6, 12)):
            loss_fn(model(x[sl]), y[sl]).backward()
            lens.step()
            model.zero_grad()
    running = lens.running_factors()
    ref = kronecker_factors(model, loss_fn, x, y)
    for name in ref:
        torch.testing.assert_close(running[name].C_A, ref[name].C_A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(running[name].C_delta, ref[name].C_delta,
                                   rtol=1e-10, atol=1e-12)
        assert running[name].num_samples == 12
    lens.reset_running()
    assert lens.running_factors() == {}


def test_no_capture_on_non_recording_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    lens = CurvatureLens(model, loss_fn, top_k=2, every=5)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with lens:
        loss_fn(model(x), y).backward()
        assert len(lens._capture.records["0"].inputs) == 1  # step 0 records
        lens.step()
        loss_fn(model(x), y).backward()
        assert len(lens._capture.records["0"].inputs) == 0  # step 1 does not
        lens.step()


def test_hooks_removed_after_exit_and_exception():
    model = _cnn()
    lens = CurvatureLens(model, nn.CrossEntropyLoss(), on_unsupported="skip")
    before = _hook_count(model)
    with lens:
        assert _hook_count(model) > before
        assert lens.active
    assert _hook_count(model) == before and not lens.active
    with pytest.raises(ZeroDivisionError), lens:
        model(_data()[0][:2])
        raise ZeroDivisionError
    assert _hook_count(model) == before and not lens.active
    with lens:  # re-enterable
        pass
    assert _hook_count(model) == before


def test_nesting_rejected():
    model = nn.Linear(3, 2)
    lens = CurvatureLens(model, nn.MSELoss())
    with lens, pytest.raises(RuntimeError, match="already active"), lens:
        pass
    assert _hook_count(model) == 0


def test_step_outside_context():
    lens = CurvatureLens(nn.Linear(3, 2), nn.MSELoss())
    with pytest.raises(RuntimeError, match="outside its context"):
        lens.step()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_gradient_names_layer(bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    lens = CurvatureLens(model, nn.MSELoss(), every=1)
    with lens:
        nn.MSELoss()(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
        model[2].weight.grad[0, 0] = bad
        with pytest.raises(RuntimeError, match="gradient of layer '2'"):
            lens.step()
    assert _hook_count(model) == 0


def test_missing_gradient_names_layer():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    lens = CurvatureLens(model, nn.MSELoss(), every=1)
    with lens:
        nn.MSELoss()(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
        with pytest.raises(RuntimeError, match="'unused' has no gradient"):
            lens.step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"every": 2.5}, "every"),
        ({"kronecker": "kfac"}, "kronecker must be one of"),
        ({"mode": "true"}, "mode must be one of"),
        ({"on_unsupported": "ignore"}, "on_unsupported must be one of"),
        ({"layers": ["nope"]}, "'nope'"),
    ],
)
def test_options_validated_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurvatureLens(nn.Sequential(nn.Linear(3, 2)), nn.MSELoss(), **kwargs)


def test_latest_alphas_empty_before_analyze():
    lens = CurvatureLens(nn.Linear(3, 2), nn.MSELoss())
    assert lens.latest_alphas() == {}


def test_gamma_trace_is_rank_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    lens = CurvatureLens(model, nn.CrossEntropyLoss(), top_k=6, every=1, kronecker="none")
    with lens:
        nn.CrossEntropyLoss()(model(torch.randn(32, 8)), torch.randint(0, 3, (32,))).backward()
        lens.step()
    assert _hook_count(model) == 0
    S = torch.linalg.svdvals(model[0].weight.grad.double())[:6]
    k = torch.arange(1, 7, dtype=torch.float64).log()
    ref = -torch.linalg.lstsq(torch.stack([torch.ones(6, dtype=torch.float64), k], 1),
                              S.log()[:, None]).solution[1, 0]
    assert lens.gamma_trace()["0"][0][1] == pytest.approx(float(ref), rel=1e-5)


_FAST = {"top_k": 3, "every": 2, "on_unsupported": "skip", "lanczos_k": 3,
         "analyze_options": {"bootstrap": 20}}


def test_training_identical_with_analyze_in_between():
    plain_losses, plain_params, _ = _train(6, None)
    losses, params, lens = _train(6, _FAST, analyze_at=(1, 4))
    assert losses == plain_losses  # bit for bit, dropout RNG and BN statistics included
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert [r.epoch for r in lens.history] == [1, 4]
    assert [r.step for r in lens.history] == [2, 5]
    assert _hook_count(lens.model) == 0


def test_analyze_restores_grads_and_buffers():
    torch.manual_seed(0)
    model = _cnn()
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(16)
    lens = CurvatureLens(model, loss_fn, **_FAST)
    with lens:
        loss_fn(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        rng = torch.get_rng_state()
        captured = {n: len(r.inputs) for n, r in lens._capture.records.items()}
        report = lens.analyze(x, y, epoch=0)
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        assert torch.equal(torch.get_rng_state(), rng)
        assert model.training and model[2].training  # dropout back in train mode
        # the lens's own capture is paused during the analysis
        assert {n: len(r.inputs) for n, r in lens._capture.records.items()} == captured
    assert list(report.layers) == list(lens.layers)
    assert report.meta["lens"]["every"] == 2


def test_latest_alphas_and_history():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    lens = CurvatureLens(model, loss_fn, top_k=4, lanczos_k=0, analyze_options={"bootstrap": 0})
    first = lens.analyze(x, y, epoch=0)  # outside the context is fine
    second = lens.analyze(x[:16], y[:16], epoch=1)
    assert lens.history == [first, second]
    alphas = lens.latest_alphas()
    assert alphas == {name: rep.alpha for name, rep in second.layers.items()}
    assert all(math.isfinite(a) for a in alphas.values())


def test_analyze_bad_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    lens = CurvatureLens(model, nn.CrossEntropyLoss(), top_k=2)
    with pytest.raises(ValueError, match="empty batch"):
        lens.analyze(torch.randn(0, 3), torch.randint(0, 2, (0,)))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        lens.analyze(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="is on meta"):
        lens.analyze(torch.randn(4, 3, device="meta"), torch.randint(0, 2, (4,)))


def test_lens_callback_drives_the_lens(tmp_path):
    from curvlens.callbacks import LensCallback
    from curvlens.report import load_reports

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    lens = CurvatureLens(model, loss_fn, top_k=3, every=2, lanczos_k=0,
                         analyze_options={"bootstrap": 0})
    printed = []
    cb = LensCallback(lens, (x, y), analyze_every=2, print_table=True, out_dir=tmp_path,
                      printer=printed.append)
    with cb:
        assert lens.active and _hook_count(model) > 0
        for epoch in range(4):
            for _ in range(3):
                loss_fn(model(x), y).backward()
                cb.on_after_backward()
                model.zero_grad()
            cb.on_epoch_end(epoch)
    assert not lens.active and _hook_count(model) == 0
    assert lens.num_steps == 12
    assert [r.epoch for r in lens.history] == [1, 3]  # analyze_every=2
    assert len(printed) == 2 and "curvlens report | epoch 3" in printed[-1]
    assert [r.epoch for r in load_reports(tmp_path / "run.json")] == [1, 3]
    with pytest.raises(TypeError, match="CurvatureLens"):
        LensCallback(model)


def test_half_precision_model_records_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 6, dtype=torch.bfloat16), torch.randint(0, 3, (16,))
    lens = CurvatureLens(model, loss_fn, top_k=3, every=1)
    with lens:
        loss_fn(model(x), y).backward()
        lens.step()
    f = lens.running_factors()["0"]
    assert f.C_A.dtype == torch.float32
    torch.testing.assert_close(f.C_A, x.float().T @ x.float() / 16, rtol=1e-5, atol=1e-6)
    ref = torch.linalg.svdvals(model[0].weight.grad.float())[:3]
    torch.testing.assert_close(lens.gradient_spectra["0"][0][1], ref, rtol=1e-5, atol=1e-7)
