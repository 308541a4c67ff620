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


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kernel,padding,dilation,H,W", CASES)
def test_patch_moments_equal_the_unfolded_sum(kernel, padding, dilation, H, W):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel, padding=padding, dilation=dilation).double()
    x = torch.randn(4, 3, H, W, dtype=torch.float64)
    want, rows = _unfolded_sum(conv, x)
    moments = conv2d_patch_moments(conv, x)
    order = moments.order  # tap-major: order[t * C + c] = c * taps + t
    taps = want.shape[0] // 3
    assert order.tolist() == [c * taps + t for t in range(taps) for c in range(3)]
    out = torch.full_like(want, 0.5)  # adds to what is there
    assert moments.add(out) == rows == x.shape[0] * conv(x)[0, 0].numel()
    # the upper triangle holds the sum in tap order (only upper tap blocks are written)
    torch.testing.assert_close((out - 0.5).triu(), want[order][:, order].triu(), rtol=1e-12,
                               atol=1e-12)
    one = torch.zeros_like(want)  # an unbatched input counts as one sample
    assert conv2d_patch_moments(conv, x[0]).add(one) == rows // x.shape[0]
    torch.testing.assert_close(one.triu(), _unfolded_sum(conv, x[:1])[0][order][:, order].triu(),
                               rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("dim_channels", [3, 64])  # 27: one block; 576: the blocked dense sum
def test_side_in_tap_order_takes_rows_and_reads_in_weight_order(dim_channels, monkeypatch):
    """A factor side summed in tap-major order still takes unfolded rows, hands out the
    weight-order factor, switches order on request and all-reduces in weight order."""
    import curvlens._factor_store as store

    torch.manual_seed(2)
    conv = nn.Conv2d(dim_channels, 2, 3, padding=1).double()
    x1, x2 = (torch.randn(2, dim_channels, 4, 5, dtype=torch.float64) for _ in range(2))
    (want1, n1), (want2, n2) = _unfolded_sum(conv, x1), _unfolded_sum(conv, x2)
    dim = want1.shape[0]
    side = store.FactorSide(dim, dtype=torch.float64, device=torch.device("cpu"),
                            budget=1 << 30, layer="conv")
    moments = conv2d_patch_moments(conv, x1)
    assert moments.add(side.dense_sum(moments.order)) == n1
    rows = F.unfold(x2, 3, padding=1).transpose(1, 2).reshape(-1, dim)
    side.add(rows)  # permuted into the side's order
    want = (want1 + want2) / (n1 + n2)
    torch.testing.assert_close(side.finish(n1 + n2), want, rtol=1e-12, atol=1e-12)
    twin = side.copy()
    side._reorder(None)  # back to weight order
    assert side.order is None
    torch.testing.assert_close(side.finish(n1 + n2), want, rtol=1e-12, atol=1e-12)
    side.dense_sum(moments.order)
    torch.testing.assert_close(side.finish(n1 + n2), want, rtol=1e-12, atol=1e-12)
    # a one-process "group": all_reduce must leave the sum in weight order, unchanged
    monkeypatch.setattr(store, "is_distributed", lambda: True)
    monkeypatch.setattr(store, "all_reduce_sum", lambda t: t)
    twin.all_reduce()
    assert twin.order is None
    torch.testing.assert_close(twin.finish(n1 + n2), want, rtol=1e-12, atol=1e-12)


def test_side_in_tap_order_reads_again_after_more_sums():
    """Reading a tap-ordered side mirrors its upper triangle in place (the lower one is
    scratch); sums added after a read and read again still equal the unfolded sums."""
    from curvlens._factor_store import FactorSide

    torch.manual_seed(3)
    conv = nn.Conv2d(70, 2, 3, padding=1).double()  # 630 = 2 tiles and a bit
    xs = [torch.randn(2, 70, 3, 4, dtype=torch.float64) for _ in range(3)]
    side = FactorSide(630, dtype=torch.float64, device=torch.device("cpu"), budget=1 << 30,
                      layer="conv")
    want, count = torch.zeros(630, 630, dtype=torch.float64), 0
    for x in xs:
        moments = conv2d_patch_moments(conv, x)
        count += moments.add(side.dense_sum(moments.order))
        want += _unfolded_sum(conv, x)[0]
        assert side.order is not None  # still in tap order
        torch.testing.assert_close(side.finish(count), want / count, rtol=1e-12, atol=1e-14)
