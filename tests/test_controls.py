"""The direction-vs-norm controls (kmeansinit.init.controls)."""
import math

import pytest
import torch
import torch.nn as nn

from kmeansinit.init import fans, initialize_
from kmeansinit.models import create_model

FAST = dict(progress=False, steps=1, stat_patches=2048)


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def test_he_kmeans_norm_has_the_presets_norms_and_he_directions():
    torch.manual_seed(0)
    a, b = create_model("resnet20"), create_model("resnet20")
    initialize_(a, "he", generator=_gen())
    initialize_(b, "he-kmeans-norm", generator=_gen())
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, nn.Conv2d):
            fi, fo = fans(ma)
            norms = mb.weight.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(2 * fi / (fi + fo))))
            cos = torch.nn.functional.cosine_similarity(ma.weight.flatten(1), mb.weight.flatten(1), dim=1)
            torch.testing.assert_close(cos, torch.ones_like(cos))
        elif isinstance(ma, nn.Linear):
            torch.testing.assert_close(ma.weight, mb.weight)  # linear layers keep He, as under the preset


def test_he_variance_norm_has_the_presets_norms_and_he_directions():
    name = "paper"
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kv, ctrl, he = (create_model(name, width=0.25) for _ in range(3))
    rep_kv = initialize_(kv, "kmeans-variance", images, seed=5, **FAST)
    rep = initialize_(ctrl, "he-variance-norm", images, generator=_gen(), seed=5, **FAST)
    initialize_(he, "he", generator=_gen())
    assert rep.method == "he-variance-norm" and rep.skipped == rep_kv.skipped
    set_by_kv = {r.name for r in rep_kv.layers}
    assert set_by_kv
    named_kv, named_he = dict(kv.named_modules()), dict(he.named_modules())
    for n, m in ctrl.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w, w_he = m.weight.detach().flatten(1), named_he[n].weight.detach().flatten(1)
        assert torch.isfinite(w).all()
        cos = torch.nn.functional.cosine_similarity(w, w_he, dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos))  # He's directions everywhere
        if n in set_by_kv:
            # kmeans-variance's norm for every filter (one per layer: it calibrates whole layers) ...
            torch.testing.assert_close(w.norm(dim=1), named_kv[n].weight.detach().flatten(1).norm(dim=1))
            # ... which is not He's: the control moved it.
            assert not torch.allclose(w.norm(dim=1), w_he.norm(dim=1), rtol=0.05)
        else:
            torch.testing.assert_close(w, w_he)  # layers the preset leaves alone keep He, as under it


def test_he_variance_norm_is_reproducible_and_needs_images():
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a, b = create_model("paper", width=0.25), create_model("paper", width=0.25)
    initialize_(a, "he-variance-norm", images, generator=_gen(), seed=1, **FAST)
    initialize_(b, "he-variance-norm", images, generator=_gen(), seed=1, **FAST)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="he-variance-norm.*needs images"):
        initialize_(create_model("paper", width=0.25), "he-variance-norm")
