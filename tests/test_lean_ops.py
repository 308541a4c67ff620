"""The lean convolution stand-in of gradient graphs: same Hessian, less work.

References: the dense Hessian of the loss in float64 (``torch.autograd.functional.hessian`` on a
flat parameter vector) and the ops torch runs (recorded by a dispatch mode).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from curvlens._grad_graph import GradGraph
from curvlens._modes import measurement_mode


class TiedConvNet(nn.Module):
    """Convolutions of every dimension with stride, dilation, groups, bias and no bias, one
    kernel used twice (tied), and a batch norm between."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv1d(4, 3, 2, stride=2)
        self.c4 = nn.Conv3d(1, 2, (1, 2, 2), padding=(0, 1, 0))
        self.head = nn.Linear(3 * 2 + 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.bn(self.c2(h)))
        h = torch.tanh(self.c2(h))  # the same kernel again: a tied weight
        a = torch.tanh(self.c3(h.mean(-1)))  # [B, 3, 2]
        b = torch.tanh(self.c4(x[:, :1, None].expand(-1, -1, 3, -1, -1)[..., :5, :5]))
        return self.head(torch.cat([a.flatten(1), b.mean((2, 3, 4))], 1))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedConvNet().double().train()
    with torch.no_grad():  # running statistics away from (0, 1), a non-trivial affine map
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, x, y


def _dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   training: bool) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[start:start + s.numel()].view(s)
            start += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    # plain reverse-over-reverse autograd, outside curvlens: batch statistics in training mode,
    # running ones in eval mode (the running statistics are not updated by the reference)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(training)
    try:
        return torch.autograd.functional.hessian(loss, flat0, vectorize=True)
    finally:
        model.load_state_dict(state)
        model.train()


@pytest.mark.parametrize("policy", ["batch", "eval"])
def test_hessian_equals_dense_reference(policy):
    model, x, y = _setup()
    dense = _dense_hessian(model, x, y, training=policy == "batch")
    params = [p for _, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    with measurement_mode(model, batch_norm=policy):
        graph = GradGraph(model, F.cross_entropy, (x,), y, params, "model")
        for _ in range(2):
            vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
            flat_v = torch.cat([v.reshape(-1) for v in vs])
            got = torch.cat([h.reshape(-1) for h in graph.hvp(vs)])
            torch.testing.assert_close(got, dense @ flat_v, rtol=1e-10, atol=1e-12)
            # one block (the tied kernel's): its own rows and columns of the dense Hessian
            i = next(j for j, (n, _) in enumerate(model.named_parameters()) if n == "c2.weight")
            lo = sum(p.numel() for p in params[:i])
            hi = lo + params[i].numel()
            block = graph.restricted(params[i]).hvp([vs[i]])[0].reshape(-1)
            torch.testing.assert_close(block, dense[lo:hi, lo:hi] @ vs[i].reshape(-1),
                                       rtol=1e-10, atol=1e-12)
            batched = graph.hvp([torch.stack([v, 2 * v]) for v in vs], batched=True)
            torch.testing.assert_close(torch.cat([h[1].reshape(-1) for h in batched]),
                                       2 * dense @ flat_v, rtol=1e-10, atol=1e-12)


def test_stand_in_only_inside_gradient_graphs():
    model, x, y = _setup()
    with measurement_mode(model):
        outside = model.c1(x)
        graph = GradGraph(model, F.cross_entropy, (x,), y, [model.c1.weight], "model")
    assert type(outside.grad_fn).__name__ == "ConvolutionBackward0"
    names = set()
    stack = [graph.grads[0].grad_fn]
    while stack:  # the first derivative of c1's weight runs through the lean backward ops
        node = stack.pop()
        if node is None or type(node).__name__ in names:
            continue
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert "_LeanConvBackward" in names
    assert "_WeightGradBackward" in names  # the weight gradient, differentiable on its own
    assert "NativeBatchNormBackward0" not in names  # eval batch norm: an elementwise affine map
    # the same values: the convolutions are the same ops, the batch norm's affine map differs
    # from torch's kernel by rounding only
    with measurement_mode(model):
        plain = torch.autograd.grad(F.cross_entropy(model(x), y), model.c1.weight)[0]
    torch.testing.assert_close(graph.grads[0].detach(), plain, rtol=1e-13, atol=1e-15)
    with measurement_mode(model, batch_norm="batch"):
        graph = GradGraph(model, F.cross_entropy, (x,), y, [model.c1.weight], "model")
        plain = torch.autograd.grad(F.cross_entropy(model(x), y), model.c1.weight)[0]
    assert torch.equal(graph.grads[0].detach(), plain)  # batch statistics: torch's own kernel


class _Formed(TorchDispatchMode):
    """Counts convolution ops whose result has one of the given shapes."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.shapes = {tuple(t.shape) for t in tensors}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.count += sum(1 for r in results
                              if isinstance(r, torch.Tensor) and tuple(r.shape) in self.shapes)
        return out


@pytest.mark.parametrize("lean", [True, False])
def test_block_product_forms_no_unused_derivative(lean, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 36, 4)).double()
    if not lean:  # torch's own convolution derivatives in the graph
        monkeypatch.setattr("curvlens._grad_graph.second_order_graph", contextlib.nullcontext)
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    weights = [m.weight for m in model if isinstance(m, nn.Conv2d)]
    with measurement_mode(model):
        graph = GradGraph(model, F.cross_entropy, (x,), y, weights, "model")
        block = graph.restricted(weights[0])
        with _Formed([*weights[1:], x]) as seen:
            block.hvp([torch.randn_like(weights[0])])
    # torch's own double backward forms the two later kernels' derivatives and the derivative
    # with respect to the input images (which do not require one); the lean one none of them
    assert seen.count == (0 if lean else 3)
