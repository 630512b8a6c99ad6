import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kmeansinit import GatedConv2d


def reference(layer: GatedConv2d, x):
    """Eq. 2 from three separate convolutions (w1 gate, w2 and w3 values)."""
    w1, w2, w3 = layer.weight.chunk(3, dim=0)
    b1, b2, b3 = layer.bias.chunk(3) if layer.bias is not None else (None, None, None)
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pad = 0
    else:
        pad = layer.padding
    conv = lambda w, b: F.conv2d(x, w, b, layer.stride, pad, layer.dilation, layer.groups)
    psi = torch.sigmoid(conv(w1, b1))
    return psi * conv(w2, b2) + (1 - psi) * conv(w3, b3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(stride=2, padding=1),
        dict(padding=2, dilation=2),
        dict(groups=2, padding=1),
        dict(groups=4, stride=2, padding=1, bias=False),
        dict(padding="same"),
        dict(padding="valid", dilation=(1, 2)),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=1, padding_mode="circular", groups=2),
    ],
)
def test_gated_matches_three_convs(kw):
    torch.manual_seed(0)
    layer = GatedConv2d(8, 12, 3, **kw).double()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    x = torch.randn(2, 8, 9, 10, dtype=torch.double)
    assert_close(layer(x), reference(layer, x))


def test_gated_shapes_and_repr():
    layer = GatedConv2d(4, 6, (3, 5), padding=(1, 2))
    assert layer.weight.shape == (18, 4, 3, 5)
    assert layer.bias.shape == (18,)
    assert layer.out_channels == 6
    assert layer(torch.randn(1, 4, 7, 7)).shape == (1, 6, 7, 7)
    assert "6" in repr(layer)


def test_gated_gradients_match_reference():
    torch.manual_seed(1)
    layer = GatedConv2d(3, 4, 3, padding=1, groups=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.double, requires_grad=True)
    g1 = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight))
    g2 = torch.autograd.grad(reference(layer, x).square().sum(), (x, layer.weight))
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_gated_device_dtype_and_bad_groups():
    layer = GatedConv2d(4, 4, 1, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="divisible"):
        GatedConv2d(4, 6, 3, groups=4)


@pytest.mark.parametrize("groups", [1, 2])
def test_gated_channels_last_and_unbatched_match_reference(groups):
    torch.manual_seed(2)
    layer = GatedConv2d(4, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(3, 4, 7, 6, dtype=torch.double)
    ref = reference(layer, x)
    # Channels-last memory (the gate takes a dense copy there): same values and gradients.
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    lc = GatedConv2d(4, 6, 3, padding=1, groups=groups).double().to(memory_format=torch.channels_last)
    lc.load_state_dict(layer.state_dict())
    assert_close(lc(xc), ref)
    xr = x.clone().requires_grad_(True)
    ga = torch.autograd.grad(lc(xc).square().sum(), (xc, lc.weight))
    gb = torch.autograd.grad(reference(layer, xr).square().sum(), (xr, layer.weight))
    for a, b in zip(ga, gb):
        assert_close(a, b)
    # Unbatched (C, H, W) input, as nn.Conv2d accepts it.
    assert_close(layer(x[1]), ref[1])
    assert_close(layer.pre_gate(x[1]), layer.pre_gate(x)[1])
