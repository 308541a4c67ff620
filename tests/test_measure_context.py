"""The measurement context: exact curvature whatever the caller's context.

Autocast, ``no_grad``/``inference_mode``, half-precision weights, the fused attention kernels, ops
without a second derivative, functional dropout, batch-norm statistics and ``torch.compile``
must not change what curvlens measures. References are dense ``torch.func`` Hessians in float64
of an independently written loss, or the same measurement in a plain context.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlens as cl
from curvlens._substitutes import SUBSTITUTES, NoDerivativeError
from curvlens.hessian_spectrum import block_eigenvalues

DT = torch.float64


# ----------------------------------------------------------------------------- models


class SEGate(nn.Module):
    """Squeeze-excitation gate as in MobileNetV3: ``x * hardsigmoid(conv(mean(x)))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


def _hard_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Hardswish(), SEGate(3),
        nn.Conv2d(3, 3, 3), nn.Hardswish(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    )


class _RefHardsigmoid(nn.Module):
    """hardsigmoid written piecewise (independent of torch's kernel and of curvlens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, x / 6 + 0.5))


class _RefHardswish(_RefHardsigmoid):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * super().forward(x)


def _reference_copy(net: nn.Module) -> nn.Module:
    ref = copy.deepcopy(net)
    for parent in ref.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _RefHardsigmoid())
            elif isinstance(child, nn.Hardswish):
                setattr(parent, name, _RefHardswish())
    return ref


def _dense_block(model: nn.Module, name: str, x, y, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Dense Hessian ``[mn, mn]`` of the loss in the parameter ``name`` (row-major flattening)."""
    w0 = dict(model.named_parameters())[name].detach()

    def loss(w):
        return loss_fn(functional_call(model, {name: w}, (x,)), y)

    return hessian(loss)(w0).reshape(w0.numel(), w0.numel())


def _batch(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _gradient_directions(model, name, x, y, k=3):
    (G,) = torch.autograd.grad(F.cross_entropy(model(x), y), [dict(model.named_parameters())[name]])
    U, _, Vh = torch.linalg.svd(G.flatten(1), full_matrices=False)
    return U[:, :k], Vh[:k].mT


# ----------------------------------------------------------------------------- stand-ins


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hardsigmoid_stand_in_has_torch_values_and_first_derivative(dtype):
    edges = torch.tensor([-3.0, 3.0, 0.0], dtype=dtype)  # the kinks, exactly
    x = torch.cat([torch.linspace(-4, 4, 801, dtype=dtype), edges]).requires_grad_(True)
    ref = F.hardsigmoid(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    with cl.measurement_mode(nn.Identity()):
        out = F.hardsigmoid(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)  # torch's own kernel has no second derivative
    assert torch.equal(out, ref)
    # float64: torch's backward kernel multiplies by a float32 1/6; the stand-in's is exact.
    torch.testing.assert_close(g, g_ref, rtol=1e-7 if dtype == DT else 0, atol=0)
    assert torch.equal(gg, torch.zeros_like(gg))
    z = x.detach().clone()
    with cl.measurement_mode(nn.Identity()):
        out = nn.Hardsigmoid(inplace=True)(z)
    assert out is z and torch.equal(z, ref.detach())


def test_hardswish_network_matches_dense_hessian():
    torch.manual_seed(0)
    net = _hard_net().to(DT)
    x, y = _batch()
    ref = _reference_copy(net)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-15)
    H = _dense_block(ref, "0.weight", x, y)  # through Hardswish, the gate and Hardswish again
    U, V = _gradient_directions(net, "0.weight", x, y)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(3, -1)
    h_ref = torch.einsum("ki,ij,kj->k", D, H, D)
    for method in ("forward", "hvp"):
        h = cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "0", U, V, method=method)
        torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-10)
    lam = block_eigenvalues(net, nn.CrossEntropyLoss(), x, y, "0", 3,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-6, atol=1e-10)
    rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, layers=["0"], top_k=3, bootstrap=0,
                           lanczos_k=0, noise_floor=False, kronecker_backend=None)
    torch.testing.assert_close(torch.tensor(rep.layers["0"].h, dtype=DT), h_ref, rtol=1e-6,
                               atol=1e-10)


def test_op_without_second_derivative_is_named(monkeypatch):
    monkeypatch.delitem(SUBSTITUTES, F.hardsigmoid)
    torch.manual_seed(0)
    net = _hard_net().to(DT)
    x, y = _batch()
    U, V = _gradient_directions(net, "0.weight", x, y)
    with pytest.raises(NoDerivativeError, match=r"layer '0'.*aten::hardsigmoid_backward.*no "
                                                r"second derivative"):
        cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "0", U, V, method="hvp")


def test_functional_dropout_and_attention_dropout_are_off():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

        def forward(self, x):  # x: [B, T, 4]
            q, k, v = self.qkv(x).chunk(3, -1)
            a = F.scaled_dot_product_attention(q, k, v, None, 0.5 if self.training else 0.0)
            return self.head(F.dropout(a, 0.5, self.training).mean(1))

    torch.manual_seed(0)
    net = Block().to(DT).train()
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randint(0, 3, (5,))
    U, V = torch.linalg.qr(torch.randn(12, 2, dtype=DT))[0], torch.eye(4, 2, dtype=DT)
    h = [cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "qkv", U, V)
         for _ in range(2)]
    h_eval = cl.directional_curvature(net.eval(), nn.CrossEntropyLoss(), x, y, "qkv", U, V)
    assert torch.equal(h[0], h[1])
    torch.testing.assert_close(h[0], h_eval, rtol=1e-12, atol=1e-14)


def test_flash_attention_model_is_measured_with_the_math_kernel():
    """CPU flash attention (the default for float32) has no second derivative."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

        def forward(self, x):
            q, k, v = (t.unflatten(-1, (2, 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 2, T, 2]
            return self.head(a.transpose(1, 2).flatten(2).mean(1))

    torch.manual_seed(0)
    net = Attn()
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, top_k=3, bootstrap=0, lanczos_k=2,
                           noise_floor=False, kronecker_backend=None)
    assert all(math.isfinite(r.h[0]) for r in rep.layers.values())
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs a second derivative too
        H = _dense_block(copy.deepcopy(net).double(), "qkv.weight", x.double(), y)
    assert max(rep.layers["qkv"].lambda_top) == pytest.approx(
        float(torch.linalg.eigvalsh(H.detach())[-1]), rel=1e-4)


@pytest.mark.parametrize("norm", ["layer", "instance"])
def test_normalization_layers_get_exact_curvature(norm):
    """torch's forward-over-forward derivative of layer/instance norm is wrong; the default
    method must not use it."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6) if norm == "layer" else nn.InstanceNorm1d(3, affine=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # [B, 3, 4]
            return self.head(torch.tanh(self.norm(self.fc(x))).mean(1))

    torch.manual_seed(0)
    net = Net().to(DT)
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randint(0, 3, (5,))
    U, V = _gradient_directions(net, "fc.weight", x, y)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(3, -1)
    H = _dense_block(net, "fc.weight", x, y)
    h = cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "fc", U, V)
    torch.testing.assert_close(h, torch.einsum("ki,ij,kj->k", D, H, D), rtol=1e-6, atol=1e-10)


def test_forward_mode_jit_warning_is_silenced():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cl.directional_curvature(net, nn.MSELoss(), x, y, "0", torch.eye(4, 2, dtype=DT),
                                 torch.eye(3, 2, dtype=DT), method="forward")
    assert not [w for w in seen if "torch.jit.script" in str(w.message)]


# ----------------------------------------------------------------------------- batch norm


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3))


def test_batch_policy_uses_batch_statistics_and_leaves_running_statistics_untouched():
    torch.manual_seed(0)
    net = _bn_net().to(DT)
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].num_batches_tracked.fill_(7)
    x, y = _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # reference: the training-mode function (batch statistics) on a copy
    ref = copy.deepcopy(net).train()
    ref[1].track_running_stats = False  # normalize with the batch's statistics, never update
    H = _dense_block(ref, "0.weight", x, y)
    U, V = _gradient_directions(ref, "0.weight", x, y)
    D = torch.einsum("mk,nk->kmn", U, V).reshape(3, -1)
    h_ref = torch.einsum("ki,ij,kj->k", D, H, D)
    net.eval()
    for method in ("auto", "hvp"):
        h = cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "0", U, V, method=method,
                                     batch_norm="batch")
        torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-10)
    with pytest.raises(RuntimeError, match=r"forward-over-forward.*batch_norm.*is wrong"):
        cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "0", U, V, method="forward",
                                 batch_norm="batch")
    h_eval = cl.directional_curvature(net, nn.CrossEntropyLoss(), x, y, "0", U, V)
    assert (h_eval - h_ref).abs().max() > 1e-3  # the policies measure different functions
    rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, **OPTIONS, batch_norm="batch")
    assert rep.meta["batch_norm"] == "batch"
    assert any("batch-norm on batch statistics" in n for n in rep.layers["0"].notes)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training and not net[1].training and net[1].track_running_stats
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, batch_norm="train")


def test_eval_policy_points_at_batch_norm_when_outputs_are_constant():
    """Running statistics far from the data (e.g. BN momentum 0.01 after a few steps) make the
    eval-mode outputs nearly the same for every sample; the report must say why."""
    torch.manual_seed(0)
    net = _bn_net()
    net[1].running_var.fill_(1e12)  # eval output ~ bias: constant over the batch
    x, y = _batch(n=8)
    x = x.float()
    with pytest.warns(UserWarning, match=r"nearly the same for every sample.*'1'.*batch_norm="):
        rep_eval = rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, top_k=3, bootstrap=0,
                               lanczos_k=0)
    assert all("'1'" in r.warnings[0] and "batch_norm='batch'" in r.warnings[0]
               for r in rep.layers.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, top_k=3, bootstrap=0,
                               lanczos_k=0, batch_norm="batch")
    assert not any("nearly the same" in w for r in rep.layers.values() for w in r.warnings)
    assert rep_eval.layers["0"].sigma[0] < 1e-4 * rep.layers["0"].sigma[0]


# ----------------------------------------------------------------------------- caller context


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


OPTIONS = {"top_k": 3, "bootstrap": 0, "lanczos_k": 0, "noise_floor": False}


def _measure(net, x, y, **kw):
    rep = cl.analyze_model(net, nn.CrossEntropyLoss(), x, y, **OPTIONS, **kw)
    return rep, _values(rep)


def _values(rep):
    return {n: (r.h, r.sigma, r.alpha) for n, r in rep.layers.items()}


def test_autocast_is_switched_off_and_noted():
    torch.manual_seed(0)
    net = _small_cnn()
    x, y = _batch()
    x = x.float()
    _, plain = _measure(net, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
        rep, cast = _measure(net, x, y)
        assert torch.is_autocast_enabled("cpu")  # restored
    assert cast == plain
    assert any("autocast was on" in n and "bfloat16" in n for n in rep.layers["0"].notes)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_analyze_under_no_grad_and_inference_mode(context):
    torch.manual_seed(0)
    net = _small_cnn().to(DT)
    x, y = _batch()
    _, plain = _measure(net, x, y)
    lens = cl.CurvatureLens(net, nn.CrossEntropyLoss(), top_k=3, lanczos_k=0,
                            analyze_options={"bootstrap": 0, "noise_floor": False})
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        xi, yi = x.clone(), y.clone()  # inference tensors under inference_mode
        rep, inside = _measure(net, xi, yi)
        lens_rep = lens.analyze(xi, yi)
        HV = cl.block_hvp(net, nn.CrossEntropyLoss(), xi, yi, "3",
                          torch.ones(1, 3, 16, dtype=DT))
        assert not torch.is_grad_enabled()
    assert inside == plain
    assert _values(lens_rep) == plain
    assert any(context.replace("_", "") in n.replace("_", "") for n in rep.layers["0"].notes)
    HV_plain = cl.block_hvp(net, nn.CrossEntropyLoss(), x, y, "3", torch.ones(1, 3, 16, dtype=DT))
    assert torch.equal(HV, HV_plain)


def test_inference_tensor_parameters_are_refused_by_name():
    with torch.inference_mode():
        net = _small_cnn()
    x, y = _batch()
    with pytest.raises(RuntimeError, match=r"parameter '0.weight' is an inference tensor"):
        cl.analyze_model(net, nn.CrossEntropyLoss(), x.float(), y)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_measured_in_float32(half):
    torch.manual_seed(0)
    net = _small_cnn().to(half)
    x, y = _batch()
    x = x.to(half)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rep, got = _measure(net, x, y)
    _, want = _measure(copy.deepcopy(net).float(), x.float(), y)
    assert got == want
    assert any("float32 copy" in n for n in rep.layers["0"].notes)
    assert all(v.dtype == half and torch.equal(v, state[k]) for k, v in net.state_dict().items())
    lens = cl.CurvatureLens(net, nn.CrossEntropyLoss(), top_k=3, lanczos_k=0,
                            analyze_options={"bootstrap": 0, "noise_floor": False})
    assert _values(lens.analyze(x, y)) == want
    with pytest.raises(TypeError, match=r"float32 copy.*analyze_model"):
        cl.block_hvp(net, nn.CrossEntropyLoss(), x, y, "3", torch.ones(1, 3, 16, dtype=half))


# ----------------------------------------------------------------------------- torch.compile


def _train(model, lens, x, y, steps=3):
    opt = torch.optim.SGD(lens.model.parameters(), lr=0.1)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        lens.step()
        opt.step()
        opt.zero_grad()


def test_compiled_model_is_measured_through_its_original_module():
    torch.manual_seed(0)
    net = _small_cnn()
    eager = copy.deepcopy(net)
    x, y = _batch(n=8)
    x = x.float()
    compiled = torch.compile(net, backend="eager")
    options = dict(top_k=3, every=1, lanczos_k=0, kronecker="none",
                   analyze_options={"bootstrap": 0, "noise_floor": False})
    lens = cl.CurvatureLens(compiled, nn.CrossEntropyLoss(), **{**options, "kronecker": "hooks"})
    assert lens.model is net and list(lens.layers) == ["0", "3"]
    ref = cl.CurvatureLens(eager, nn.CrossEntropyLoss(), **{**options, "kronecker": "hooks"})
    with lens:  # entered before the compiled model's first call: its hooks are compiled in
        _train(compiled, lens, x, y)
    with ref:
        _train(eager, ref, x, y)
    got, want = lens.running_factors(), ref.running_factors()
    assert set(got) == set(want) == {"0", "3"}
    for name in want:
        torch.testing.assert_close(got[name].C_A, want[name].C_A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name].C_delta, want[name].C_delta, rtol=1e-5, atol=1e-9)
    rep = cl.analyze_model(compiled, nn.CrossEntropyLoss(), x, y, top_k=3, bootstrap=0,
                           lanczos_k=0, noise_floor=False, kronecker_backend=None)
    assert list(rep.layers) == ["0", "3"]
    assert any("torch.compile" in n for n in rep.layers["0"].notes)
    want_h = cl.analyze_model(eager, nn.CrossEntropyLoss(), x, y, top_k=3, bootstrap=0,
                              lanczos_k=0, noise_floor=False, kronecker_backend=None)
    assert rep.layers["0"].h == pytest.approx(want_h.layers["0"].h, rel=1e-5)


def test_hooks_added_after_the_compiled_model_ran_raise_with_the_remedy():
    torch.manual_seed(0)
    net = _small_cnn()
    x, y = _batch(n=8)
    x = x.float()
    torch.compiler.reset()  # no compiled code of earlier tests (it may have hooks compiled in)
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # traced without hooks: torch.compile does not see hooks added later
    late = cl.CurvatureLens(compiled, nn.CrossEntropyLoss(), top_k=3, every=1)
    with late, pytest.raises(RuntimeError, match=r"no forward hook.*torch\.compile.*before the "
                                                 r"first call"):
        _train(compiled, late, x, y, steps=1)
    with late:
        torch.compiler.reset()  # the advertised remedy: recompile with the hooks
        _train(compiled, late, x, y, steps=1)
    assert set(late.running_factors()) == {"0", "3"}


@pytest.mark.slow
def test_inductor_compiled_training_records_the_eager_factors():
    torch.manual_seed(0)
    net = _small_cnn()
    eager = copy.deepcopy(net)
    x, y = _batch(n=8)
    x = x.float()
    compiled = torch.compile(net)
    lens = cl.CurvatureLens(compiled, nn.CrossEntropyLoss(), top_k=3, every=2)
    ref = cl.CurvatureLens(eager, nn.CrossEntropyLoss(), top_k=3, every=2)
    with lens:
        _train(compiled, lens, x, y, steps=4)
    with ref:
        _train(eager, ref, x, y, steps=4)
    got, want = lens.running_factors(), ref.running_factors()
    for name in want:
        torch.testing.assert_close(got[name].C_A, want[name].C_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[name].C_delta, want[name].C_delta, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_training_loop_analyze_inside_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 8),
                        nn.Tanh(), nn.Linear(8, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 4, 4, generator=g), torch.randint(0, 5, (16,), generator=g)
    lens = cl.CurvatureLens(net, nn.CrossEntropyLoss(), top_k=4, every=2, lanczos_k=0,
                            analyze_options={"bootstrap": 0, "noise_floor": False})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with lens:
        for step in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                lens.step()
                opt.step()
                opt.zero_grad()
                if step == 3:
                    inside = lens.analyze(x, y)
    outside = lens.analyze(x, y)
    weights = [n for n, p in net.named_parameters() if p.dim() >= 2]
    assert len(inside.layers) == len(weights)
    finite = [n for n, r in inside.layers.items()
              if all(math.isfinite(v) for v in (r.alpha, r.gamma, r.s_rayleigh))]
    assert len(finite) >= 0.95 * len(weights), {n: r.nan_reasons for n, r in inside.layers.items()}
    for name, rep in inside.layers.items():
        assert rep.h == outside.layers[name].h and rep.alpha == outside.layers[name].alpha
        assert any("autocast was on" in n for n in rep.notes)
