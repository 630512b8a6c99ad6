"""The model zoo (kmeansinit.models): shapes, published parameter counts, gated conversion, every init."""
import math

import pytest
import torch
import torch.nn as nn

from kmeansinit import GatedConv2d, initialize_
from kmeansinit.init import METHODS, RUNS_KMEANS
from kmeansinit.models import MODELS, PaperNet, convert_to_gated, count_parameters, create_model, fit_whitening_

ZOO = ["resnet20", "resnet56", "vgg11", "mobilenetv2"]
INIT_ZOO = ["resnet20", "vgg11", "mobilenetv2"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("classes", [10, 100])
def test_forward_shape_and_backward(name, classes):
    model = create_model(name, num_classes=classes, width=0.5)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    fit_whitening_(model, x.detach())  # coates-triangle's data-fitted first layer; no other net has one
    y = model(x)
    assert y.shape == (2, classes)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet_parameter_counts_match_the_published_ones():
    # He et al. (2016), Table 6: ResNet-20 0.27M, ResNet-56 0.85M (option A shortcuts, no projection weights).
    assert round(count_parameters(create_model("resnet20")) / 1e6, 2) == 0.27
    assert round(count_parameters(create_model("resnet56")) / 1e6, 2) == 0.85
    # Exactly: convs 3x3 without bias, BN (2 per channel), the final linear layer.
    def resnet(n):
        total, c = 3 * 16 * 9 + 32, 16
        for base in (16, 32, 64):
            for _ in range(n):
                total += c * base * 9 + base * base * 9 + 4 * base
                c = base
        return total + 64 * 10 + 10

    assert count_parameters(create_model("resnet20")) == resnet(3) == 269_722
    assert count_parameters(create_model("resnet56")) == resnet(9)


def test_zoo_structure():
    vgg = create_model("vgg11")
    assert [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 256, 512, 512, 512, 512]
    mb = create_model("mobilenetv2")
    depthwise = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    # CIFAR strides: 32x32 in, 4x4 before the pool.
    assert mb.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        create_model("resnet18")


@pytest.mark.parametrize("name", ZOO)
def test_convert_to_gated_replaces_kxk_convs_only(name):
    model = create_model(name, width=0.5)
    before = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    gated = convert_to_gated(model)
    assert gated is not model and not any(isinstance(m, GatedConv2d) for m in model.modules())
    after = dict(gated.named_modules())
    for n, m in before:
        g = after[n]
        if max(m.kernel_size) > 1:
            assert isinstance(g, GatedConv2d)
            assert (g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.groups) == \
                   (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups)
            assert g.weight.shape[0] == 3 * m.weight.shape[0]
        else:
            assert type(g) is nn.Conv2d
    y = gated(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert y.shape == (2, 10) and all(torch.isfinite(p.grad).all() for p in gated.parameters())
    assert isinstance(create_model(name, width=0.5, gated=True), type(model))


def test_gated_paper_net_is_papernet_gated():
    a, b = create_model("paper", gated=True), PaperNet(gated=True)
    assert count_parameters(a) == count_parameters(b)


# Small widths and few images keep the suite fast; MobileNetV2's last 1x1 conv has 1,280 filters on
# 4x4 maps, so it needs at least 80 images for one patch per filter.
IMAGES = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", INIT_ZOO)
def test_the_fast_options_run_on_every_zoo_model(name):
    # The cheaper init (ZCA statistics and Lloyd on sampled patches, Cholesky whitening): finite,
    # changed weights on every zoo model, depthwise convs skipped as under the preset.
    torch.manual_seed(0)
    model = create_model(name, width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = initialize_(model, "kmeans-he-norm", images, progress=False, stat_patches=4096, lloyd_patches=4096,
                         steps=3, whitening="cholesky")
    state = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    clustered = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in report.skipped]
    assert clustered and all(not torch.equal(state[f"{n}.weight"], before[f"{n}.weight"]) for n in clustered)


@pytest.mark.parametrize("name", INIT_ZOO)
@pytest.mark.parametrize("method", ["kmeans"] + [m for m in METHODS if m not in ("kmeans", "kmeans-paper")])
def test_every_init_runs_on_every_zoo_model(name, method):
    # Every method on ResNet-20; on the others the preset, its two controls and the data-dependent peers.
    # (resnet56 is resnet20 with more blocks: its forward and backward are tested above.)
    if name != "resnet20" and method not in ("kmeans", "he-kmeans-norm", "lsuv", "whitening"):
        pytest.skip("covered on resnet20")
    torch.manual_seed(0)
    model = create_model(name, width=0.25)
    # k-means needs the 96 images (MobileNetV2, above); LSUV's forward passes cost 3x as much on them.
    uses_kmeans = method in RUNS_KMEANS
    images = torch.randn(96 if uses_kmeans else 32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = dict(progress=False, steps=2) if uses_kmeans else {}
    if method in ("kmeans-joint",):
        opts["refine_steps"] = 2
    report = initialize_(model, method, images, **opts) if method not in ("normal", "xavier", "he", "he-kmeans-norm") \
        else initialize_(model, method)
    state = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert any(not torch.equal(state[f"{n}.weight"], before[f"{n}.weight"]) for n in convs)
    if method == "kmeans" and name == "mobilenetv2":
        # Depthwise convs cannot be ZCA-whitened: left at the preset's He base, and named.
        dw = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert set(report.skipped) == set(dw)
        assert all("depthwise" in why for why in report.skipped.values())
        m = dict(model.named_modules())[dw[0]]
        assert math.isclose(float(m.weight.detach().std()), math.sqrt(2 / 9), rel_tol=0.25)  # He: std sqrt(2 / fan_in)


def test_unsupported_layers_raise_when_asked():
    model = create_model("mobilenetv2", width=0.25)
    images = torch.randn(96, 3, 32, 32)
    with pytest.raises(ValueError, match=r"features\.3\.conv\.0: a depthwise conv \(groups=8\)"):
        initialize_(model, "kmeans", images, unsupported="error", progress=False, steps=1)
    with pytest.raises(ValueError, match="unsupported must be"):
        initialize_(model, "kmeans", images, unsupported="ignore", progress=False)


def test_kmeans_he_norm_is_the_preset_at_hes_norm():
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = create_model("resnet20", width=0.5), create_model("resnet20", width=0.5)
    initialize_(a, "kmeans", images, progress=False, steps=2)
    initialize_(b, "kmeans-he-norm", images, progress=False, steps=2)
    convs = [(ma, mb) for ma, mb in zip(a.modules(), b.modules()) if isinstance(ma, nn.Conv2d)]
    cosines = []
    for i, (ma, mb) in enumerate(convs):
        wa, wb = ma.weight.detach().flatten(1), mb.weight.detach().flatten(1)
        torch.testing.assert_close(wb.norm(dim=1), torch.full((wb.shape[0],), math.sqrt(2.0)))
        cos = torch.nn.functional.cosine_similarity(wa, wb, dim=1)
        if i == 0:  # same inputs (the images): the same directions
            torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)
        cosines.append(cos)
    # Later layers see their inputs through BN, whose eps makes them depend on the earlier filters'
    # scale by about 1e-5: enough to flip an assignment, after which k-means (chaotic in its data)
    # lands elsewhere. So only the first layer's directions are compared; every layer's norm above.
    assert len(cosines) == 19


@pytest.mark.parametrize("method,tol", [("kmeans-variance", 1e-3), ("lsuv", 0.1)])
def test_data_dependent_inits_give_unit_variance_in_a_resnet_without_bn(method, tol):
    # Without BN nothing renormalizes a residual net's activations: the init's scale is the forward
    # pass's. Both calibrate each conv in forward order to unit output variance on the init images
    # (LSUV to within its tol); the shortcuts still add to it from block to block.
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, batch_norm=False)
    images = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opts = dict(progress=False, steps=2, zca_eps=1.0) if method.startswith("kmeans") else dict(batch_size=96)
    initialize_(model, method, images, **opts)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(torch.isfinite(m.weight).all() and m.bias.abs().max() == 0 for m in convs.values())
    var = {}
    for n, m in convs.items():
        m.register_forward_hook(lambda mod, a, out, n=n: var.__setitem__(n, float(out.double().var(unbiased=False))))
    with torch.no_grad():
        model(images)
    assert len(var) == 19
    for n, v in var.items():
        assert abs(v - 1) < tol, (n, v)
