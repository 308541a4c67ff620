"""Tests of curvlens.callbacks: TensorBoard logging of every report, read back from events.

lightning and tensorboard are in the ``test`` extra: these tests import them without a skip, so
``make test`` fails loudly rather than skipping them when an install is broken.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from curvlens.callbacks import SCALAR_FIELDS, LensCallback, report_scalars
from curvlens.lens import CurvatureLens
from curvlens.results import LayerReport, Report


class _LitMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> tuple:
    """32 seeded samples and a loader of 4 batches of 8."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return x, y, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_logged(logged, report: Report, step: int) -> None:
    expected = report_scalars(report)
    assert expected, "nothing to log: the report has no finite exponent"
    for tag, value in expected.items():
        steps = dict(logged[tag])
        assert step in steps, (tag, logged[tag])
        assert steps[step] == pytest.approx(value, rel=1e-6)  # event files store float32


def test_report_scalars_flatten_every_field_and_skip_nan():
    rep = Report(layers={
        "a": LayerReport(name="a", alpha=2.0, gamma=1.0, s_rayleigh=2.2, s_lanczos=1.5,
                         predicted_s=2.0, transfer_error_rayleigh=0.1, transfer_error_lanczos=0.3),
        "b": LayerReport(name="b", alpha=1.0)})
    out = report_scalars(rep)
    assert {f"curvlens/{f}/a" for f in SCALAR_FIELDS} <= set(out)
    assert out["curvlens/alpha/b"] == 1.0 and "curvlens/gamma/b" not in out  # NaN left out
    assert out["curvlens/median_transfer_error"] == 0.1


def _tiny_run(tmp_path, tensorboard):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    lens = CurvatureLens(model, loss_fn, top_k=3, every=1, lanczos_k=0,
                         analyze_options={"bootstrap": 0})
    with LensCallback(lens, (x, y), tensorboard=tensorboard) as cb:
        for epoch in range(2):
            for _ in range(3):
                loss_fn(model(x), y).backward()
                cb.on_after_backward()
                model.zero_grad()
            cb.on_epoch_end(epoch)
    return lens


def test_lens_callback_logs_every_report_to_a_log_dir(tmp_path):
    lens = _tiny_run(tmp_path, tmp_path / "tb")
    logged = _scalars(tmp_path / "tb")
    assert [r.step for r in lens.history] == [3, 6]
    for report in lens.history:
        _assert_logged(logged, report, report.step)
    assert any(t.startswith("curvlens/gamma/") for t in logged)


def test_lens_callback_uses_the_callers_writer_and_leaves_it_open(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    lens = _tiny_run(tmp_path, writer)
    writer.add_scalar("user/after", 1.0, 0)  # still open
    writer.close()
    logged = _scalars(tmp_path / "tb")
    _assert_logged(logged, lens.history[-1], lens.history[-1].step)
    assert "user/after" in logged
    with pytest.raises(TypeError, match="SummaryWriter or a log directory"):
        LensCallback(lens, tensorboard=42)


def test_lightning_callback_logs_exponents_through_the_trainers_tensorboard_logger(tmp_path):
    from curvlens.callbacks import LightningLensCallback

    x, y, loader = _data()
    cb = LightningLensCallback(nn.CrossEntropyLoss(), (x, y), top_k=3, every=1, lanczos_k=0,
                               analyze_options={"bootstrap": 0})
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=logger, enable_checkpointing=False,
                         log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_LitMLP(), loader)
    logger.finalize("success")
    logged = _scalars(logger.log_dir)
    assert len(cb.lens.history) == 2
    for report in cb.lens.history:
        # Lightning logs an epoch-end value at the trainer's global step (4 steps per epoch).
        _assert_logged(logged, report, 4 * (report.epoch + 1) - 1)
    assert all(math.isfinite(v) for series in logged.values() for _, v in series)


def test_lightning_callback_takes_the_trainers_grad_scaler():
    """Under a 16-bit mixed-precision trainer the loss is scaled by the trainer's GradScaler: the
    callback hands that scaler to the lens, so the recorded spectra equal the singular values of
    the unscaled gradient (before, they were ``scale`` times too large: 65536x here)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from curvlens.callbacks import LightningLensCallback

    seen: list[torch.Tensor] = []

    class Module(_LitMLP):
        def on_after_backward(self):  # runs after the callbacks' hook, on the same gradients
            scale = self.trainer.precision_plugin.scaler.get_scale()
            seen.append(torch.linalg.svdvals(self.net[0].weight.grad.double() / scale))

    _, _, loader = _data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    cb = LightningLensCallback(nn.CrossEntropyLoss(), None, top_k=3, every=1)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), loader)
    assert cb.lens._recorder.grad_scaler is scaler
    got = [s for _, s in cb.lens.gradient_spectra["net.0"]]
    assert len(got) == len(seen) == 4
    for a, b in zip(got, seen, strict=True):
        torch.testing.assert_close(a.double(), b[: a.numel()], rtol=1e-4, atol=1e-9)


def test_lightning_callback_steps_analyzes_and_removes_its_hooks():
    """8 steps (2 epochs of 4 batches), one report per epoch, and no hook left on the module."""
    from curvlens.callbacks import LightningLensCallback

    x, y, loader = _data()
    cb = LightningLensCallback(nn.CrossEntropyLoss(), (x, y), top_k=3, every=2, lanczos_k=0,
                               analyze_options={"bootstrap": 0})
    module = _LitMLP()
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert cb.lens.num_steps == 8 and len(cb.lens.history) == 2
    assert cb.lens.history[-1].layers["net.0"].top_k == 3
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules()) == 0
