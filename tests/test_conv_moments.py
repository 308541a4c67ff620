"""Patch second moments of stride-1 convolutions against the unfolded patches (F.unfold)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlens._conv_moments import conv2d_patch_moments
from curvlens.kronecker import kronecker_factors


def _unfolded_sum(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``sum p p^T`` over the patches, from F.unfold on an explicitly zero-padded input."""
    if isinstance(conv.padding, str):
        pads = []
        for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = dil * (k - 1) if conv.padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = 0
    else:
        padding = conv.padding
    patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # [B, d, T]
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return rows.T @ rows, rows.shape[0]


CASES = [  # (kernel, padding, dilation, H, W)
    (3, 1, 1, 8, 8),
    (3, 1, 1, 1, 1),  # 1 x 1 maps: eight taps only ever see padding
    (3, 1, 1, 2, 2),
    (3, 0, 1, 5, 4),
    (5, 2, 1, 6, 7),
    (3, 2, 2, 7, 5),
    ((3, 2), (1, 0), 1, 5, 6),
    (3, "same", 1, 5, 5),
    (4, "same", 1, 6, 5),  # uneven "same" padding
    (3, "valid", 1, 4, 4),
    (3, "same", 2, 6, 6),
    ((1, 3), 0, (1, 2), 3, 7),
]


@pytest.mark.parametrize("kernel,padding,dilation,H,W", CASES)
def test_patch_moments_equal_the_unfolded_sum(kernel, padding, dilation, H, W):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel, padding=padding, dilation=dilation).double()
    x = torch.randn(4, 3, H, W, dtype=torch.float64)
    want, rows = _unfolded_sum(conv, x)
    add = conv2d_patch_moments(conv, x)
    out = torch.full_like(want, 0.5)  # adds to what is there
    assert add(out) == rows == x.shape[0] * conv(x)[0, 0].numel()
    torch.testing.assert_close(out - 0.5, want, rtol=1e-12, atol=1e-12)
    one = torch.zeros_like(want)  # an unbatched input counts as one sample
    assert conv2d_patch_moments(conv, x[0])(one) == rows // x.shape[0]
    torch.testing.assert_close(one, _unfolded_sum(conv, x[:1])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 2, 3, stride=2, padding=1),
    nn.Conv2d(4, 2, 3, padding=1, groups=2),
    nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 2, 1),
    nn.Conv1d(4, 2, 3, padding=1),
])
def test_other_convolutions_are_left_to_the_unfolded_rows(conv):
    x = torch.randn(2, 4, 5, 5) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 5)
    assert conv2d_patch_moments(conv, x) is None


def test_factors_of_a_stride1_network_equal_the_unfolded_factors():
    """Through kronecker_factors: every conv's C_A is the mean of the unfolded p p^T (the
    1 x 1 map of the last conv included), in float64."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2), nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=3), nn.Tanh(),  # unfolded (stride 3): 6 x 6 -> 2 x 2
        nn.Conv2d(3, 3, 2), nn.Tanh(),  # 2 x 2 -> 1 x 1
        nn.Conv2d(3, 5, 3, padding=1), nn.Flatten(),
    ).double()
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    factors = kronecker_factors(model, nn.CrossEntropyLoss(), x, y)
    h = x
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            want, rows = _unfolded_sum(layer, h)
            torch.testing.assert_close(factors[str(i)].C_A, want / rows, rtol=1e-10, atol=1e-14)
        h = layer(h)
