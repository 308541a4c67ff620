"""SpectralNewton's default policy: the choice for each layer kind, measured alphas, overrides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvlens.optim import Role, SpectralNewton, choose, policy_weight_decay, roles
from curvlens.optim._policy import POLICY_DECAY, POLICY_RMS


class _Attention(nn.Module):
    def __init__(self, dim: int, fused: bool) -> None:
        super().__init__()
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)


class _Zoo(nn.Module):
    """One parameter of every kind the policy distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 6, 3)
        self.fused = _Attention(6, fused=True)
        self.split = _Attention(6, fused=False)
        self.mha = nn.MultiheadAttention(6, 2)  # packed in_proj_weight [18, 6]
        self.mha_kv = nn.MultiheadAttention(6, 2, kdim=4, vdim=4)  # separate q/k/v weights
        self.mlp = nn.Linear(6, 12)
        self.proj = nn.Linear(12, 6)  # an "out" name without q/k/v siblings: hidden
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11)


EXPECTED = {
    "emb.weight": (Role.EMBEDDING, False, 1),
    "conv.weight": (Role.CONV, True, 1),
    "conv.bias": (Role.VECTOR, False, 1),
    "fused.qkv.weight": (Role.ATTN_QKV, True, 3),
    "fused.out_proj.weight": (Role.ATTN_OUT, True, 1),
    "split.q_proj.weight": (Role.ATTN_Q, True, 1),
    "split.k_proj.weight": (Role.ATTN_K, True, 1),
    "split.v_proj.weight": (Role.ATTN_V, True, 1),
    "split.out_proj.weight": (Role.ATTN_OUT, True, 1),
    "mha.in_proj_weight": (Role.ATTN_QKV, True, 3),
    "mha.in_proj_bias": (Role.VECTOR, False, 1),
    "mha.out_proj.weight": (Role.ATTN_OUT, True, 1),
    "mha_kv.q_proj_weight": (Role.ATTN_Q, True, 1),
    "mha_kv.k_proj_weight": (Role.ATTN_K, True, 1),
    "mha_kv.v_proj_weight": (Role.ATTN_V, True, 1),
    "mha_kv.out_proj.weight": (Role.ATTN_OUT, True, 1),
    "mlp.weight": (Role.HIDDEN, True, 1),
    "proj.weight": (Role.HIDDEN, True, 1),
    "norm.weight": (Role.VECTOR, False, 1),
    "head.weight": (Role.HEAD, False, 1),
}


def test_policy_choice_for_each_layer_kind():
    net = _Zoo()
    found = roles(net)
    params = dict(net.named_parameters())
    for name, (role, spectral, blocks) in EXPECTED.items():
        assert found[name] is role, name
        choice = choose(role, tuple(params[name].shape))
        assert (choice.use_spectral, choice.blocks) == (spectral, blocks), name
        if spectral:
            assert (choice.alpha, choice.damping, choice.damping_mode, choice.rms_target) == (
                2.0, 0.01, "relative", POLICY_RMS), name
    assert choose(Role.HEAD, (11, 6), head_to_adamw=False).use_spectral


@pytest.mark.parametrize("lr", [3e-3, 0.02])
def test_optimizer_groups_follow_the_policy(lr):
    net = _Zoo()
    opt = SpectralNewton(net, lr=lr)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    for name, (_, spectral, blocks) in EXPECTED.items():
        g = by_name[name]
        assert g["use_spectral"] is spectral and g["lr"] == lr, name
        # every part loses the same fraction of its weights per step, whatever lr is
        assert g["lr"] * g["weight_decay"] == pytest.approx(POLICY_DECAY, rel=1e-12), name
        if spectral:
            assert (g["blocks"], g["damping_mode"], g["rms_target"], g["alpha"]) == (
                blocks, "relative", POLICY_RMS, 2.0), name


def test_policy_weight_decay_follows_each_parts_lr_and_yields_to_explicit_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).double()
    opt = SpectralNewton(net, lr=0.01, adamw_lr=1e-3)
    spec, adam = opt.param_groups
    assert (spec["weight_decay"], adam["weight_decay"]) == (
        pytest.approx(0.03), pytest.approx(0.3))
    assert policy_weight_decay(0.0) == 0.0  # lr 0: no decay, no division by zero
    W = net[0].weight
    before = W.detach().clone()
    W.grad = torch.zeros_like(W)  # a zero gradient: the step is the decay alone
    opt.step()
    torch.testing.assert_close(W.detach(), before * (1 - POLICY_DECAY), rtol=1e-12, atol=0)
    fixed = SpectralNewton(net, lr=0.01, weight_decay=0.5, adamw_weight_decay=0.0)
    assert [g["weight_decay"] for g in fixed.param_groups] == [0.5, 0.0]


@pytest.mark.parametrize("param", ["fused.qkv.weight", "mha.in_proj_weight"])
def test_fused_qkv_is_updated_as_three_blocks(param):
    """The first step on a fused q-k-v matrix (a Linear named ``qkv``, or
    ``nn.MultiheadAttention``'s packed ``in_proj_weight``) is the transform of each [d, n] block."""
    torch.manual_seed(0)
    net = _Zoo().double()
    W = net.get_parameter(param)
    before = W.detach().clone()
    opt = SpectralNewton(net, lr=0.1, weight_decay=0.0, rms_scale=False)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    M = (1 - 0.95) * (1 + 0.95) * W.grad  # Nesterov on a fresh Muon-style buffer
    expect = []
    for block in M.split(6):
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        x = S / S[0]
        expect.append(U @ torch.diag(x / (x**2 + 0.01)) @ Vh)
    opt.step()
    torch.testing.assert_close(W.detach(), before - 0.1 * torch.cat(expect), rtol=1e-9,
                               atol=1e-12)


def _lens(alpha, ci):
    report = SimpleNamespace(alpha=alpha, alpha_ci=ci)
    layers = {"mlp": report, "conv": SimpleNamespace(alpha=2.5, alpha_ci=(2.3, 2.7))}
    return SimpleNamespace(history=[SimpleNamespace(layers=layers)],
                           latest_alphas=lambda: {k: v.alpha for k, v in layers.items()})


@pytest.mark.parametrize("alpha,ci,expect", [
    (1.6, (1.4, 1.8), 1.6),  # narrow interval: measured
    (7.0, (6.8, 7.2), 3.0),  # narrow but out of range: clipped
    (0.7, (0.6, 0.8), 1.0),  # below 1: clipped (the update would grow with sigma)
    (2.6, (1.5, 3.7), 2.0),  # interval wider than 1: the role's default
    (float("nan"), (float("nan"), float("nan")), 2.0),  # no fit: default
])
def test_lens_alpha_used_only_when_its_interval_is_narrow(alpha, ci, expect):
    net = _Zoo()
    opt = SpectralNewton(net, lens=_lens(alpha, ci))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[net.mlp.weight]["alpha"] == expect
    assert opt.state[net.conv.weight]["alpha"] == 2.5


def test_lens_alpha_flagged_untrusted_is_not_used():
    net = _Zoo()
    lens = _lens(1.6, (1.5, 1.7))
    lens.history[-1].layers["mlp"].trusted = lambda exponent: exponent != "alpha"
    opt = SpectralNewton(net, lens=lens)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[net.mlp.weight]["alpha"] == 2.0


def test_explicit_options_override_the_policy():
    net = _Zoo()
    opt = SpectralNewton(net, lr=0.05, alpha=1.5, damping=0.1, damping_mode="absolute",
                         rms_scale=False, adamw_lr=1e-3)
    spectral = [g for g in opt.param_groups if g["use_spectral"]]
    assert all((g["alpha"], g["damping"], g["damping_mode"], g["rms_target"], g["lr"]) ==
               (1.5, 0.1, "absolute", None, 0.05) for g in spectral)
    assert [g["lr"] for g in opt.param_groups if not g["use_spectral"]] == [1e-3]


def test_lens_alpha_of_a_packed_matrix_is_the_mean_of_its_measured_blocks():
    """The lens measures nn.MultiheadAttention's in_proj_weight as three row blocks; the optimizer
    updates it with one exponent: the mean of the usable ones (a block whose interval is wider
    than 1 is left out)."""
    net = _Zoo()
    layers = {"mha.in_proj_weight.q": SimpleNamespace(alpha=1.4, alpha_ci=(1.3, 1.5)),
              "mha.in_proj_weight.k": SimpleNamespace(alpha=1.8, alpha_ci=(1.7, 1.9)),
              "mha.in_proj_weight.v": SimpleNamespace(alpha=2.9, alpha_ci=(0.5, 5.3))}
    lens = SimpleNamespace(history=[SimpleNamespace(layers=layers)],
                           latest_alphas=lambda: {k: v.alpha for k, v in layers.items()})
    opt = SpectralNewton(net, lens=lens)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[net.mha.in_proj_weight]["alpha"] == pytest.approx(1.6)
    assert opt.state[net.mlp.weight]["alpha"] == 2.0  # no report: the role's default
