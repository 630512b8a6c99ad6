import pytest
import torch
import torch.nn as nn

from kmeansinit import GatedConv2d, PaperNet, count_parameters, matching_width
from kmeansinit.models import CONV_SPEC, HIDDEN


def expected_params(width=1.0, gated=False, num_classes=10, c=3):
    total = 0
    for out, k, _ in CONV_SPEC:
        out = max(1, round(out * width))
        total += (3 if gated else 1) * out * c * k * k + 2 * out  # conv (no bias) + BN affine
        c = out
    for h in HIDDEN:
        h = max(1, round(h * width))
        total += c * h + 2 * h
        c = h
    return total + c * num_classes + num_classes


@pytest.mark.parametrize("width,gated,classes", [(1.0, False, 10), (1.0, True, 10), (3.0, False, 100), (0.5, True, 100)])
def test_parameter_counts(width, gated, classes):
    model = PaperNet(num_classes=classes, width=width, gated=gated)
    assert count_parameters(model) == expected_params(width, gated, classes)


def test_table1_shapes():
    model = PaperNet(gated=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, GatedConv2d) for c in convs)
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == CONV_SPEC
    sizes = []
    for c in convs:
        c.register_forward_hook(lambda m, a, o: sizes.append(o.shape[-1]))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert sizes == [32, 16, 16, 8, 8, 8, 8, 8]


def test_matching_width_matches_gated_parameter_count():
    gated = count_parameters(PaperNet(gated=True))
    w = matching_width(PaperNet(gated=True))
    assert 1.5 < w < 1.9  # sqrt(3)-ish, not the paper's 3
    got = count_parameters(PaperNet(width=w))
    assert abs(got - gated) / gated < 0.01
    assert count_parameters(PaperNet(width=3.0)) > 2 * gated  # x3 widths is far from matched


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        PaperNet(width=0)


def test_papernet_without_batch_norm():
    from kmeansinit import create_model

    m = create_model("paper", batch_norm=False)
    assert not any(isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d)) for x in m.modules())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None for c in convs)
    with_bn = create_model("paper")
    # BN's weight and bias (2 per channel) are gone; a bias per conv / hidden FC channel is added.
    bn = sum(p.numel() for x in with_bn.modules() if isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d)) for p in x.parameters())
    assert count_parameters(m) == count_parameters(with_bn) - bn // 2
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="mobilenetv2.*built with its BN"):
        create_model("mobilenetv2", batch_norm=False)


def test_vgg11_without_batch_norm():
    from kmeansinit import create_model

    m, with_bn = create_model("vgg11", width=0.25, batch_norm=False), create_model("vgg11", width=0.25)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None for c in convs)
    assert all(c.bias is None for c in with_bn.modules() if isinstance(c, nn.Conv2d))
    # Same conv shapes; BN's 2 parameters a channel become one bias a channel.
    assert [c.weight.shape for c in convs] == [c.weight.shape for c in with_bn.modules() if isinstance(c, nn.Conv2d)]
    bn = sum(p.numel() for x in with_bn.modules() if isinstance(x, nn.BatchNorm2d) for p in x.parameters())
    assert count_parameters(m) == count_parameters(with_bn) - bn // 2
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("name,convs", [("resnet20", 19), ("resnet56", 55)])
def test_resnet_without_batch_norm(name, convs):
    from kmeansinit import create_model

    m, with_bn = create_model(name, width=0.5, batch_norm=False), create_model(name, width=0.5)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    got = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(got) == convs and all(c.bias is not None for c in got)
    ref = [x for x in with_bn.modules() if isinstance(x, nn.Conv2d)]
    assert [c.weight.shape for c in got] == [c.weight.shape for c in ref] and all(c.bias is None for c in ref)
    # BN's 2 parameters a channel become one bias a channel; the module names stay (bn1, bn2: Identity).
    bn = sum(p.numel() for x in with_bn.modules() if isinstance(x, nn.BatchNorm2d) for p in x.parameters())
    assert count_parameters(m) == count_parameters(with_bn) - bn // 2
    assert [n for n, _ in m.named_modules()] == [n for n, _ in with_bn.named_modules()]
    # Without BN the forward pass is the convs, ReLUs and shortcuts alone: a block by hand.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stem = torch.relu(m.conv1(x))
    b = m.layer1[0]
    want = torch.relu(b.conv2(torch.relu(b.conv1(stem))) + stem)
    torch.testing.assert_close(m.layer1[0](stem), want)
    y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
