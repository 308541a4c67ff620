"""Capture hooks: what they record, and that nothing outlives the context manager."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from curvlens.hooks import Capture
from tests.conftest import build_case


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_records_inputs_and_output_grads(case):
    model, loss_fn, x, y = case
    outputs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n))
               for n, m in model.named_modules() if n in Capture(model).layers]
    with Capture(model) as cap:
        loss_fn(model(x), y).backward()
    for h in handles:
        h.remove()
    for name, record in cap.records.items():
        assert len(record.inputs) == 1 and len(record.output_grads) == 1
        torch.testing.assert_close(record.output_grads[0], outputs[name].grad, rtol=0, atol=0)
        assert not record.inputs[0].requires_grad
        assert record.pairs()[0][1] is record.output_grads[0]


def test_no_hook_survives_exit_or_exception():
    model, loss_fn, x, y = build_case("cnn")
    before = _hook_count(model)
    with Capture(model):
        assert _hook_count(model) > before
    assert _hook_count(model) == before
    with pytest.raises(ZeroDivisionError):
        with Capture(model):
            model(x)
            raise ZeroDivisionError("body fails")
    assert _hook_count(model) == before
    assert not any(k.startswith("_curvlens") for m in model.modules() for k in vars(m))


def test_no_grad_forward_is_ignored_and_graph_is_not_kept():
    model, loss_fn, x, y = build_case("mlp")
    with Capture(model) as cap:
        with torch.no_grad():
            model(x)
        assert all(len(r.inputs) == 0 for r in cap.records.values())
        leaf = x.clone().requires_grad_(True)
        hidden = torch.tanh(leaf) * 2  # kept alive by the graph as long as the graph lives
        out = model(hidden)
        ref = weakref.ref(hidden)
        del out, hidden
        gc.collect()
        assert ref() is None  # the capture holds no reference to the autograd graph
    cap.clear()
    assert all(not r.inputs and not r.output_grads for r in cap.records.values())


def test_enabled_switch_and_layer_selection():
    model, loss_fn, x, y = build_case("mlp")
    on = [False]
    with Capture(model, ["2"], enabled=lambda: on[0]) as cap:
        loss_fn(model(x), y).backward()
        on[0] = True
        loss_fn(model(x), y).backward()
    assert list(cap.records) == ["2"]
    assert len(cap.records["2"].inputs) == 1 and len(cap.records["2"].output_grads) == 1


def test_reentering_an_active_capture_raises():
    model, *_ = build_case("mlp")
    cap = Capture(model)
    with cap, pytest.raises(RuntimeError, match="already active"):
        cap.__enter__()
