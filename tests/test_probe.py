"""The linear probe (kmeansinit.probe) and Coates et al.'s single-layer net (kmeansinit.models.coates)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kmeansinit import initialize_
from kmeansinit.cli import main
from kmeansinit.models import PaperNet, SingleLayerNet, count_parameters, create_model
from kmeansinit.probe import ProbeConfig, calibrate_bn_, extract_features, fit_linear_probe, probe, probe_objective


def test_single_layer_net_is_coates_et_al_s_encoder():
    net = create_model("coates")
    conv = net.features[0]
    assert isinstance(net, SingleLayerNet) and (conv.out_channels, conv.kernel_size, conv.stride) == (1600, (6, 6), (1, 1))
    assert net.classifier.in_features == 4 * 1600  # four quadrants of 1,600 features each
    # 3*6*6 weights a filter (no bias under BN), 2 BN parameters a filter, 6,400 x 10 + 10 for the classifier.
    assert count_parameters(net) == 1600 * 108 + 2 * 1600 + 6400 * 10 + 10
    assert net.features(torch.randn(2, 3, 32, 32)).shape == (2, 6400)
    small = create_model("coates", width=0.05, batch_norm=False)
    assert small.features[0].out_channels == 80 and small.features[0].bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    with pytest.raises(ValueError, match="filters"):
        SingleLayerNet(filters=0)


def test_kmeans_init_clusters_the_single_layer_net():
    torch.manual_seed(0)
    net = create_model("coates", width=0.05)
    report = initialize_(net, "kmeans", torch.rand(16, 3, 32, 32) * 2 - 1, seed=0)
    assert [r.name for r in report.layers] == ["features.0"] and not report.skipped
    assert torch.isfinite(net.features[0].weight).all()


def test_patch_norm_conv_is_a_conv_of_contrast_normalized_patches():
    from kmeansinit.models.coates import PatchNormConv2d

    torch.manual_seed(0)
    layer = PatchNormConv2d(3, 5, 3, padding=1, eps=0.05).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.double) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.double).view(1, 3, 1, 1)
    # Independently: every patch (zero padding included) unfolded, normalized, then the filters.
    p = F.unfold(x, 3, padding=1)  # (N, 27, positions)
    p = (p - p.mean(1, keepdim=True)) / torch.sqrt(p.var(1, unbiased=False, keepdim=True) + 0.05)
    expect = torch.einsum("od,ndl->nol", layer.weight.flatten(1), p) + layer.bias.view(1, -1, 1)
    torch.testing.assert_close(layer(x), expect.reshape(2, 5, 6, 6))
    # A patch's brightness and (up to eps) its contrast do not change the output.
    sharp = PatchNormConv2d(3, 5, 3, eps=1e-12).double()
    torch.testing.assert_close(sharp(4 * x + 7), sharp(x))
    with pytest.raises(ValueError, match="groups must be 1"):
        PatchNormConv2d(4, 4, 3, groups=2)


def test_patch_norm_coates_net_encodes_with_the_k_means_centroids_themselves():
    """Under ``patch_norm`` the single layer computes, for a k-means filter, the centroid's response
    to the contrast-normalized, whitened patch the init clustered, up to a per-filter constant (which
    BN removes); a plain conv's response is that times each patch's contrast."""
    from kmeansinit.init.whiten import ZCASpace, unfold_patches
    from kmeansinit.models.coates import PatchNormConv2d

    torch.manual_seed(0)
    net = create_model("coates", width=0.005, patch_norm=True).double()  # 8 filters
    conv = net.features[0]
    assert isinstance(conv, PatchNormConv2d) and net.patch_norm and conv.eps == 1e-2
    x = torch.randn(4, 3, 9, 9, dtype=torch.double) * torch.linspace(0.2, 3, 4, dtype=torch.double).view(4, 1, 1, 1)
    space = ZCASpace(conv, [x[:2], x[2:]])
    assert space.eps_norm == conv.eps
    c = torch.randn(8, 3, 6, 6, dtype=torch.double)
    with torch.no_grad():
        conv.weight.copy_(space.to_raw(c))
        out = conv(x).flatten(2)  # (N, 8, positions)
    z = space.whiten(unfold_patches(x, conv))  # rows: (N x positions) whitened patches
    expect = (z @ c.flatten(1).t()).reshape(4, -1, 8).transpose(1, 2) + space.offset(c).view(1, 8, 1)
    torch.testing.assert_close(out, expect)
    with pytest.raises(ValueError, match="patch_norm=True is offered for 'coates' only"):
        create_model("paper", patch_norm=True)


def test_patch_whitening_outputs_each_patch_whitened_as_the_init_whitens_it():
    """Each output position's channels are ZCASpace.whiten of that patch (zca_eps 0.1); on the
    patches it was fitted to, their covariance is (C + eps I)^-1 C: identity up to the regularizer."""
    from kmeansinit.init.whiten import ZCASpace, unfold_patches
    from kmeansinit.models.coates import PatchWhitening

    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8, dtype=torch.double) * torch.linspace(0.3, 2, 6, dtype=torch.double).view(6, 1, 1, 1)
    white = PatchWhitening(3, 3, zca_eps=0.1).double()
    with pytest.raises(RuntimeError, match="PatchWhitening is not fitted"):
        white(x)
    assert white.fit_(x, batch_size=4) is white and bool(white.fitted)
    z = white(x)  # (N, 27, 6, 6)
    assert z.shape == (6, 27, 6, 6)
    geometry = nn.Conv2d(3, 1, 3)
    space = ZCASpace(geometry, [x], eps_norm=1e-2, eps_zca=0.1)
    expect = space.whiten(unfold_patches(x, geometry)).reshape(6, 6, 6, 27).permute(0, 3, 1, 2)
    torch.testing.assert_close(z, expect)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 27)
    torch.testing.assert_close(rows.mean(0), torch.zeros(27, dtype=torch.double), atol=1e-10, rtol=0)
    p = unfold_patches(x, geometry).double()
    p = (p - p.mean(1, keepdim=True)) / torch.sqrt(p.var(1, unbiased=False, keepdim=True) + 1e-2)
    cov = torch.cov(p.t(), correction=0)
    evals, evecs = torch.linalg.eigh(cov)
    shrink = evecs @ torch.diag(evals / (evals.clamp_min(0) + 0.1 * evals.clamp_min(0).mean())) @ evecs.t()
    torch.testing.assert_close(torch.cov(rows.t(), correction=0), shrink, atol=1e-8, rtol=1e-6)
    # Buffers, not parameters: no init or optimizer sees them, and a state dict carries the fit.
    assert not list(white.parameters()) and not list(white.children())
    again = PatchWhitening(3, 3, zca_eps=0.1).double()
    again.load_state_dict(white.state_dict())
    torch.testing.assert_close(again(x), z)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\), got \(6, 1, 8, 8\)"):
        white.fit_(x[:, :1])


def test_triangle_code_is_the_mean_distance_minus_each_distance_to_the_unit_centroids():
    from kmeansinit.models.coates import TriangleConv2d

    torch.manual_seed(0)
    layer = TriangleConv2d(5, 7).double()
    z = torch.randn(2, 5, 3, 4, dtype=torch.double) * 3
    c = layer.weight.flatten(1) / layer.weight.flatten(1).norm(dim=1, keepdim=True)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 5)
    d = torch.cdist(rows, c)  # (positions, 7)
    expect = (d.mean(1, keepdim=True) - d).clamp_min(0).reshape(2, 3, 4, 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(z), expect)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 8, dtype=torch.double).view(7, 1, 1, 1))
    torch.testing.assert_close(layer(z), expect)  # only the directions count
    with torch.no_grad():  # the in-place path of a frozen encoder
        torch.testing.assert_close(layer(z), expect)
    layer.requires_grad_(False)
    torch.testing.assert_close(layer(z), expect)
    layer.requires_grad_(True)
    # Float32 at least under bf16 autocast, gradients finite.
    z32 = z.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.float()(z32)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(z32.grad).all()


def test_coates_triangle_net_fits_its_whitening_then_clusters_the_whitened_patches():
    from kmeansinit.models import fit_whitening_
    from kmeansinit.models.coates import PatchWhitening, TriangleConv2d

    torch.manual_seed(0)
    net = create_model("coates-triangle", width=0.005)  # 8 centroids
    white, tri = net.features[0], net.features[1]
    assert isinstance(white, PatchWhitening) and isinstance(tri, TriangleConv2d) and net.encoder == "triangle"
    assert (white.out_channels, tri.in_channels, tri.out_channels, net.classifier.in_features) == (108, 108, 8, 32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()) and not net.batch_norm
    x = torch.rand(12, 3, 32, 32) * 2 - 1
    assert fit_whitening_(net, x) == 1
    report = initialize_(net, "kmeans-layerwise", x, seed=0, progress=False)
    assert [r.name for r in report.layers] == ["features.1"]  # the whitening is no init's layer
    torch.testing.assert_close(white.weight, PatchWhitening(3, 6).fit_(x).weight)  # left as fitted
    # Spherical k-means on the whitened patches: a patch's best response among the centroids is
    # higher, on average, than among as many random unit directions.
    z = white(x).permute(0, 2, 3, 1).reshape(-1, 108)
    c = tri.weight.flatten(1)
    c = c / c.norm(dim=1, keepdim=True)
    assert (z @ c.t()).max(1).values.mean() > (z @ F.normalize(torch.randn(8, 108), dim=1).t()).max(1).values.mean()
    out = net.features(x)
    assert out.shape == (12, 32) and torch.isfinite(out).all() and (out >= 0).all()
    with pytest.raises(ValueError, match="coates-triangle has no BN layers"):
        create_model("coates-triangle", batch_norm=False)
    with pytest.raises(ValueError, match="encoder must be 'relu' or 'triangle'"):
        SingleLayerNet(encoder="soft")


def test_probe_of_the_triangle_net_fits_its_whitening_first(fake_cifar10, tmp_path):
    cfg = ProbeConfig(data=str(fake_cifar10), model="coates-triangle", width=0.02, init="kmeans-layerwise",
                      init_images=16, val=20, labels=20, calibrate_images=30, weight_decays=(1e-2,), max_iter=10,
                      extend=0, out=str(tmp_path / "p"))
    saved = probe(cfg, log=lambda line: None)
    assert saved["features"] == 4 * 32 and saved["init_report"]["layers"][0]["name"] == "features.1"
    assert 0 <= saved["test_acc"] <= 1


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def test_calibrate_bn_sets_the_statistics_of_the_batches_and_restores_the_rest():
    net = _bn_net()
    net.eval()
    params = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(16, 3, 8, 8) * 3 + 1 for _ in range(3)]
    calibrate_bn_(net, iter(batches))
    # Independently: the conv's outputs over each batch; the running mean is the mean of the batch
    # means, the running variance the mean of the unbiased batch variances.
    with torch.no_grad():
        outs = [net[0](b) for b in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    vars_ = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, vars_, rtol=1e-5, atol=1e-6)
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1  # each layer's own momentum is back
    assert not any(m.training for m in net.modules())  # and the mode
    for k, v in net.state_dict().items():
        if k in params:
            torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_bn_(net, [])
    plain = nn.Sequential(nn.Linear(2, 2))
    assert calibrate_bn_(plain, []) is plain  # nothing to calibrate


def test_extract_features_takes_the_classifier_input_or_a_pooled_layer():
    net = PaperNet(width=0.25)
    net.train()
    x = torch.randn(10, 3, 32, 32)
    f = extract_features(net, x.split(4))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(f, net.classifier[:-1](net.features(x)))  # what the last linear layer sees
        pooled = F.adaptive_avg_pool2d(net.features(x), 2).flatten(1)
        whole = net.features(x).flatten(1)
    torch.testing.assert_close(extract_features(net, [x], layer="features"), pooled)
    torch.testing.assert_close(extract_features(net, [x], layer="features", pool=0), whole)
    net.train()
    net.features[1].eval()  # a mixed state: one BN in eval mode in a net in training mode
    extract_features(net, [x])
    assert net.training and not net.features[1].training and net.features[4].training  # each mode restored
    with pytest.raises(ValueError, match="layer 'feature' is not a module of PaperNet"):
        extract_features(net, [x], layer="feature")
    with pytest.raises(ValueError, match="no nn.Linear"):
        extract_features(nn.Sequential(nn.Conv2d(3, 2, 3)), [x])


def test_fit_linear_probe_reaches_the_optimum_of_its_objective():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g) * 5 + 2, torch.randint(0, 3, (300,), generator=g)
    x[:, 0] += 4 * y  # one informative feature
    x[:, 5] = 7.0  # a constant feature stays finite
    fit = fit_linear_probe(x, y, x[:50], y[:50], weight_decays=(0.01,), max_iter=500, extend=0)
    # Optimality, checked by autograd on the standardized features: the gradient vanishes.
    z = (x - fit.mean) / fit.std
    w, b = fit.weight.clone().requires_grad_(), fit.bias.clone().requires_grad_()
    gw, gb = torch.autograd.grad(probe_objective(z, y, w, b, 0.01), (w, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    torch.testing.assert_close(fit.mean, x.mean(0))
    assert torch.isfinite(fit.weight).all() and fit.weight[:, 5].abs().max() < 1e-6
    # and the objective there is below that of small perturbations of the solution
    best = probe_objective(z, y, fit.weight, fit.bias, 0.01)
    for _ in range(5):
        assert probe_objective(z, y, fit.weight + 1e-2 * torch.randn_like(fit.weight), fit.bias, 0.01) > best


def test_fit_linear_probe_keeps_the_weight_decay_best_on_validation():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 20, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 20, generator=g)
    fit = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=(1e-4, 10.0, 1e-2), extend=0)
    assert set(fit.val_accuracy) == {"0.0001", "10", "0.01"}
    assert fit.val_accuracy[f"{fit.weight_decay:g}"] == max(fit.val_accuracy.values())
    assert fit.accuracy(x[300:], y[300:]) == fit.val_accuracy[f"{fit.weight_decay:g}"] > 0.95  # separable clusters
    # A best weight at the end of those tried is followed past it: at 1e3 every weight is pulled to 0,
    # so 1e4 and 1e5 tie with it and the larger wins a tie.
    far = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=(1e3,), extend=2)
    assert set(far.val_accuracy) == {"1000", "10000", "100000"} and far.weight_decay == 1e5
    again = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=(1e-4, 10.0, 1e-2), extend=0)
    torch.testing.assert_close(again.weight, fit.weight, rtol=0, atol=0)  # deterministic
    with pytest.raises(ValueError, match=r"validation features must be \(M, 20\)"):
        fit_linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="weight_decays"):
        fit_linear_probe(x, y, x, y, weight_decays=())


def test_probe_writes_its_configuration_and_results(fake_cifar10, tmp_path):
    cfg = ProbeConfig(data=str(fake_cifar10), model="coates", width=0.02, init="kmeans", init_images=16, val=20,
                      labels=20, calibrate_images=30, weight_decays=(1e-3, 1e-1), max_iter=20, out=str(tmp_path / "p"))
    results = probe(cfg, log=lambda line: None)
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["labels"] == 20 and saved["features"] == 4 * 32 and saved["weight_decay"] in (1e-3, 1e-1)
    assert 0 <= saved["test_acc"] <= 1 and saved["init_report"]["layers"][0]["name"] == "features.0"
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["init"] == "kmeans" and config["weight_decays"] == [1e-3, 1e-1] and config["labels"] == 20
    with pytest.raises(RuntimeError, match="already holds a probe"):
        probe(cfg, log=lambda line: None)


def test_probe_config_maps_onto_the_training_config_of_the_same_run():
    """The probe prepares data and runs the init through training's own functions, so it sees the
    init a `kmeansinit train` run of the same model, init, seed and split starts from."""
    from kmeansinit.train import TrainConfig

    cfg = ProbeConfig(model="paper", width=0.5, init="kmeans-variance", init_options=dict(zca_eps=1.0), val=20,
                      labels=100, seed=3, batch_norm=False)
    tcfg = cfg.train_config()
    assert isinstance(tcfg, TrainConfig)
    for name in ("model", "width", "init", "init_options", "val", "labels", "seed", "batch_norm", "init_images", "data",
                 "patch_norm"):
        assert getattr(tcfg, name) == getattr(cfg, name), name
    assert ProbeConfig(model="coates", patch_norm=True).train_config().patch_norm


@pytest.mark.parametrize("args, message", [
    (["--layer", "featurez", "--model", "paper"], "layer 'featurez' is not a module of PaperNet"),
    (["--val", "0"], "val must be >= 1"),
    (["--init-option", "zca_eps=abc"], "zca_eps must be a number"),
    (["--weight-decay", "-1"], "weight_decays must be one or more numbers >= 0"),
    (["--patch-norm", "--model", "paper"], "patch_norm is offered for model coates only, got 'paper'"),
])
def test_probe_cli_bad_input_is_one_line_and_writes_nothing(fake_cifar10, tmp_path, capsys, args, message):
    out = tmp_path / "p"
    rc = main(["probe", "--data", str(fake_cifar10), "--width", "0.02", "--init-images", "8", "--val", "20",
               "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not (out / "results.json").exists() and not (out / "config.json").exists()


def test_probe_cli_runs(fake_cifar10, tmp_path, capsys):
    out = tmp_path / "p"
    rc = main(["probe", "--data", str(fake_cifar10), "--model", "paper", "--width", "0.25", "--init", "he",
               "--layer", "features", "--val", "20", "--calibrate-images", "0", "--weight-decay", "0.01", "--extend", "0",
               "--max-iter", "10", "--out", str(out)])
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["features"] == 32 * 4 and list(saved["val_accuracy_by_weight_decay"]) == ["0.01"]
    assert "validation" in capsys.readouterr().out


def _write_probe(root, setting, init, seed, val, test, features=512, labels=2000, wd=1e-3):
    d = root / setting / init / f"s{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(dict(model="paper", features=features, labels=labels, weight_decay=wd,
                                                    val_acc=val, test_acc=test)))


def test_probe_report_tables_each_init_and_compares_the_best_kmeans_init_with_the_best_other(tmp_path, capsys):
    import statistics

    runs = {"he": ([0.50, 0.52, 0.51], [0.49, 0.50, 0.51]), "kmeans": ([0.60, 0.61, 0.62], [0.60, 0.59, 0.61]),
            "kmeans-layerwise": ([0.40, 0.41], [0.40, 0.42]), "lsuv": ([0.53, 0.54], [0.52, 0.52])}
    for init, (vals, tests) in runs.items():
        for s, (v, t) in enumerate(zip(vals, tests)):
            _write_probe(tmp_path, "paper-labels2k", init, s, v, t)
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "probe.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| init")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["kmeans", "lsuv", "he", "kmeans-layerwise"]  # best first
    sd = statistics.stdev([60, 61, 62])
    assert rows[0].startswith(f"| kmeans | 3 | 61.0 ± {sd:.1f} |") and "512 features, 2000 labelled images" in text
    # kmeans (61.0) against the best other init, LSUV (53.5): +7.5 on validation, beyond the noise
    from scipy import stats

    p = stats.ttest_ind([60, 61, 62], [53, 54], equal_var=False).pvalue
    assert f"`kmeans` vs `lsuv`, validation: +7.5 points" in text and f"Welch p = {p:.3f}): ahead of it" in text
    assert "`kmeans` vs `lsuv`, test: +8.0 points" in text
    bad = tmp_path / "x" / "he" / "s0"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{}")
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2  # a file without the accuracies is named, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad / 'results.json'}: not a probe's results" in err[0]
