"""SpectralNewton: kernels against the SVD formula, reductions to known optimizers, behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlens.optim._functional import adamw, spectral_newton
from curvlens.optim._kernels import (
    scale_to_rms,
    spectral_transform,
    spectral_update_cholesky,
    spectral_update_eigh,
    spectral_update_svd,
)
from curvlens.optim.spectral_newton import SpectralNewton, split_parameters

TOL = dict(rtol=1e-10, atol=1e-12)


def _svd_formula(M: torch.Tensor, alpha: float, d: float, relative: bool = False) -> torch.Tensor:
    """``U diag(T(sigma)) V^T`` written out with torch.linalg.svd, one matrix at a time."""
    out = []
    for X in M.reshape(-1, *M.shape[-2:]):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        S = S / S[0] if relative else S  # relative damping: T of sigma / sigma_1
        T = torch.where(S > 0, S / (S**alpha + d), 0.0)
        out.append(U @ torch.diag(T) @ Vh)
    return torch.stack(out).reshape(M.shape)


def _matrix(shape, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    *b, m, n = shape
    return (torch.randn(*b, m, rank, generator=g, dtype=torch.float64)
            @ torch.randn(*b, rank, n, generator=g, dtype=torch.float64))


SHAPES = {"wide": (5, 9), "tall": (9, 5), "square": (6, 6), "batched_wide": (3, 4, 7),
          "batched_tall": (3, 7, 4), "rank_deficient": ((6, 8), 3),
          "rank_deficient_tall": ((10, 7), 2)}


def _case(name):
    spec = SHAPES[name]
    return _matrix(*spec) if isinstance(spec[0], tuple) else _matrix(spec)


@pytest.mark.parametrize("mode,d", [("absolute", 0.1), ("absolute", 1e-3), ("relative", 0.05)])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.7])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernels_equal_svd_formula(shape, alpha, mode, d):
    M = _case(shape)
    ref = _svd_formula(M, alpha, d, relative=mode == "relative")
    torch.testing.assert_close(spectral_update_svd(M, alpha=alpha, damping=d, damping_mode=mode),
                               ref, **TOL)
    torch.testing.assert_close(spectral_update_eigh(M, alpha=alpha, damping=d, damping_mode=mode),
                               ref, rtol=1e-9, atol=1e-11)
    if alpha == 2.0:
        out = spectral_update_cholesky(M, damping=d, damping_mode=mode)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_spectral_transform_values():
    s = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    expect = torch.tensor([0.0, 0.5 / (0.5**1.5 + 0.2), 1 / 1.2, 3 / (3**1.5 + 0.2)],
                          dtype=torch.float64)
    torch.testing.assert_close(spectral_transform(s, alpha=1.5, damping=0.2), expect, **TOL)


@pytest.mark.parametrize("shape", ["rank_deficient", "rank_deficient_tall"])
def test_zero_damping_on_rank_deficient_is_pseudo_inverse(shape):
    """d = 0: zero singular values contribute nothing (Cholesky fails and falls back to eigh)."""
    M = _case(shape)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = int((S > 1e-10 * S[0]).sum())
    for alpha in (1.5, 2.0):
        ref = U[:, :r] @ torch.diag(S[:r] ** (1 - alpha)) @ Vh[:r]
        torch.testing.assert_close(spectral_update_eigh(M, alpha=alpha, damping=0.0), ref,
                                   rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(spectral_update_cholesky(M, damping=0.0),
                               U[:, :r] @ torch.diag(1 / S[:r]) @ Vh[:r], rtol=1e-7, atol=1e-9)


def test_zero_matrix_gives_zero_update():
    for mode in ("absolute", "relative"):
        Z = torch.zeros(2, 4, 6, dtype=torch.float64)
        assert torch.equal(spectral_update_cholesky(Z, damping=0.1, damping_mode=mode), Z)
        assert torch.equal(spectral_update_eigh(Z, alpha=1.3, damping=0.1, damping_mode=mode), Z)


@pytest.mark.parametrize("shape", ["wide", "tall", "batched_tall"])
def test_alpha_one_small_damping_is_orthogonalization(shape):
    M = _case(shape)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(spectral_update_eigh(M, alpha=1.0, damping=1e-10), U @ Vh,
                               rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype):
    M = _matrix((3, 8, 16), seed=3).to(dtype)
    ref = _svd_formula(M.double(), 1.5, 0.1)
    for out in (spectral_update_eigh(M, alpha=1.5, damping=0.1),
                spectral_update_cholesky(M, damping=0.1)):
        assert out.dtype == dtype
    out = spectral_update_eigh(M, alpha=1.5, damping=0.1)
    # Error of one rounding to the half type, not of half-precision arithmetic.
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    out2 = spectral_update_cholesky(M, damping=0.1).double()
    ref2 = _svd_formula(M.double(), 2.0, 0.1)
    torch.testing.assert_close(out2, ref2, rtol=1e-2, atol=1e-2 * ref2.abs().max().item())


def test_scale_to_rms():
    U = _matrix((2, 5, 7), seed=4)
    out = scale_to_rms(U, target=0.2)
    torch.testing.assert_close(out.pow(2).mean(dim=(-2, -1)).sqrt(),
                               torch.full((2,), 0.2, dtype=torch.float64), **TOL)


def test_batched_path_equals_single_tensor_path():
    params = [_matrix(s, seed=i) for i, s in enumerate([(4, 6), (4, 6), (6, 4), (3, 2, 2, 2)])]
    grads = [_matrix(p.shape, seed=10 + i) for i, p in enumerate(params)]
    alphas = [2.0, 2.0, 1.5, 1.2]
    outs = []
    for batched in (True, False):
        ps = [p.clone() for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        for _ in range(2):
            spectral_newton(ps, grads, bufs, alphas, lr=0.1, damping=0.05,
                            damping_mode="relative", momentum=0.9, nesterov=True,
                            weight_decay=0.01, rms_target=None, batched=batched)
        outs.append(ps)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL)


def test_adamw_multi_tensor_equals_single_tensor_loop():
    g = torch.Generator().manual_seed(6)
    shapes_dtypes = [((4, 3), torch.float64), ((5,), torch.float64), ((3, 2), torch.bfloat16)]
    outs = []
    for foreach in (True, False):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dt)
                  for i, (s, dt) in enumerate(shapes_dtypes)]
        state_dt = [torch.float64, torch.float64, torch.float32]
        m = [torch.zeros(p.shape, dtype=dt) for p, dt in zip(params, state_dt)]
        v = [torch.zeros(p.shape, dtype=dt) for p, dt in zip(params, state_dt)]
        steps = [torch.tensor(0.0) for _ in params]
        g.manual_seed(6)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
            adamw(params, grads, m, v, steps, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.1, maximize=True, foreach=foreach)
        outs.append(params + m + v + steps)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- optimizer


class _Net(nn.Module):
    """Conv -> BN -> Linear -> head, float64 by default."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 16)
        self.head = nn.Linear(16, 3)
        self.to(dtype)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (32,),
                                                                            generator=g)


def _train(model, opt, steps, seed=0):
    x, y = _data(next(model.parameters()).dtype, seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_split_parameters_routing():
    torch.manual_seed(0)
    net = _Net()
    spectral, other = split_parameters(net)
    assert list(spectral) == ["conv.weight", "fc.weight"]
    assert list(other) == ["conv.bias", "bn.weight", "bn.bias", "fc.bias", "head.weight",
                           "head.bias"]
    spectral, other = split_parameters(net, head_to_adamw=False, extra_adamw=["conv"])
    assert list(spectral) == ["fc.weight", "head.weight"]
    assert "conv.weight" in other
    net.fc.weight.requires_grad_(False)
    spectral, other = split_parameters(net)
    assert list(spectral) == ["conv.weight"] and "fc.weight" not in other
    with pytest.raises(ValueError, match="'nope'"):
        split_parameters(net, extra_adamw=["nope"])


def test_split_parameters_embeddings_and_tied_head_go_to_adamw():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, nn.Linear(6, 6), head)
    spectral, other = split_parameters(net, head_to_adamw=False)
    assert list(spectral) == ["1.weight"]
    assert list(other) == ["0.weight", "1.bias"]


def test_optimizer_groups_follow_routing():
    net = _Net()
    opt = SpectralNewton(net, lr=0.1, adamw_lr=3e-3, weight_decay=0.5, adamw_weight_decay=0.2)
    spec, adam = opt.param_groups
    assert spec["use_spectral"] and spec["param_names"] == ["conv.weight", "fc.weight"]
    assert not adam["use_spectral"] and "head.weight" in adam["param_names"]
    assert (spec["lr"], spec["weight_decay"], adam["lr"], adam["weight_decay"]) == (
        0.1, 0.5, 3e-3, 0.2)
    # bare parameters: split by ndim
    opt = SpectralNewton(list(net.parameters()), lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 5]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])


def test_first_step_matches_formula_with_alpha_dict():
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    opt = SpectralNewton(net, lr=0.3, alpha={"conv": 1.3}, damping=0.02, weight_decay=0.1,
                         momentum=0.9, damping_mode="absolute", rms_scale=False)
    _train(net, opt, 1)
    x, y = _data()
    nn.functional.cross_entropy(ref(x), y).backward()
    for name, alpha in (("conv", 1.3), ("fc", 2.0)):
        W = getattr(ref, name).weight
        # Muon-style Nesterov on a fresh buffer: B = (1 - mu) g, M = (1 - mu) g + mu B
        M = (1 - 0.9) * (1 + 0.9) * W.grad.flatten(1)
        expect = W.flatten(1) * (1 - 0.3 * 0.1) - 0.3 * _svd_formula(M, alpha, 0.02)
        torch.testing.assert_close(getattr(net, name).weight.flatten(1), expect, **TOL)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_huge_damping_is_sgd_with_nesterov_momentum(alpha):
    """T(sigma) = sigma / d (1 + O(sigma^alpha / d)) and B = (1 - mu) b (b: torch SGD's buffer),
    so the step is -(lr / d) (1 - mu)(g + mu b): SGD-Nesterov at lr (1 - mu) / d."""
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    d, lr, mu = 1e12, 1e10, 0.9
    mats = [net.conv.weight, net.fc.weight]
    opt = SpectralNewton([{"params": mats, "use_spectral": True}], lr=lr, alpha=alpha,
                         damping=d, momentum=mu, nesterov=True, damping_mode="absolute",
                         rms_scale=False, weight_decay=0.0)
    sgd = torch.optim.SGD([ref.conv.weight, ref.fc.weight], lr=lr * (1 - mu) / d, momentum=mu,
                          nesterov=True)
    _train(net, opt, 5)
    _train(ref, sgd, 5)
    for a, b in zip(mats, [ref.conv.weight, ref.fc.weight]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for p, q in zip(mats, [ref.conv.weight, ref.fc.weight]):  # the buffers: B = (1 - mu) b
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   (1 - mu) * sgd.state[q]["momentum_buffer"], rtol=1e-12,
                                   atol=1e-15)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_buffer_follows_torch_muon(nesterov):
    """Same gradients in: the buffer equals torch.optim.Muon's bit for bit (its convention)."""
    g = torch.Generator().manual_seed(5)
    shape = (6, 9)
    p_sn = torch.zeros(shape, dtype=torch.float64)
    p_muon = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    buf = torch.zeros(shape, dtype=torch.float64)
    muon = torch.optim.Muon([p_muon], lr=0.0, momentum=0.95, nesterov=nesterov, weight_decay=0.0)
    for _ in range(4):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        spectral_newton([p_sn], [grad], [buf], [1.0], lr=0.0, damping=0.1,
                        damping_mode="absolute", momentum=0.95, nesterov=nesterov,
                        weight_decay=0.0, rms_target=None)
        p_muon.grad = grad.clone()
        muon.step()
        assert torch.equal(buf, muon.state[p_muon]["momentum_buffer"])


def test_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    opt = SpectralNewton(net, lr=0.0, adamw_lr=1e-2, adamw_betas=(0.8, 0.99), adamw_eps=1e-6,
                         adamw_weight_decay=0.1)
    _, other = split_parameters(ref)
    adamw = torch.optim.AdamW(other.values(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                              weight_decay=0.1)
    _train(net, opt, 6)
    _train(ref, adamw, 6)
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


class _FakeLens:
    def __init__(self, alphas):
        self.alphas = alphas
        self.calls = 0

    def latest_alphas(self):
        self.calls += 1
        return dict(self.alphas)


@pytest.mark.parametrize("alpha", [2.0, "auto"])
def test_checkpoint_resume_is_exact(alpha):
    torch.manual_seed(0)
    net = _Net()
    lens = _FakeLens({"conv": 1.7, "fc": float("nan")})
    kw = dict(lr=0.05, alpha=alpha, damping=0.01, weight_decay=0.01, lens=lens, auto_every=3)
    opt = SpectralNewton(net, **kw)
    _train(net, opt, 5)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    assert "exp_avg" in saved_opt["state"][2] and "momentum_buffer" in saved_opt["state"][0]
    _train(net, opt, 5, seed=1)

    net2 = _Net()
    net2.load_state_dict(saved_net)
    opt2 = SpectralNewton(net2, **kw)
    opt2.load_state_dict(saved_opt)
    _train(net2, opt2, 5, seed=1)
    for (name, a), b in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), name


def test_bf16_resume_is_exact_and_keeps_float32_state():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                             nn.Linear(12, 3)).to(torch.bfloat16)

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x).float(), y).backward()
            opt.step()

    net = make()
    opt = SpectralNewton(net, lr=0.05, adamw_lr=1e-2)
    train(net, opt, 3)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, opt, 3)
    net2 = make()
    net2.load_state_dict(saved_net)
    opt2 = SpectralNewton(net2, lr=0.05, adamw_lr=1e-2)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[net2[0].weight]["momentum_buffer"].dtype == torch.float32
    assert opt2.state[net2[0].bias]["exp_avg_sq"].dtype == torch.float32
    train(net2, opt2, 3)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_auto_alpha_reads_lens_clips_and_falls_back():
    torch.manual_seed(0)
    net = _Net()
    lens = _FakeLens({"conv": 7.0, "fc": float("nan")})
    opt = SpectralNewton(net, alpha="auto", lens=lens, alpha_range=(1.0, 3.0), auto_every=4)
    _train(net, opt, 2)
    assert opt.state[net.conv.weight]["alpha"] == 3.0  # clipped
    assert opt.state[net.fc.weight]["alpha"] == 2.0  # NaN: fallback before any measurement
    lens.alphas = {"conv": 1.25, "fc": 1.5}
    _train(net, opt, 1)  # step 3: conv already measured, not due; fc not measured yet: read
    assert opt.state[net.conv.weight]["alpha"] == 3.0
    assert opt.state[net.fc.weight]["alpha"] == 1.5
    _train(net, opt, 1)  # step 4: not due
    assert opt.state[net.conv.weight]["alpha"] == 3.0
    _train(net, opt, 1)  # step 5 (4 steps done): due
    assert opt.state[net.conv.weight]["alpha"] == 1.25


def test_rms_scale_sets_update_rms():
    torch.manual_seed(0)
    net = _Net()
    before = net.fc.weight.detach().clone()
    opt = SpectralNewton(net, lr=1.0, rms_scale=True, weight_decay=0.0)
    _train(net, opt, 1)
    rms = (net.fc.weight - before).pow(2).mean().sqrt()
    torch.testing.assert_close(rms, torch.tensor(0.2, dtype=torch.float64), **TOL)


def test_closure_and_zero_grad():
    torch.manual_seed(0)
    net = _Net()
    opt = SpectralNewton(net, lr=0.05)
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    expected = nn.functional.cross_entropy(net(x), y).item()
    loss = opt.step(closure)
    assert loss.grad_fn is not None  # the closure ran under enable_grad inside no_grad step
    first = loss.item()
    assert first == expected
    for _ in range(15):
        last = opt.step(closure).item()
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_bf16_model_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4)).to(torch.bfloat16)
    x = torch.randn(64, 8).to(torch.bfloat16)
    y = torch.randint(0, 4, (64,))
    opt = SpectralNewton(net, lr=0.2, adamw_lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert opt.state[net[0].weight]["momentum_buffer"].dtype == torch.float32
    assert net[0].weight.dtype == torch.bfloat16


def test_setstate_fills_missing_keys():
    net = _Net()
    opt = SpectralNewton(net)
    state = opt.__getstate__()
    for g in state["param_groups"]:
        del g["rms_target"], g["check_finite"]
    opt.__setstate__(state)
    assert all(g["rms_target"] is None and g["check_finite"] for g in opt.param_groups)


# --------------------------------------------------------------------------- errors


def test_nonfinite_gradient_names_parameter():
    net = _Net()
    opt = SpectralNewton(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net.fc.weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite.*'fc\.weight'"):
        opt.step()
    net.fc.weight.grad.zero_()
    net.bn.bias.grad[1] = float("inf")
    with pytest.raises(RuntimeError, match=r"non-finite.*'bn\.bias'"):
        opt.step()


def test_sparse_and_complex_gradients_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    net = nn.Sequential(emb, nn.Linear(4, 4))
    opt = SpectralNewton(net)
    net(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*'0\.weight'"):
        opt.step()
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = SpectralNewton([("z", z)])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match=r"complex.*'z'"):
        opt.step()


def test_bad_arguments_raise():
    net = _Net()
    params = list(net.parameters())
    with pytest.raises(ValueError, match="alpha=a dict needs parameter names"):
        SpectralNewton(params, alpha={"fc": 1.0})
    with pytest.raises(ValueError, match=r"\['nope'\].*spectral layers: \['conv', 'fc'\]"):
        SpectralNewton(net, alpha={"nope": 1.0})
    with pytest.raises(ValueError, match="alpha='auto' needs lens"):
        SpectralNewton(net, alpha="auto")
    with pytest.raises(ValueError, match="alpha must be a number >= 1"):
        SpectralNewton(net, alpha=0.5)
    with pytest.raises(ValueError, match="damping=0.0 has no bounded update"):
        SpectralNewton(net, alpha=2.0, damping=0.0)
    with pytest.raises(ValueError, match="alpha_range must satisfy 1 <= lo"):
        SpectralNewton(net, alpha_range=(0.5, 3.0))
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        SpectralNewton(net, damping_mode="percent")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        SpectralNewton(net, lr=-0.1)
    with pytest.raises(ValueError, match=r"'conv\.bias' has shape \(4,\).*use_spectral=False"):
        SpectralNewton([{"params": list(net.named_parameters()), "use_spectral": True}])
    with pytest.raises(ValueError, match="no trainable parameters"):
        SpectralNewton(nn.ReLU())


@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path):
    """``benchmarks/bench_optim.py --quick`` runs end to end and writes its outputs."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_optim.py"), "--quick",
         "--task", "digits", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epochs to AdamW" in proc.stdout
    summary = json.loads((tmp_path / "bench_optim_digits.json").read_text())["digits"]
    assert set(summary) == {"adamw", "muon", "sn"}
    assert summary["muon"]["companion_lr"] == summary["adamw"]["lr"]  # AdamW's tuned lr
    assert all(0.0 <= a <= 1.0 for row in summary.values() for a in row["test_acc"])
    assert all(row["test_loss"][0] > 0 for row in summary.values())
    assert (tmp_path / "bench_optim_digits.png").stat().st_size > 0
    assert "| digits | sn |" in (tmp_path / "bench_optim_digits.md").read_text()
    assert all(row["horizon"] == 6 and all(e is None or 1 <= e <= 6 for e in row["epochs_to_adamw"])
               for row in summary.values())


def test_benchmark_counts_epochs_to_target_past_the_last_epoch():
    """A run that has not reached the target trains on at the same lr, up to the horizon, and
    only its training loss is recorded there; one that has reached it stops."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from bench_optim import run_one

    ran = run_one("digits", "adamw", 0.01, 0, 1, target=1e-12, horizon=3)
    assert len(ran.train_loss) == len(ran.test_loss) == 1 and len(ran.extra_train_loss) == 2
    assert ran.extra_train_loss[-1] < ran.train_loss[0]  # it kept training
    reached = run_one("digits", "adamw", 0.01, 0, 1, target=ran.train_loss[0], horizon=3)
    assert reached.extra_train_loss == []
    cosine = run_one("digits", "adamw", 0.01, 0, 1, schedule="cosine", target=1e-12, horizon=3)
    assert cosine.extra_train_loss == []  # a decayed schedule has no "same lr" to go on with


@pytest.mark.slow
def test_step_benchmark_quick_smoke(tmp_path):
    """``benchmarks/bench_optim_step.py --quick`` times every method and measures accuracy."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_optim_step.py"), "--quick",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "bench_optim_step_quick.json").read_text())
    assert set(out["64x96"]["vs_muon"]) == {"muon", "muon_f32", "sn", "sn_eigh", "adamw"}
    assert out["64x96"]["rel_error"]["sn"] < 2e-3
    assert set(out["gpt"]["vs_muon"]) == {"muon", "sn", "adamw"}


# --------------------------------------------------------------------------- distributed


def test_assign_owners_round_robin_by_size():
    from curvlens.optim._distributed import assign_owners

    assert assign_owners([10, 40, 20, 30, 5], world=2) == [1, 0, 0, 1, 0]
    assert assign_owners([8, 8, 8, 8], world=3) == [0, 1, 2, 0]
    assert assign_owners([3, 9], world=1) == [0, 0]


class _DistNet(nn.Module):
    """Conv plus three same-shape hidden Linears (a batched bucket split over ranks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc0 = nn.Linear(48, 8)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x):
        x = torch.tanh(self.fc0(torch.tanh(self.conv(x)).flatten(1)))
        for fc in (self.fc1, self.fc2, self.fc3):
            x = torch.tanh(fc(x))
        return self.head(x)


_DIST_STEPS = 3
_DIST_KW = dict(lr=0.05, alpha={"fc1": 1.5, "fc3": 1.5}, damping=0.01, damping_mode="relative",
                weight_decay=0.01, momentum=0.9)


def _dist_run(shard=slice(None), reduce=lambda g: g):
    torch.manual_seed(0)
    net = _DistNet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    opt = SpectralNewton(net, **_DIST_KW)
    for _ in range(_DIST_STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[shard]), y[shard]).backward()
        for p in net.parameters():
            reduce(p.grad)  # what DDP does: the mean gradient over ranks
        opt.step()
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from curvlens import _dist
    from curvlens.optim import _functional

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        computed = []
        kernel = _functional.spectral_update

        def counting(M, **kw):
            computed.append(M.shape[0])
            return kernel(M, **kw)

        _functional.spectral_update = counting
        n = 16 // world
        params = _dist_run(slice(rank * n, (rank + 1) * n), _dist.all_reduce_mean)
        torch.save({"params": params, "computed": sum(computed)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_updates_equal_single_process(tmp_path):
    """2 gloo ranks, each computing the updates of its own layers: same parameters as 1 rank."""
    import torch.multiprocessing as mp

    single = _dist_run()  # first: it imports what torch.optim loads lazily (torch._dynamo)
    # fork: the workers inherit the imported modules (spawn would re-import torch, ~5 s each)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    n_spectral = 5  # conv, fc0..fc3 (head and biases go to AdamW)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the matrix work was split, not repeated: each rank computed a part, together all of it
    assert [g["computed"] for g in got] == [3 * _DIST_STEPS, 2 * _DIST_STEPS]
    assert sum(g["computed"] for g in got) == n_spectral * _DIST_STEPS
    for g in got:
        for name, value in single.items():
            torch.testing.assert_close(g["params"][name], value, rtol=1e-9, atol=1e-12, msg=name)
