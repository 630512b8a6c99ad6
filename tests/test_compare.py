"""compare_inits: the fair protocol (own best rate per init, extension past an end, fresh measuring
seeds) on a model and training loop of the caller's own."""
import json
import math

import pytest
import torch
import torch.nn as nn
from scipy import stats as sps

from kmeansinit import initialize_
from kmeansinit.compare import Comparison, compare_inits


def _build(seed):
    torch.manual_seed(1000 + seed)  # the net's own init: overwritten by compare_inits
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


IMAGES = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _peaked(peak):
    """A fit whose score peaks at the rate ``peak`` (log scale): the protocol is tested without
    training. ``fit.calls`` records each (lr, seed) it was asked for."""
    calls = []

    def fit(model, lr, seed):
        calls.append((lr, seed))
        return 1.0 - (math.log2(lr) - math.log2(peak)) ** 2 / 10

    fit.calls = calls
    return fit


def _run(peaks, lrs, **kw):
    """compare_inits over data-free inits, one at a time, each scored by a fit peaking at its own rate."""
    out = {}
    for label, peak in peaks.items():
        fit = _peaked(peak)
        out[label] = (compare_inits(_build, fit, inits=[label], lrs=lrs, log=None, **kw), fit.calls)
    return out


def test_each_init_gets_its_own_best_rate_and_the_sweep_extends_past_an_end():
    res = _run({"he": 0.02, "xavier": 0.08, "normal": 0.0025}, [0.01, 0.02, 0.04], seeds=2, extend=2)
    he, calls = res["he"]
    assert he.best_lr["he"] == pytest.approx(0.02) and not he.at_edge["he"]
    assert sorted(he.sweep("he")) == pytest.approx([0.01, 0.02, 0.04])  # inside: no extension
    assert [s for _, s in calls] == [0, 0, 0, 1, 2]  # the sweep on seed 0, then seeds 1..2 measure
    xa, _ = res["xavier"]
    assert sorted(xa.sweep("xavier")) == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])  # up once, then inside
    assert xa.best_lr["xavier"] == pytest.approx(0.08) and not xa.at_edge["xavier"]
    no, _ = res["normal"]  # the peak lies 2 steps below: both extensions used, the best still at an end
    assert sorted(no.sweep("normal")) == pytest.approx([0.0025, 0.005, 0.01, 0.02, 0.04])
    assert no.best_lr["normal"] == pytest.approx(0.0025) and no.at_edge["normal"]
    assert "(at an end)" in no.table()


def test_one_rate_skips_the_sweep():
    (cmp_, calls), = _run({"he": 0.5}, [0.1], seeds=3).values()
    assert cmp_.best_lr == {"he": 0.1} and not cmp_.at_edge["he"]
    assert calls == [(0.1, 0), (0.1, 1), (0.1, 2), (0.1, 3)]


def test_fit_gets_the_init_of_initialize_with_the_seed_and_options():
    seen = []

    def fit(model, lr, seed):
        seen.append((seed, [p.detach().clone() for p in model.parameters()]))
        return 0.5

    inits = {"he": {}, "kv1": {"init": "kmeans-variance", "zca_eps": 1.0, "steps": 3}}
    compare_inits(_build, fit, IMAGES, inits=inits, lrs=[0.1], seeds=1, log=None)
    for (seed, params), (method, opts) in zip(seen, [("he", {})] * 2 + [("kmeans-variance", dict(zca_eps=1.0, steps=3))] * 2):
        ref = _build(seed)
        # The seed as a training run passes it: He's generator, the k-means init's seed.
        seeding = dict(generator=torch.Generator().manual_seed(seed)) if method == "he" else dict(seed=seed)
        initialize_(ref, method, IMAGES, **opts, **seeding)
        for a, b in zip(params, ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [s for s, _ in seen] == [0, 1, 0, 1]
    # Different seeds give different weights: the seed reaches the init.
    assert not torch.equal(seen[0][1][0], seen[1][1][0]) and not torch.equal(seen[2][1][0], seen[3][1][0])


def test_the_file_keeps_every_run_and_a_second_call_resumes_from_it(tmp_path):
    path = tmp_path / "cmp.json"
    fit = _peaked(0.02)
    first = compare_inits(_build, fit, inits=["he"], lrs=[0.01, 0.02, 0.04], seeds=2, path=path, log=None)
    assert len(json.loads(path.read_text())["runs"]) == 5

    def must_not_run(model, lr, seed):
        raise AssertionError("a finished run was run again")

    again = compare_inits(_build, must_not_run, inits=["he"], lrs=[0.01, 0.02, 0.04], seeds=2, path=path, log=None)
    assert again.best_lr == first.best_lr and again.scores == first.scores
    # One run lost (as if killed during it): only that one runs again.
    data = json.loads(path.read_text())
    data["runs"] = data["runs"][:-1]
    path.write_text(json.dumps(data))
    fit2 = _peaked(0.02)
    third = compare_inits(_build, fit2, inits=["he"], lrs=[0.01, 0.02, 0.04], seeds=2, path=path, log=None)
    assert fit2.calls == [(0.02, 2)] and third.scores == first.scores


def test_a_failing_fit_keeps_the_runs_before_it(tmp_path):
    path = tmp_path / "cmp.json"

    def fit(model, lr, seed):
        if lr > 0.015:
            raise RuntimeError("out of memory")
        return lr

    with pytest.raises(RuntimeError, match="out of memory"):
        compare_inits(_build, fit, inits=["he"], lrs=[0.01, 0.02], path=path, log=None)
    assert [r["lr"] for r in json.loads(path.read_text())["runs"]] == [0.01]


def test_a_file_of_other_options_for_the_same_label_is_refused(tmp_path):
    path = tmp_path / "cmp.json"
    compare_inits(_build, lambda m, lr, s: 0.5, IMAGES, inits={"kv": {"init": "kmeans-variance", "steps": 2}},
                  lrs=[0.1], seeds=1, path=path, log=None)
    with pytest.raises(ValueError, match=r"cmp.json: holds init 'kv'"):
        compare_inits(_build, lambda m, lr, s: 0.5, IMAGES, inits={"kv": {"init": "kmeans-variance", "steps": 3}},
                      lrs=[0.1], seeds=1, path=path, log=None)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cmp.json: not a comparison file"):
        compare_inits(_build, lambda m, lr, s: 0.5, inits=["he"], lrs=[0.1], path=path, log=None)
    path.write_text(json.dumps({"inits": {"he": {"init": "he"}}, "runs": [{"init": "he", "lr": 0.1}]}))
    with pytest.raises(ValueError, match="cmp.json: run .* is not a comparison run"):
        compare_inits(_build, lambda m, lr, s: 0.5, inits=["he"], lrs=[0.1], path=path, log=None)


def test_options_a_file_cannot_keep_are_refused_before_any_run_and_the_folder_is_made(tmp_path):
    def fit(model, lr, seed):
        raise AssertionError("ran")

    with pytest.raises(ValueError, match="options must be JSON values"):
        compare_inits(_build, fit, IMAGES, inits={"l": {"init": "lsuv", "generator": torch.Generator()}},
                      lrs=[0.1], path=tmp_path / "c.json", log=None)
    res = compare_inits(_build, lambda m, lr, s: 0.5, inits=["he"], lrs=[0.1], seeds=1,
                        path=tmp_path / "new" / "c.json", log=None)
    assert (tmp_path / "new" / "c.json").exists() and res.scores == {"he": [0.5]}


def test_a_diverged_run_ranks_last_and_is_counted_not_averaged():
    def fit(model, lr, seed):
        if lr >= 0.04 or (seed == 2 and lr == 0.02):
            return float("nan")
        return lr * 10 + seed / 100

    res = compare_inits(_build, fit, inits=["he"], lrs=[0.01, 0.02, 0.04], seeds=3, log=None)
    assert res.best_lr["he"] == pytest.approx(0.02)  # 0.04 diverged: the best finite rate wins
    assert math.isnan(res.scores["he"][1])
    row = [line for line in res.table().splitlines() if line.startswith("| he ")][0]
    assert "2 (+1 diverged)" in row and "0.22" in row  # mean of seeds 1 and 3: 0.21, 0.23
    # A diverged run first in the sweep (NaN compares false with everything) still ranks last.
    first = compare_inits(_build, lambda m, lr, s: {0.01: float("nan"), 0.02: 0.3, 0.04: 0.2}[lr],
                          inits=["he"], lrs=[0.01, 0.02, 0.04], seeds=1, log=None)
    assert first.best_lr["he"] == pytest.approx(0.02)


def test_table_compares_with_the_best_baseline_by_welch():
    res = Comparison(inits={"he": {"init": "he"}, "lsuv": {"init": "lsuv"}, "kv": {"init": "kmeans-variance"}},
                     best_lr={"he": 0.1, "lsuv": 0.1, "kv": 0.2}, at_edge={},
                     scores={"he": [0.60, 0.62, 0.61], "lsuv": [0.63, 0.65, 0.60], "kv": [0.66, 0.69, 0.67]})
    lines = res.table().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["kv", "lsuv", "he"]
    p = sps.ttest_ind([0.66, 0.69, 0.67], [0.63, 0.65, 0.60], equal_var=False).pvalue
    assert f"+{0.6733333 - 0.6266667:.4g} (p = {p:.3f})" in lines[2]
    assert "best baseline" in lines[3]


@pytest.mark.parametrize("kw, match", [
    (dict(inits=["he", "kmeans-varianse"]), "unknown init method 'kmeans-varianse'"),
    (dict(inits={"kv": {"init": "kmeans-variance", "zca_epz": 1.0}}), r"inits\['kv'\].*zca_epz"),
    (dict(inits=["he", "he"]), "listed twice"),
    (dict(inits=[]), "inits is empty"),
    (dict(inits="he"), "inits must be"),
    (dict(lrs=[0.1, 0.05]), "ascending"),
    (dict(lrs=[0.0, 0.1]), "positive"),
    (dict(lrs=[]), "lrs is empty"),
    (dict(seeds=0), "seeds must be a positive integer"),
    (dict(extend=-1), "extend must be"),
    (dict(images=None, inits=["he", "lsuv"]), "lsuv need images"),
])
def test_bad_arguments_are_named_before_any_run(kw, match):
    def fit(model, lr, seed):
        raise AssertionError("ran")

    args = dict(images=IMAGES, inits=["he"], lrs=[0.1], log=None)
    args.update(kw)
    images = args.pop("images")
    with pytest.raises(ValueError, match=match):
        compare_inits(_build, fit, images, **args)


@pytest.mark.parametrize("bad", ["0.5", True, None, torch.ones(2)])
def test_a_fit_that_returns_no_number_is_named(bad):
    with pytest.raises(TypeError, match=r"fit\(model, lr=0.1, seed=0\) for init 'he' returned"):
        compare_inits(_build, lambda m, lr, s: bad, inits=["he"], lrs=[0.1], log=None)


def test_build_must_return_a_module():
    with pytest.raises(TypeError, match=r"build\(0\) returned dict"):
        compare_inits(lambda s: {}, lambda m, lr, s: 0.5, inits=["he"], lrs=[0.1], log=None)


def test_progress_names_each_run():
    lines = []
    compare_inits(_build, lambda m, lr, s: torch.tensor(0.25), inits=["he"], lrs=[0.1], seeds=1, log=lines.append)
    assert lines[0].startswith("run 1 of about 2: he lr 0.1 seed 0: score 0.25")
    assert len(lines) == 2


def test_the_sweep_initializes_each_seed_once_and_every_run_starts_from_that_init(monkeypatch):
    import kmeansinit.compare as cmp_mod

    calls = []
    real = cmp_mod.initialize_

    def counting(model, method, images=None, **options):
        calls.append((method, options.get("seed")))
        return real(model, method, images, **options)

    monkeypatch.setattr(cmp_mod, "initialize_", counting)
    seen = []

    def fit(model, lr, seed):
        seen.append((lr, seed, [t.clone() for t in model.state_dict().values()]))
        with torch.no_grad():  # training changes the model: the next rate must not see that
            for p in model.parameters():
                p.add_(1.0)
        return -abs(lr - 0.02)

    compare_inits(_build, fit, IMAGES, inits={"kv": {"init": "kmeans-variance", "steps": 2}},
                  lrs=[0.01, 0.02, 0.04], seeds=1, log=None)
    assert calls == [("kmeans-variance", 0), ("kmeans-variance", 1)]
    ref = _build(0)
    initialize_(ref, "kmeans-variance", IMAGES, steps=2, seed=0)
    for lr, seed, state in seen[:3]:
        assert seed == 0
        for a, b in zip(state, ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_file_keeps_the_runs_of_other_inits_it_already_held(tmp_path):
    path = tmp_path / "cmp.json"
    compare_inits(_build, lambda m, lr, s: 0.5, inits=["he"], lrs=[0.1], seeds=1, path=path, log=None)
    compare_inits(_build, lambda m, lr, s: 0.25, inits=["xavier"], lrs=[0.1], seeds=1, path=path, log=None)
    data = json.loads(path.read_text())
    assert set(data["inits"]) == {"he", "xavier"}
    assert [(r["init"], r["seed"], r["score"]) for r in data["runs"]] == [
        ("he", 0, 0.5), ("he", 1, 0.5), ("xavier", 0, 0.25), ("xavier", 1, 0.25)]
