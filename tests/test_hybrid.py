"""k-means in the first layers, LSUV in the rest (kmeansinit.init.hybrid) and LSUV's ``skip``."""
import pytest
import torch
from torch.testing import assert_close

from conftest import lsuv_layer_by_layer
from kmeansinit.init import initialize_, lsuv_
from kmeansinit.init._model import find_layers
from kmeansinit.models import create_model

FAST = dict(progress=False, steps=2, stat_patches=4096)


def _images(n=24, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["paper", "resnet20", "vgg11"])
def test_kmeans_lsuv_is_kmeans_variance_first_then_lsuv_on_the_rest(name):
    x = _images()

    def build():
        torch.manual_seed(0)
        return create_model(name, width=0.25)

    ours, kv = build(), build()
    report = initialize_(ours, "kmeans-lsuv", x, seed=4, layers=2, **FAST)
    # The reference, step by step: kmeans-variance on the first two layers (the same seed), then
    # LSUV layer by layer on every other conv and linear layer, with those two in place.
    rep_kv = initialize_(kv, "kmeans-variance", x, seed=4, layers=2, **FAST)
    first = [r.name for r in rep_kv.layers]
    assert len(first) == 2 and [r.name for r in report.layers][:2] == first
    lsuv_layer_by_layer(kv, x, seed=4, skip=first)
    named = dict(kv.named_parameters())
    for k, p in ours.named_parameters():
        assert torch.isfinite(p).all(), k
        if any(k.startswith(f + ".") for f in first):
            assert torch.equal(p, named[k]), k  # LSUV left the k-means layers exactly as they were
        else:
            assert_close(p, named[k], rtol=1e-5, atol=1e-6, msg=k)
    # Every layer is in the report once, and BN running statistics are as they were.
    assert sorted(r.name for r in report.layers) == sorted(find_layers(ours, include_linear=True))
    assert report.method == "kmeans-lsuv" and report.options["layers"] == 2
    for (k, a), b in zip(build().named_buffers(), ours.buffers()):
        assert torch.equal(a, b), k


def test_kmeans_lsuv_layers_after_the_first_have_unit_output_variance_and_orthogonal_rows():
    x = _images(32)
    torch.manual_seed(0)
    model = create_model("paper", width=0.25, batch_norm=False)  # no BN: LSUV's scale is all there is
    report = initialize_(model, "kmeans-lsuv", x, seed=0, layers=1, lsuv_options=dict(tol=0.01), **FAST)
    first = report.layers[0].name
    outs = {}
    # A clone, before the in-place ReLU; the hook returns None (a returned tensor would replace the output).
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: outs.update({n: out.clone()}))
             for n, m in find_layers(model, include_linear=True).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, m in find_layers(model, include_linear=True).items():
        if n == first:
            continue
        assert abs(float(outs[n].var()) - 1) < 0.02, n
        w = m.weight.detach().flatten(1)
        if w.shape[0] <= w.shape[1]:  # orthonormal rows, times the one scale LSUV divided by
            gram = w @ w.t()
            assert_close(gram, gram.diagonal().mean() * torch.eye(w.shape[0]), rtol=0, atol=1e-4 * float(gram.diagonal().mean()))


def test_kmeans_lsuv_same_seed_same_weights_and_depthwise_goes_to_lsuv():
    x = _images(16)

    def run(seed):
        torch.manual_seed(0)
        m = create_model("mobilenetv2", width=0.25)
        return m, initialize_(m, "kmeans-lsuv", x, seed=seed, layers=2, **FAST)

    (a, rep), (b, _), (c, _) = run(1), run(1), run(2)
    for (k, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), k
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    # MobileNetV2's second layer is depthwise: ZCA k-means cannot cluster it, LSUV sets it.
    (name, why), = rep.skipped.items()
    assert "depthwise" in why and "LSUV" in why
    assert sum(r.name == name for r in rep.layers) == 1


def test_lsuv_skip_leaves_those_layers_alone_and_names_an_unknown_one():
    x = _images(16)
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    before = {k: v.clone() for k, v in model.named_parameters()}
    rep = lsuv_(model, x, skip=["conv1", "layer1.0.conv1"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert torch.equal(model.layer1[0].conv1.weight, before["layer1.0.conv1.weight"])
    assert not torch.equal(model.layer1[0].conv2.weight, before["layer1.0.conv2.weight"])
    assert {"conv1", "layer1.0.conv1"}.isdisjoint(r.name for r in rep.layers)
    with pytest.raises(ValueError, match="'nope'"):
        lsuv_(model, x, skip=["nope"])
    with pytest.raises(ValueError, match="layers must be a positive int"):
        initialize_(create_model("paper", width=0.25), "kmeans-lsuv", x, layers=0, **FAST)


def test_kmeans_fast_is_kmeans_lsuv_on_the_first_layer_with_sampled_statistics():
    # 72 images: 73,728 first-layer patches, more than the 65,536 kmeans-fast's statistics take, so
    # the default is seen (kmeans-lsuv with every patch gives other weights).
    x = _images(72)
    opts = dict(progress=False, steps=2)

    def run(method, **kw):
        torch.manual_seed(0)
        m = create_model("paper", width=0.25)
        return m, initialize_(m, method, x, seed=3, **opts, **kw)

    fast, rep = run("kmeans-fast")
    same, _ = run("kmeans-lsuv", layers=1, stat_patches=2**16)
    every, rep_every = run("kmeans-lsuv", layers=1)
    for (k, a), b in zip(fast.named_parameters(), same.parameters()):
        assert torch.equal(a, b), k
    first = rep.layers[0].name
    assert dict(fast.named_parameters())[first + ".weight"].shape[1] == 3  # the first conv
    assert not torch.equal(dict(fast.named_parameters())[first + ".weight"], dict(every.named_parameters())[first + ".weight"])
    assert rep.method == "kmeans-fast" and rep.options["layers"] == 1 and rep.options["stat_patches"] == 2**16
    assert "stat_patches" not in rep_every.options  # recorded only when not the default, as before
    assert sorted(r.name for r in rep.layers) == sorted(find_layers(fast, include_linear=True))


def test_kmeans_fast_options_are_checked_by_name():
    from kmeansinit.init import check_options

    check_options("kmeans-fast", dict(layers=2, stat_patches=None, zca_eps=1.0))
    with pytest.raises(ValueError, match="kmeans-fast option stat_patches must be an integer"):
        check_options("kmeans-fast", dict(stat_patches="many"))
    with pytest.raises(ValueError, match="zca_epz"):
        check_options("kmeans-fast", dict(zca_epz=1.0))
