"""One Lloyd step of the k-means init against an independent reference: patches by unfold (or a plain
loop), float64, assignments and cluster sums written out, ZCA statistics from their definition.

The library computes all of this in convolution form (responses by one conv, cluster sums by a conv
weight-gradient, ZCA terms folded into them); the reference shares none of that code.
"""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kmeansinit import GatedConv2d
from kmeansinit.init._model import Taps
from kmeansinit.init.lloyd import lloyd
from kmeansinit.init.targets import _LayerInputs, _target
from kmeansinit.init.whiten import RawSpace, ZCASpace


def ref_patches(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(groups, rows, patch dim) in float64: every patch of every group, by unfold or a plain loop."""
    x = x.double()
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    g = layer.groups
    if isinstance(layer, nn.Conv3d):  # no unfold in 3-D: a plain loop over output positions
        (kd, kh, kw), (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        xp = F.pad(x, (pw, pw, ph, ph, pd, pd))
        rows = []
        for n in range(xp.shape[0]):
            for a in range(0, xp.shape[2] - dd * (kd - 1), sd):
                for b in range(0, xp.shape[3] - dh * (kh - 1), sh):
                    for c in range(0, xp.shape[4] - dw * (kw - 1), sw):
                        rows.append(xp[n, :, a:a + dd * (kd - 1) + 1:dd, b:b + dh * (kh - 1) + 1:dh, c:c + dw * (kw - 1) + 1:dw])
        p = torch.stack(rows)  # (R, C, kd, kh, kw)
        return torch.stack([p[:, i * (x.shape[1] // g):(i + 1) * (x.shape[1] // g)].reshape(p.shape[0], -1) for i in range(g)])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        ks, st, pad, dil = (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        ks, st, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    cg = x.shape[1] // g
    out = []
    for i in range(g):
        u = F.unfold(x[:, i * cg:(i + 1) * cg], ks, dilation=dil, padding=pad, stride=st)  # (N, D, L)
        out.append(u.transpose(1, 2).reshape(-1, u.shape[1]))
    return torch.stack(out)


def filter_groups(layer: nn.Module) -> torch.Tensor:
    """Group of each filter (weight row), from the layer's definition (not from the library's perm)."""
    k = layer.weight.shape[0]
    if isinstance(layer, nn.Linear):
        return torch.zeros(k, dtype=torch.long)
    if isinstance(layer, GatedConv2d):  # rows (gate, value1, value2) of output channel j, which sees group j // (out / groups)
        out = layer.out_channels
        return (torch.arange(k) % out) // (out // layer.groups)
    return torch.arange(k) // (k // layer.groups)


def ref_zca(p: torch.Tensor, eps_norm=1e-2, eps_zca=1e-2):
    """Coates & Ng: per-patch mean/contrast normalization, then ZCA; returns (z, W, m)."""
    q = p - p.mean(dim=1, keepdim=True)
    q = q / torch.sqrt(q.var(dim=1, unbiased=False, keepdim=True) + eps_norm)
    m = q.mean(0)
    cov = (q - m).t() @ (q - m) / q.shape[0]
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(0)
    W = vecs @ torch.diag((vals + eps_zca * vals.mean()).rsqrt()) @ vecs.t()
    return (q - m) @ W, W, m


def ref_step(z: torch.Tensor, c: torch.Tensor, pairs: bool) -> torch.Tensor:
    """One spherical k-means step: assign each row to its best centroid, sum, normalize."""
    best = (z @ c.t()).argmax(dim=1)
    sums = torch.zeros_like(c).index_add_(0, best, z)
    if pairs:  # filter k + K/2 is -filter k: one cluster of both signs
        h = c.shape[0] // 2
        sums = torch.cat([sums[:h] - sums[h:], sums[h:] - sums[:h]])
    return F.normalize(sums, dim=1)


LAYERS = {
    "conv": lambda: nn.Conv2d(3, 6, 3, padding=1),
    "strided-dilated": lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2),
    "grouped": lambda: nn.Conv2d(4, 8, 3, groups=2),  # 4 filters a group: pairs fit
    "gated-grouped": lambda: GatedConv2d(4, 4, 3, groups=2, padding=1),
    "conv1d": lambda: nn.Conv1d(3, 4, 3, padding=1),
    "conv3d": lambda: nn.Conv3d(2, 4, 2),
    "linear": lambda: nn.Linear(12, 6),
}
SHAPES = {"conv1d": (24, 3, 16), "conv3d": (6, 2, 4, 4, 4), "linear": (40, 12),
          "grouped": (12, 4, 8, 8), "gated-grouped": (12, 4, 8, 8)}
ZCA_OK = ("conv", "strided-dilated", "linear")  # ZCA is defined for ungrouped Conv2d and Linear


CASES = [(n, sp, pr) for n, sp, pr in itertools.product(LAYERS, ("raw", "zca"), (False, True))
         if sp == "raw" or n in ZCA_OK]


@pytest.mark.parametrize("name,space,pairs", CASES, ids=lambda v: str(v))
def test_one_lloyd_step_matches_the_reference(name, space, pairs):
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    x = torch.randn(*SHAPES.get(name, (12, 3, 8, 8)), dtype=torch.float64)
    model = nn.Sequential(layer)
    t = _target("0", layer)
    groups = filter_groups(layer)
    P = ref_patches(x, layer)  # (G, R, D)
    k, D = layer.weight.shape[0], P.shape[-1]
    # First centroids: actual (whitened) patches, so that no cluster starts empty; pairs: c, -c.
    gen = torch.Generator().manual_seed(1)
    zs, Ws, ms, c0 = [], [], [], torch.zeros(k, D, dtype=torch.float64)
    for gi in range(P.shape[0]):
        z, W, m = ref_zca(P[gi]) if space == "zca" else (P[gi], None, None)
        zs.append(z)
        Ws.append(W)
        ms.append(m)
        rows = (groups == gi).nonzero().flatten()
        n = len(rows) // 2 if pairs else len(rows)
        pick = F.normalize(z[torch.randperm(z.shape[0], generator=gen)[:n]], dim=1)
        c0[rows] = torch.cat([pick, -pick]) if pairs else pick
    with Taps(model, {"0": layer}, outputs=True) as taps, torch.no_grad():
        inputs = _LayerInputs(taps, x, "0", batch_size=5, cache_bytes=2**30)
        sp = ZCASpace(layer, inputs, max_patches=None) if space == "zca" else RawSpace(layer)
        w, done = lloyd(t, inputs, sp, 1, torch.Generator().manual_seed(0), pairs=pairs,
                         start=c0.reshape(layer.weight.shape))
    assert done == 1
    expect = torch.zeros(k, D, dtype=torch.float64)
    for gi in range(P.shape[0]):
        rows = (groups == gi).nonzero().flatten()
        c1 = ref_step(zs[gi], c0[rows], pairs)
        if space == "zca":  # the raw filter P W c: ranks raw patches as c ranks whitened ones
            c1 = c1 @ Ws[gi]
            c1 = c1 - c1.mean(dim=1, keepdim=True)
        expect[rows] = F.normalize(c1, dim=1)
    torch.testing.assert_close(w.reshape(k, -1), expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,pairs", [(n, pr) for n in ZCA_OK for pr in (False, True)], ids=lambda v: str(v))
def test_one_lloyd_step_on_kept_rows_matches_the_reference(name, pairs):
    """lloyd_rows (matrix form, on the rows a ZCASpace keeps; here every patch): the same step."""
    from kmeansinit.init.lloyd import lloyd_rows

    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    x = torch.randn(*SHAPES.get(name, (12, 3, 8, 8)), dtype=torch.float64)
    P = ref_patches(x, layer)[0]
    k = layer.weight.shape[0]
    z, W, _ = ref_zca(P)
    gen = torch.Generator().manual_seed(1)
    pick = F.normalize(z[torch.randperm(z.shape[0], generator=gen)[:k // 2 if pairs else k]], dim=1)
    c0 = torch.cat([pick, -pick]) if pairs else pick
    with Taps(nn.Sequential(layer), {"0": layer}, outputs=True) as taps, torch.no_grad():
        inputs = _LayerInputs(taps, x, "0", batch_size=5, cache_bytes=2**30)
        sp = ZCASpace(layer, inputs, max_patches=None, keep_rows=10**6)
        assert sp.rows.shape[0] == P.shape[0]  # every patch kept
        w, done = lloyd_rows(_target("0", layer), sp, 1, torch.Generator().manual_seed(0), pairs=pairs,
                             start=c0.reshape(layer.weight.shape))
    assert done == 1
    c1 = ref_step(z, c0, pairs) @ W
    expect = F.normalize(c1 - c1.mean(dim=1, keepdim=True), dim=1)
    torch.testing.assert_close(w.reshape(k, -1), expect, rtol=1e-9, atol=1e-9)


def test_reference_catches_a_wrong_assignment():
    """The reference must be able to fail: one step from centroids that differ changes the result."""
    torch.manual_seed(0)
    z = torch.randn(200, 5, dtype=torch.float64)
    c = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    assert not torch.allclose(ref_step(z, c, False), ref_step(z, c.roll(1, dims=1), False))


@pytest.mark.parametrize("pairs", [False, True])
def test_one_online_pass_matches_the_reference(pairs):
    """The streaming solver (lloyd_online): chunk by chunk, assign with the centroids of the running
    sums so far, then the pass's new centroids from all its sums. Written out on unfold patches."""
    from kmeansinit.init.lloyd import lloyd_online

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 6, 3, padding=1).double()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    t = _target("0", layer)
    k = layer.weight.shape[0]
    gen = torch.Generator().manual_seed(1)
    P = ref_patches(x, layer)[0]  # (R, D), image-major: each 5-image chunk is a block of rows
    pick = F.normalize(P[torch.randperm(P.shape[0], generator=gen)[:k // 2 if pairs else k]], dim=1)
    c0 = torch.cat([pick, -pick]) if pairs else pick
    with Taps(nn.Sequential(layer), {"0": layer}, outputs=True) as taps, torch.no_grad():
        inputs = _LayerInputs(taps, x, "0", batch_size=5, cache_bytes=0)  # recomputed: the streaming case
        w, done = lloyd_online(t, inputs, RawSpace(layer), 1, torch.Generator().manual_seed(0), pairs=pairs,
                               start=c0.reshape(layer.weight.shape))
    assert done == 1
    per_image = P.shape[0] // x.shape[0]
    sums, moving = torch.zeros_like(c0), c0.clone()
    for lo in range(0, x.shape[0], 5):
        z = P[lo * per_image:min(lo + 5, x.shape[0]) * per_image]
        best = (z @ moving.t()).argmax(dim=1)
        sums.index_add_(0, best, z)
        run = torch.cat([sums[:k // 2] - sums[k // 2:], sums[k // 2:] - sums[:k // 2]]) if pairs else sums
        moving = torch.where(run.norm(dim=1, keepdim=True) > 1e-8, F.normalize(run, dim=1), moving)
    expect = F.normalize(torch.cat([sums[:k // 2] - sums[k // 2:], sums[k // 2:] - sums[:k // 2]]) if pairs else sums, dim=1)
    torch.testing.assert_close(w.reshape(k, -1), expect, rtol=1e-9, atol=1e-9)
    # Not the batch step: assignments that follow the running sums differ from the batch's.
    batch = F.normalize(torch.zeros_like(c0).index_add_(0, (P @ c0.t()).argmax(dim=1), P), dim=1)
    if pairs:
        batch = F.normalize(torch.cat([batch[:k // 2] - batch[k // 2:], batch[k // 2:] - batch[:k // 2]]), dim=1)
    assert not torch.allclose(batch, expect)


def test_kept_rows_lloyd_in_float32_is_close_to_float64():
    """lloyd_rows runs in the rows' precision: a float32 layer's filters match the float64 run's."""
    from kmeansinit.init.lloyd import lloyd_rows

    torch.manual_seed(0)
    x = torch.randn(16, 8, 10, 10, dtype=torch.float64)
    out = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(1)
        layer = nn.Conv2d(8, 16, 3, padding=1, bias=False).to(dtype)
        with Taps(nn.Sequential(layer), {"0": layer}, outputs=True) as taps, torch.no_grad():
            inputs = _LayerInputs(taps, x.to(dtype), "0", batch_size=8, cache_bytes=2**30)
            sp = ZCASpace(layer, inputs, max_patches=None, keep_rows=10**6)
            w, done = lloyd_rows(_target("0", layer), sp, 4, torch.Generator().manual_seed(0), pairs=True)
        assert w.dtype == dtype and done >= 1
        out[dtype] = w.double()
    torch.testing.assert_close(out[torch.float32], out[torch.float64], rtol=1e-4, atol=1e-4)


def test_kept_rows_lloyd_reseeds_an_empty_cluster_and_keeps_pairs():
    """Two identical starting centroids: argmax gives every patch to the first, the second is empty
    and is re-seeded from a patch (not left zero), and each filter's partner stays its negative."""
    from kmeansinit.init.lloyd import _partners, lloyd_rows

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    with Taps(nn.Sequential(layer), {"0": layer}, outputs=True) as taps, torch.no_grad():
        inputs = _LayerInputs(taps, x, "0", batch_size=3, cache_bytes=2**30)
        sp = ZCASpace(layer, inputs, max_patches=None, keep_rows=10**6)
        t = _target("0", layer)
        z = (sp.rows - sp.m) @ sp.W.t()
        first = F.normalize(z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(2))[:4]], dim=1)
        first[1] = first[0]  # filter 1 duplicates filter 0
        start = torch.cat([first, -first])
        w, done = lloyd_rows(t, sp, 1, torch.Generator().manual_seed(0), pairs=True, start=start.reshape(layer.weight.shape))
    w = w.flatten(1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert (w[0] - w[1]).norm() > 1e-3  # filter 1 re-seeded apart from filter 0
    torch.testing.assert_close(w[_partners(t)], -w)
