"""The one-pass layer stepper (kmeansinit.init.lockstep): same inputs as recomputing them, same inits."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from kmeansinit.init import kmeans_init_
from kmeansinit.init._model import Taps, batchnorm_train_mode, find_layers, forward_order
from kmeansinit.init.lockstep import Lockstep, Untraceable
from kmeansinit.models import create_model


def _images(n=24, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _stepper_and_taps(model, images, batch_size):
    found = find_layers(model)
    order = forward_order(model, found, images[:2])
    taps = Taps(model, {n: found[n] for n in order}, outputs=True)
    return taps, order


def _recomputed(taps, images, name, batch_size):
    return [taps.run(c, stop_at=name)[name].detach().clone() for c in images.split(batch_size)]


@pytest.mark.parametrize("name,gated", [("resnet20", False), ("mobilenetv2", False), ("paper", True)])
def test_inputs_equal_recomputed_ones_while_weights_change(name, gated):
    # Residual adds, depthwise convs and gated layers: after each layer's weights change, the
    # stepper's inputs of the next layers equal a fresh forward pass up to them (same BN batches).
    torch.manual_seed(0)
    model = create_model(name, gated=gated, width=0.25 if name == "mobilenetv2" else 1.0)
    images = _images()
    gen = torch.Generator().manual_seed(1)
    with batchnorm_train_mode(model), torch.no_grad():
        taps, order = _stepper_and_taps(model, images, 8)
        with taps:
            stepper = Lockstep(taps, images, 8)
            for n in order[:12]:
                got = stepper.inputs(n)
                want = _recomputed(taps, images, n, 8)
                assert len(got) == len(want) == 3
                for g, w in zip(got, want):
                    assert_close(g, w, rtol=0, atol=0)
                m = taps.targets[n]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))


def test_frees_values_after_their_last_use():
    # A plain chain keeps only the frontier: at most the current value per chunk, not every activation.
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())])
    images = torch.randn(8, 4, 8, 8)
    with torch.no_grad(), Taps(model, find_layers(model), outputs=True) as taps:
        stepper = Lockstep(taps, images, 4)
        for i in range(6):
            stepper.inputs(f"{2 * i}")
            assert all(len(env) <= 2 for env in stepper.envs), [len(e) for e in stepper.envs]


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)


class _Branchy(_TwoConvs):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        x = F.relu(self.a(x))
        if x.mean() > 0:
            x = x * 2
        return self.b(x)


class _Shared(_TwoConvs):
    """One layer called twice: its "inputs" are not one tensor."""

    def forward(self, x):
        return self.b(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("cls,why", [(_Branchy, "cannot trace"), (_Shared, "more than once")])
def test_untraceable_models_are_refused_and_the_init_recomputes(cls, why):
    torch.manual_seed(0)
    model = cls()
    images = _images(16)
    with torch.no_grad(), Taps(model, find_layers(model), outputs=True) as taps, pytest.raises(Untraceable, match=why):
        Lockstep(taps, images, 8)
    # The init falls back to recomputing: same weights as with lockstep off.
    runs = []
    for lockstep in (True, False):
        m = cls()
        m.load_state_dict(model.state_dict())
        kmeans_init_(m, images, mode="layerwise", steps=3, batch_size=8, lockstep=lockstep, progress=False)
        runs.append(m.state_dict())
    for k in runs[0]:
        assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)


def test_layers_out_of_order_or_unknown_raise():
    model = create_model("paper")
    images = _images(8)
    with batchnorm_train_mode(model), torch.no_grad():
        taps, order = _stepper_and_taps(model, images, 8)
        with taps:
            stepper = Lockstep(taps, images, 8)
            stepper.inputs(order[1])
            with pytest.raises(ValueError, match="already passed"):
                stepper.inputs(order[0])
            with pytest.raises(ValueError, match="not a target"):
                stepper.inputs("nope")


@pytest.mark.parametrize("options", [
    dict(mode="layerwise", preprocess="zca", pairs=True, scale="variance", steps=3),  # kmeans-variance
    dict(mode="layerwise", preprocess="zca", pairs=True, scale="he", steps=3, lloyd_patches=256,
         stat_patches=1024),                                                          # the rows path
    dict(mode="joint", steps=2, refine_steps=2),                                      # Lloyd + refinement
])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_init_with_lockstep_equals_the_recomputing_init(name, options):
    torch.manual_seed(0)
    base = create_model(name, width=0.25)
    images = _images(16)
    # The first 12 convs in forward order (residual adds and, in MobileNetV2, depthwise and 1x1
    # convs among them): enough to test, and the suite stays fast.
    out = []
    for lockstep in (True, False):
        m = create_model(name, width=0.25)
        m.load_state_dict(base.state_dict())
        rep = kmeans_init_(m, images, batch_size=8, lockstep=lockstep, progress=False, layers=12, **options)
        out.append((m.state_dict(), rep))
    (a, ra), (b, rb) = out
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda s: f"{k}: {s}")  # bit for bit
    assert_close(torch.tensor([r.objective_after for r in ra.layers]),
                 torch.tensor([r.objective_after for r in rb.layers]), rtol=0, atol=0)


def test_lockstep_is_off_with_more_images_than_stat_images():
    # Then statistics come from the head and Lloyd streams over all images: the recomputing path,
    # whatever `lockstep` says (same weights).
    torch.manual_seed(0)
    base = create_model("paper", width=0.25)
    images = _images(32)
    out = []
    for lockstep in (True, False):
        m = create_model("paper", width=0.25)
        m.load_state_dict(base.state_dict())
        kmeans_init_(m, images, mode="layerwise", steps=2, batch_size=8, stat_images=16, lockstep=lockstep,
                     progress=False)
        out.append(m.state_dict())
    for k in out[0]:
        assert_close(out[0][k], out[1][k], rtol=0, atol=0)
