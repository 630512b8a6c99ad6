"""Fixup's init (kmeansinit.init.fixup): the weight rules of Zhang et al. (2019) on residual nets."""
import math

import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.testing import assert_close

from kmeansinit import initialize_
from kmeansinit.init import fixup_, residual_blocks
from kmeansinit.models import create_model


def test_fixup_on_resnet20_without_bn():
    model = create_model("resnet20", batch_norm=False)
    nn.init.constant_(model.fc.bias, 3.0)  # every bias must be zeroed too
    initialize_(model, "fixup", generator=torch.Generator().manual_seed(0))
    blocks = residual_blocks(model)
    assert len(blocks) == 9 and all(len(c) == 2 for c in blocks.values())
    # rule 1: each branch's last conv and the classifier at zero, so every block starts as its shortcut
    assert all(c[-1].weight.abs().max() == 0 for c in blocks.values())
    assert model.fc.weight.abs().max() == 0 and model.fc.bias.abs().max() == 0
    # rule 2: the branch's other conv at He's std times L^(-1/(2m-2)) = 9^(-1/2) = 1/3; the stem at He's.
    # KS tests against those normals (as PyTorch's own init tests check a distribution).
    for c in [cs[0] for cs in blocks.values()]:
        std = math.sqrt(2.0 / c.weight[0].numel()) / 3.0
        assert stats.kstest(c.weight.detach().flatten().double().numpy() / std, "norm").pvalue > 1e-4
        assert c.bias.abs().max() == 0
    std = math.sqrt(2.0 / 27)
    assert stats.kstest(model.conv1.weight.detach().flatten().double().numpy() / std, "norm").pvalue > 1e-4
    # and the block's output is then the shortcut's, through the ReLU (option A pads channels with zeros)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    h = torch.relu(model.conv1(x))
    for block in model.layer1:
        assert_close(block(h), torch.relu(h))
        h = block(h)
    assert model(x).abs().max() == 0


def test_fixup_scales_each_branch_by_its_own_length():
    # Three convs a branch (a bottleneck, as torchvision names its convs): L^(-1/(2*3-2)) = L^(-1/4).
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 1)

        def forward(self, x):
            return torch.relu(x + self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))

    net = nn.Sequential(nn.Conv2d(3, 8, 3), *[Bottleneck() for _ in range(16)], nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 6, 6))
    initialize_(net, "he", generator=torch.Generator().manual_seed(5))
    he = {n: m.weight.clone() for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    initialize_(net, "fixup", generator=torch.Generator().manual_seed(5))
    got = {n: m.weight for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(got) == 1 + 16 * 3 + 1
    for name, w in got.items():
        if name.endswith("conv3") or name == "18":  # "18": the classifier
            assert w.abs().max() == 0, name
        elif name.endswith(("conv1", "conv2")):
            assert_close(w, he[name] * 16 ** -0.25)  # the same He draw, scaled
        else:
            assert_close(w, he[name])  # the stem: He's init, untouched


def test_fixup_is_seeded_and_refuses_nets_without_blocks():
    a, b = create_model("resnet20", width=0.5, batch_norm=False), create_model("resnet20", width=0.5, batch_norm=False)
    fixup_(a, generator=torch.Generator().manual_seed(3))
    fixup_(b, generator=torch.Generator().manual_seed(3))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="fixup needs residual blocks.*VGG"):
        initialize_(create_model("vgg11", width=0.25), "fixup")

    class TutorialNet(nn.Module):  # a plain net whose own convs are named conv1, conv2: not a block
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5), nn.Linear(16, 10)

    with pytest.raises(ValueError, match="fixup needs residual blocks.*TutorialNet"):
        initialize_(TutorialNet(), "fixup")
