import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from kmeansinit import GatedConv2d, cosine_penalty, kmeans_objective
from kmeansinit.objectives import filter_responses, masked_patch_sums, patch_sq_norms, patch_sums


def patches_and_filters(x, layer):
    """Independent reference: unfold every patch; filters per bank. Returns list of (patches, filters)."""
    if isinstance(layer, nn.Linear):
        return [(x.reshape(-1, x.shape[-1]), layer.weight)]
    conv1d = isinstance(layer, nn.Conv1d)
    if conv1d:
        x, k = x.unsqueeze(2), (1, layer.kernel_size[0])
        st, dil = (1, layer.stride[0]), (1, layer.dilation[0])
    else:
        k, st, dil = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding == "same" or layer.padding_mode != "zeros" or conv1d:
        pads = layer._reversed_padding_repeated_twice
        if conv1d:
            pads = list(pads) + [0, 0]
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pads, mode=mode)
        pad = 0
    else:
        pad = layer.padding
    p = F.unfold(x, k, dilation=dil, padding=pad, stride=st)  # (N, C*k, L)
    g = layer.groups
    w = layer.weight
    if isinstance(layer, GatedConv2d):
        # Bank of group j: the gate and both value kernels of output channels of group j.
        o = layer.out_channels // g
        w = w.reshape(3, g, o, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
    out = []
    per = p.shape[1] // g
    for j in range(g):
        pj = p[:, j * per:(j + 1) * per].transpose(1, 2).reshape(-1, per)
        wj = w.reshape(g, -1, *w.shape[1:])[j].reshape(-1, per)
        out.append((pj, wj))
    return out


def reference_objective(x, layer, reduction):
    vals = []
    for p, w in patches_and_filters(x, layer):
        wn = w / w.norm(dim=1, keepdim=True)
        vals.append((p @ wn.t()).amax(dim=1))
    v = torch.cat(vals)
    return v.mean() if reduction == "mean" else v.sum()


LAYERS = [
    lambda: nn.Conv2d(4, 6, 3),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2),
    lambda: nn.Conv2d(4, 6, (3, 2), groups=2, padding="same"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    lambda: GatedConv2d(4, 6, 3, padding=1),
    lambda: GatedConv2d(4, 6, 3, stride=2, groups=2),
    lambda: nn.Conv1d(4, 5, 3, stride=2, padding=1),
    lambda: nn.Linear(7, 5),
]


# The (3, 2) kernel with padding="same" is there on purpose (uneven padding); torch warns that it pads a copy.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("make,reduction", list(itertools.product(LAYERS, ["mean", "sum"])))
def test_objective_matches_unfold_reference(make, reduction):
    torch.manual_seed(0)
    layer = make().double()
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, 4, 7, dtype=torch.double)
    elif isinstance(layer, nn.Conv1d):
        x = torch.randn(3, 4, 11, dtype=torch.double)
    else:
        x = torch.randn(3, 4, 9, 8, dtype=torch.double)
    assert_close(kmeans_objective(x, layer, reduction), reference_objective(x, layer, reduction))


def test_objective_ignores_bias_and_filter_scale():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    a = kmeans_objective(x, layer)
    with torch.no_grad():
        layer.bias.fill_(5.0)
        layer.weight.mul_(torch.tensor([1.0, 2.0, 0.5, 7.0], dtype=torch.double).view(4, 1, 1, 1))
    assert_close(kmeans_objective(x, layer), a)


def test_objective_rejects_bad_reduction_and_layer():
    with pytest.raises(ValueError, match="reduction"):
        kmeans_objective(torch.randn(1, 3, 4, 4), nn.Conv2d(3, 2, 3), reduction="max")
    with pytest.raises(TypeError, match="unsupported layer"):
        kmeans_objective(torch.randn(1, 3, 4, 4), nn.ConvTranspose2d(3, 2, 3))


def reference_penalty(w):
    w = w.flatten(1)
    total = 0.0
    for i in range(w.shape[0]):
        for j in range(i + 1, w.shape[0]):
            total = total + (torch.dot(w[i], w[j]) / (w[i].norm() * w[j].norm())) ** 2
    return 0.5 * total


def eq6_gradient(w):
    """Eq. 6: d/dw_i = sum_{j != i} cos_ij * (w_j / (|w_i||w_j|) - cos_ij * w_i / |w_i|^2)."""
    f = w.flatten(1)
    g = torch.zeros_like(f)
    for i in range(f.shape[0]):
        for j in range(f.shape[0]):
            if i == j:
                continue
            ni, nj = f[i].norm(), f[j].norm()
            c = torch.dot(f[i], f[j]) / (ni * nj)
            g[i] += c * (f[j] / (ni * nj) - c * f[i] / ni**2)
    return g.reshape(w.shape)


def test_cosine_penalty_value_and_eq6_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 2, 3, 3, dtype=torch.double, requires_grad=True)
    assert_close(cosine_penalty(w), reference_penalty(w))
    (g,) = torch.autograd.grad(cosine_penalty(w), w)
    assert_close(g, eq6_gradient(w.detach()))


def test_cosine_penalty_orthogonal_is_zero_and_parallel_counts_pairs():
    eye = torch.eye(4)
    assert float(cosine_penalty(eye)) == 0.0
    same = torch.ones(4, 3)
    assert_close(cosine_penalty(same), torch.tensor(0.5 * 6))


def test_cosine_penalty_zero_filter_no_nan():
    w = torch.randn(4, 5)
    w[2] = 0
    w.requires_grad_(True)
    p = cosine_penalty(w)
    (g,) = torch.autograd.grad(p, w)
    assert torch.isfinite(p) and torch.isfinite(g).all()
    assert_close(p, reference_penalty(torch.cat([w[:2], w[3:]]).detach()))


@pytest.mark.parametrize("make", LAYERS)
def test_masked_patch_sums_and_patch_norms_match_unfold(make):
    torch.manual_seed(0)
    layer = make().double()
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, 7, dtype=torch.double)
    elif isinstance(layer, nn.Conv1d):
        x = torch.randn(3, 4, 11, dtype=torch.double)
    else:
        x = torch.randn(3, 4, 9, 8, dtype=torch.double)
    r = filter_responses(x, layer)
    mask = torch.rand_like(r)
    sums = masked_patch_sums(x, layer, mask)
    banks = patches_and_filters(x, layer)
    sq = patch_sq_norms(x, layer)
    for j, (p, _) in enumerate(banks):
        m = mask[:, j].permute(0, 2, 1).reshape(-1, mask.shape[2])  # (patches, filters of bank j)
        expect = m.t() @ p
        got_w = sums
        if isinstance(layer, GatedConv2d):
            got_w = layer.conv_weight(sums)
        got = got_w.reshape(len(banks), -1, p.shape[1])[j]
        assert_close(got, expect)
        assert_close(sq[:, j, 0, :].reshape(-1), p.square().sum(dim=1))
        assert_close(patch_sums(x, layer)[:, j, 0, :].reshape(-1), p.sum(dim=1))
