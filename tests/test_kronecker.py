"""Kronecker factors against per-sample loops, BackPACK, and the exact block Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlens.kronecker import kronecker_curvature, kronecker_factors
from curvlens.layers import find_layers
from tests.conftest import build_case

RTOL = 1e-8


def _reference_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input-side rows computed independently of curvlens (F.unfold / plain reshapes)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        B, _, T = patches.shape
        g = module.groups
        return patches.reshape(B, g, -1, T).permute(0, 3, 1, 2).reshape(B * T * g, -1)
    if isinstance(module, nn.Conv1d):
        patches = F.unfold(x[..., None], (module.kernel_size[0], 1), (module.dilation[0], 1),
                           (module.padding[0], 0), (module.stride[0], 1))
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(module, nn.Embedding):
        return F.one_hot(x.reshape(-1), module.num_embeddings).double()
    return x.reshape(-1, x.shape[-1])


def _per_sample_factors(model, loss_fn, x, y):
    """C_A and C_delta by looping over samples, each one alone through the model."""
    layers = find_layers(model)
    sums_in = {n: 0.0 for n in layers}
    sums_grad = {n: 0.0 for n in layers}
    rows_in = dict.fromkeys(layers, 0)
    B = x.shape[0]
    for i in range(B):
        seen = {}

        def keep(name, store=seen):
            def hook(module, args, output):
                output.retain_grad()
                store[name] = (args[0].detach(), output)

            return hook

        handles = [info.module.register_forward_hook(keep(n)) for n, info in layers.items()]
        try:
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])  # l_i alone: no 1/B to undo
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        model.zero_grad()
        for name, info in layers.items():
            inp, out = seen[name]
            a = _reference_inputs(info.module, inp)
            g = out.grad
            if isinstance(info.module, (nn.Conv1d, nn.Conv2d)):
                d = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # [T, out]
            else:
                d = g.reshape(-1, g.shape[-1])
            sums_in[name] = sums_in[name] + a.T @ a
            rows_in[name] += a.shape[0]
            sums_grad[name] = sums_grad[name] + d.T @ d
    result = {}
    for name, info in layers.items():
        C_in = sums_in[name] / rows_in[name]
        C_grad = sums_grad[name] / B
        result[name] = (C_in, C_grad) if info.spec.inputs_are_columns else (C_grad, C_in)
    return result


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn1d", "embedding", "attention"])
def test_empirical_factors_equal_per_sample_loop(name):
    model, loss_fn, x, y = build_case(name)
    got = kronecker_factors(model, loss_fn, x, y, mode="empirical")
    ref = _per_sample_factors(model, loss_fn, x, y)
    assert set(got) == set(ref)
    for layer, (C_A, C_delta) in ref.items():
        m, n = find_layers(model)[layer].matrix_shape
        assert got[layer].C_A.shape == (n, n) and got[layer].C_delta.shape == (m, m)
        torch.testing.assert_close(got[layer].C_A, C_A, rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(got[layer].C_delta, C_delta, rtol=RTOL, atol=1e-14)
        assert got[layer].num_samples == x.shape[0]


def test_conv_patches_reproduce_the_convolution():
    """The unfolded rows times the flattened kernel give the conv output (1d, 2d, 3d, groups)."""
    torch.manual_seed(0)
    convs = [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 9, 8)),
        (nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"), (2, 4, 9, 8)),
        (nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
         (2, 2, 5, 6, 7)),
    ]
    for conv, shape in convs:
        conv = conv.double()
        x = torch.randn(*shape, dtype=torch.float64)
        y = conv(x) - conv.bias.view(1, -1, *[1] * (x.dim() - 2))
        info = find_layers(conv)[""]
        A = info.spec.input_rows(conv, x)
        B, G, T = x.shape[0], conv.groups, y[0, 0].numel()
        W = conv.weight.flatten(1).reshape(G, -1, A.shape[1])  # [G, out/G, n]
        out = torch.einsum("btgn,gon->bgot", A.reshape(B, T, G, -1), W).reshape(B, -1, T)
        torch.testing.assert_close(out, y.flatten(2), rtol=1e-12, atol=1e-12)
        assert info.spec.locations(conv, x) == T


def test_single_linear_layer_block_hessian_is_the_kronecker_product():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    f = kronecker_factors(layer, nn.MSELoss(), x, y, mode="ggn")[""]

    def loss_of(w):
        out = torch.func.functional_call(layer, {"weight": w, "bias": layer.bias}, (x,))
        return F.mse_loss(out, y)

    H = torch.func.hessian(loss_of)(layer.weight.detach()).reshape(12, 12)
    torch.testing.assert_close(torch.kron(f.C_delta, f.C_A), H, rtol=1e-10, atol=1e-14)


def test_hooks_and_backpack_agree_on_ggn_and_fisher():
    """KFLR equals the exact "ggn" factors; KFAC's draws equal "fisher" in expectation."""
    model, loss_fn, x, y = build_case("mlp")
    hooks = kronecker_factors(model, loss_fn, x, y, mode="ggn")
    bp = kronecker_factors(model, loss_fn, x, y, mode="ggn", backend="backpack")
    for name in hooks:
        torch.testing.assert_close(bp[name].C_A, hooks[name].C_A, rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(bp[name].C_delta, hooks[name].C_delta, rtol=RTOL, atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    fisher = kronecker_factors(model, loss_fn, x, y, mode="fisher", generator=gen,
                               mc_samples=400)
    kfac = kronecker_factors(model, loss_fn, x, y, mode="fisher", backend="backpack",
                             mc_samples=400)
    for name in hooks:
        exact = hooks[name].C_delta
        for est in (fisher[name].C_delta, kfac[name].C_delta):
            rel = (est - exact).norm() / exact.norm()
            assert rel < 0.15, (name, float(rel))


def test_conv_with_one_output_location_matches_backpack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).double()
    x, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    hooks = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, mode="ggn")
    bp = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, mode="ggn", backend="backpack")
    for name in hooks:
        torch.testing.assert_close(bp[name].C_A, hooks[name].C_A, rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(bp[name].C_delta, hooks[name].C_delta, rtol=RTOL, atol=1e-14)


def test_fisher_is_empirical_at_labels_drawn_from_the_model():
    model, loss_fn, x, y = build_case("mlp")
    fisher = kronecker_factors(model, loss_fn, x, y, mode="fisher",
                               generator=torch.Generator().manual_seed(7))
    probs = model(x).detach().softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7))[:, 0]
    emp = kronecker_factors(model, loss_fn, x, drawn, mode="empirical")
    for name in fisher:
        torch.testing.assert_close(fisher[name].C_delta, emp[name].C_delta, rtol=RTOL, atol=0)
        torch.testing.assert_close(fisher[name].C_A, emp[name].C_A, rtol=RTOL, atol=0)


def test_mse_fisher_matches_ggn_in_expectation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    ggn = kronecker_factors(model, nn.MSELoss(), x, y, mode="ggn")
    fisher = kronecker_factors(model, nn.MSELoss(), x, y, mode="fisher", mc_samples=3000,
                               generator=torch.Generator().manual_seed(0))
    for name in ggn:
        rel = (fisher[name].C_delta - ggn[name].C_delta).norm() / ggn[name].C_delta.norm()
        assert rel < 0.06, (name, float(rel))


def test_kronecker_curvature_is_the_quadratic_form_of_the_kronecker_product():
    torch.manual_seed(0)
    m, n, k = 4, 3, 2
    Ra, Rd = torch.randn(n, n, dtype=torch.float64), torch.randn(m, m, dtype=torch.float64)
    from curvlens.kronecker import KroneckerFactors

    f = KroneckerFactors(Ra @ Ra.T, Rd @ Rd.T, 1)
    U, V = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    K = torch.kron(f.C_delta, f.C_A)
    expected = torch.stack([torch.outer(U[:, j], V[:, j]).reshape(-1) for j in range(k)])
    expected = torch.einsum("ki,ij,kj->k", expected, K, expected)
    torch.testing.assert_close(kronecker_curvature(f, U, V), expected, rtol=1e-12, atol=0)


def test_parameter_grads_are_untouched():
    model, loss_fn, x, y = build_case("mlp")
    kronecker_factors(model, loss_fn, x, y, mode="ggn")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(mode="hessian"), ValueError, "mode must be one of"),
        (dict(backend="jax"), ValueError, "backend must be one of"),
        (dict(backend="backpack"), ValueError, "BackPACK has no empirical"),
        (dict(mc_samples=0), ValueError, "mc_samples"),
        (dict(layers=["nope"]), ValueError, "'nope' is not a module"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    model, loss_fn, x, y = build_case("mlp")
    with pytest.raises(error, match=match):
        kronecker_factors(model, loss_fn, x, y, **kwargs)


def test_bad_input_raises_with_layer_name():
    model, loss_fn, x, y = build_case("mlp")
    with pytest.raises(ValueError, match="empty batch"):
        kronecker_factors(model, loss_fn, x[:0], y[:0])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="loss is nan"):
        kronecker_factors(model, loss_fn, bad, y)
    with pytest.raises(ValueError, match="mode='fisher' needs a loss"):
        kronecker_factors(model, lambda out, t: out.sum() * 0 + out.pow(2).mean(), x, y,
                          mode="fisher")
    emb, emb_loss, tx, ty = build_case("embedding")
    with pytest.raises(ValueError, match="layer 'emb'.*no BackPACK"):
        kronecker_factors(emb, emb_loss, tx, ty, mode="ggn", backend="backpack")
    with pytest.raises(ValueError, match="reduction 'none'"):
        kronecker_factors(model, nn.CrossEntropyLoss(reduction="none"), x, y)


def test_nan_output_gradient_names_the_layer():
    model, loss_fn, x, y = build_case("mlp")

    def loss_with_nan_grad(out, t):
        return loss_fn(out, t) + (out[:, :1] * 0).sqrt().sum() * 0  # d sqrt(0) = inf -> nan

    with pytest.raises(RuntimeError, match="nearest the loss is '4'"):
        kronecker_factors(model, loss_with_nan_grad, x, y)
