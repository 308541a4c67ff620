"""Loss semantics: mean or sum reductions, dict or tuple outputs, losses computed in the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlens._losses import batch_scale, loss_reduction, select_output
from curvlens.kronecker import kronecker_factors
from curvlens.lens import CurvatureLens
from curvlens.measure import analyze_model

DT = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(B=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g, dtype=DT), torch.randn(B, 3, generator=g, dtype=DT)


def _per_sample_factors(net, x, y, per_sample=lambda o, t: ((o - t) ** 2).mean()):
    """C_A and C_delta of both layers by a loop over samples (delta_i = dl_i / dy_i)."""
    out = {"0": [0.0, 0.0], "2": [0.0, 0.0]}
    for xi, yi in zip(x, y):
        h = net[0](xi[None])
        a1 = torch.tanh(h)
        o = net[2](a1)
        li = per_sample(o, yi[None])  # sample i's loss
        dh, do = torch.autograd.grad(li, (h, o))
        out["0"][0] += xi[:, None] @ xi[None]
        out["0"][1] += dh.T @ dh
        out["2"][0] += a1.detach().T @ a1.detach()
        out["2"][1] += do.T @ do
    B = len(x)
    return {k: (A / B, D / B) for k, (A, D) in out.items()}


def _sq_sum(o, t):
    return ((o - t) ** 2).sum()


@pytest.mark.parametrize("loss,reduction,per_sample", [
    (nn.MSELoss(), None, None),
    (nn.MSELoss(reduction="sum"), None, _sq_sum),
    (lambda out, y: ((out - y) ** 2).mean(1).sum(), "sum", None),  # any callable, reduction given
    (lambda out, y: ((out - y) ** 2).mean(), "mean", None),
], ids=["module-mean", "module-sum", "callable-sum", "callable-mean"])
def test_factors_equal_per_sample_loops_for_mean_and_sum(loss, reduction, per_sample):
    net = _net()
    x, y = _data()
    ref = _per_sample_factors(net, x, y, *([per_sample] if per_sample else []))
    f = kronecker_factors(net, loss, x, y, reduction=reduction)
    for name, (C_A, C_delta) in ref.items():
        torch.testing.assert_close(f[name].C_A, C_A, rtol=0, atol=1e-12)
        torch.testing.assert_close(f[name].C_delta, C_delta, rtol=0, atol=1e-12)


def test_sum_and_mean_give_the_same_report():
    net = _net()
    x, y = _data(16)
    opts = dict(top_k=3, bootstrap=0, lanczos_k=2)
    mean = analyze_model(net, nn.MSELoss(), x, y, **opts)
    total = analyze_model(net, lambda o, t: F.mse_loss(o, t, reduction="sum") / 3, x, y,
                          loss_reduction="sum", **opts)
    assert total.meta["loss_reduction"] == "sum" and mean.meta["loss_reduction"] == "mean"
    for name, rep in mean.layers.items():
        other = total.layers[name]
        for field in ("alpha", "gamma", "s_rayleigh", "s_lanczos", "b_chi", "noise_norm"):
            a, b = getattr(rep, field), getattr(other, field)
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9,
                                                                     abs_tol=1e-12), (name, field)
        assert math.isfinite(rep.gamma) and math.isfinite(rep.noise_norm)
        torch.testing.assert_close(torch.tensor(rep.sigma), torch.tensor(other.sigma))


def test_lens_running_factors_use_the_reduction():
    net = _net()
    x, y = _data(8)
    for loss, option, per_sample in (
            (nn.MSELoss(reduction="sum"), None, _sq_sum),
            (lambda o, t: ((o - t) ** 2).mean(1).sum(), "sum", lambda o, t: ((o - t) ** 2).mean())):
        ref = _per_sample_factors(net, x, y, per_sample)
        lens = CurvatureLens(net, loss, top_k=2, every=1, loss_reduction=option,
                             on_unsupported="skip")
        with lens:
            loss(net(x), y).backward()
            lens.step()
        net.zero_grad()
        f = lens.running_factors()
        torch.testing.assert_close(f["2"].C_delta, ref["2"][1], rtol=0, atol=1e-12)


def test_reduction_detection_and_errors():
    assert loss_reduction(nn.CrossEntropyLoss()).value == "mean"
    assert loss_reduction(nn.CrossEntropyLoss(reduction="sum")).value == "sum"
    import functools

    assert loss_reduction(functools.partial(F.cross_entropy, reduction="sum")).value == "sum"
    assert batch_scale(lambda o, t: o.sum(), 5, "sum") == 1.0
    with pytest.raises(ValueError, match="reduction 'none'"):
        loss_reduction(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        loss_reduction(nn.MSELoss(), "avg")
    with pytest.raises(TypeError, match="pass output="):
        select_output({"logits": torch.zeros(1)}, None)


class DictNet(nn.Module):
    """The same network returning ``{"logits": ...}`` or ``(logits, extra)``."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        return {"logits": z, "aux": z.sum()} if self.kind == "dict" else (z.sum(), z)


@pytest.mark.parametrize("kind,selector", [("dict", "logits"), ("tuple", 1)])
@pytest.mark.parametrize("mode", ["fisher", "ggn"])
def test_fisher_and_ggn_with_dict_or_tuple_outputs(kind, selector, mode):
    net = _net()
    x = _data()[0]
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    wrapped = DictNet(net, kind)

    def loss(out, t):
        return F.cross_entropy(out["logits"] if kind == "dict" else out[1], t)

    ref = kronecker_factors(net, nn.CrossEntropyLoss(), x, y, mode=mode, mc_samples=3,
                            generator=torch.Generator().manual_seed(5))
    got = kronecker_factors(wrapped, loss, x, y, mode=mode, output=selector, mc_samples=3,
                            likelihood="categorical", generator=torch.Generator().manual_seed(5))
    for name in ("0", "2"):
        torch.testing.assert_close(got[f"net.{name}"].C_delta, ref[name].C_delta,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(got[f"net.{name}"].C_A, ref[name].C_A, rtol=0, atol=1e-12)


class InternalLoss(nn.Module):
    """HuggingFace style: the model takes the labels and returns ``{"loss", "logits"}``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_models_that_compute_their_loss_inside_keep_working():
    net = _net()
    x = _data(16)[0]
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    opts = dict(top_k=2, bootstrap=0, lanczos_k=2, noise_floor=False)
    ref = analyze_model(net, nn.CrossEntropyLoss(), x, y, **opts)
    hf = analyze_model(InternalLoss(net), lambda out, _: out["loss"], (x, y), y, **opts)
    for name, rep in ref.layers.items():
        other = hf.layers[f"net.{name}"]
        torch.testing.assert_close(torch.tensor(other.h), torch.tensor(rep.h))
        torch.testing.assert_close(torch.tensor(other.h_kron), torch.tensor(rep.h_kron))
