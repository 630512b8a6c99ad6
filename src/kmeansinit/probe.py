"""Linear probe: how good are an init's features before any training?

Coates, Lee & Ng (AISTATS 2011) showed that filters learnt by k-means on whitened patches, kept
fixed, feed a linear classifier far better than random filters do. :func:`probe` asks the same of
any init here: initialize a net on unlabelled images, freeze it, set its BN statistics on unlabelled
images (:func:`calibrate_bn_`), take one layer's output (:func:`extract_features`, quadrant-pooled
for feature maps) and fit an L2-regularized multinomial logistic regression to it
(:func:`fit_linear_probe`), its regularizer chosen on a validation split. With ``labels`` the
classifier sees only that many labelled images while the init and BN see every training image,
unlabelled: the few-labels case where a data-dependent init is expected to matter most.

Every run writes its resolved configuration (``config.json``) and its results (``results.json``)
to its folder, as ``kmeansinit train`` does.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .init._model import kept_modes

__all__ = ["ProbeConfig", "probe", "calibrate_bn_", "extract_features", "fit_linear_probe", "probe_objective", "LinearProbe"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class ProbeConfig:
    # data (as TrainConfig)
    dataset: str = "cifar10"
    data: str = "../shared/data"
    label: str = "fine"
    image_size: int | None = None
    val: int = 5000  # training images held out to choose the regularizer
    labels: int = 0  # the classifier sees this many labelled images (0: all); init and BN see every one
    # model and init (as TrainConfig)
    model: str = "coates"
    width: float = 1.0
    gated: bool = False
    batch_norm: bool = True
    patch_norm: bool = False
    init: str = "kmeans"
    init_images: int = 256
    init_options: dict = field(default_factory=dict)
    seed: int = 0
    # probe
    layer: str | None = None  # module whose output is the feature; None: the input of the last nn.Linear
    pool: int = 2  # a feature map (N, C, H, W) is average-pooled to pool x pool (0: flattened whole)
    calibrate_images: int = 5000  # unlabelled training images that set BN's running statistics (0: keep them)
    weight_decays: tuple = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 weights tried; the best on validation is kept
    extend: int = 2  # more weight decays tried (x10 steps) past an end of weight_decays where the best lies
    max_iter: int = 300  # L-BFGS iterations per weight decay
    batch_size: int = 500  # images per forward pass
    precision: str = "fp32"  # fp32 | bf16 (autocast while extracting features)
    threads: int = 0
    device: str = "auto"
    out: str = "runs/probe"

    def validate(self) -> None:
        # The fields it shares with TrainConfig (model, width, init and its options, precision, ...)
        # are checked by TrainConfig's own validate, with its messages; then the probe's own.
        self.train_config().validate()
        checks = [
            (self.val >= 1, f"val must be >= 1 (the probe chooses its regularizer on it), got {self.val}"),
            (self.pool >= 0, f"pool must be >= 0, got {self.pool}"),
            (self.calibrate_images >= 0, f"calibrate_images must be >= 0, got {self.calibrate_images}"),
            (len(self.weight_decays) > 0 and all(isinstance(w, (int, float)) and w >= 0 for w in self.weight_decays),
             f"weight_decays must be one or more numbers >= 0, got {list(self.weight_decays)}"),
            (self.max_iter >= 1 and self.batch_size >= 1, "max_iter and batch_size must be >= 1"),
            (self.extend >= 0, f"extend must be >= 0, got {self.extend}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def train_config(self):
        """The :class:`~kmeansinit.train.TrainConfig` of the same data, model and init (the probe
        reuses training's data preparation and init, so the two see the same images)."""
        from .train import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@torch.no_grad()
def calibrate_bn_(model: nn.Module, batches) -> nn.Module:
    """Set every BN layer's running mean and variance to their averages over ``batches`` (tensors fed
    to ``model`` in training mode), as if the net had been trained on them with frozen weights.

    The statistics are reset, then accumulated with ``momentum=None`` (a cumulative average over
    the batches, equal for equal batch sizes to the statistics of their union up to the variance's
    per-batch Bessel correction); each layer's momentum and the model's train/eval mode are
    restored afterwards. A model without BN is returned untouched. Returns ``model``.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    seen = 0
    with kept_modes(model):
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for xb in batches:
                model(xb)
                seen += 1
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
    if not seen:
        raise ValueError("calibrate_bn_: no batches given")
    return model


def _feature_module(model: nn.Module, layer: str | None) -> tuple[nn.Module, bool]:
    """(module, take its input?) for ``layer``: a named module's output, or the last Linear's input."""
    if layer is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer; name the feature layer (layer=...)")
        return linears[-1], True
    named = dict(model.named_modules())
    if layer not in named or layer == "":
        close = ", ".join(n for n in named if n and "." not in n) or "none"
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__} (top-level modules: {close})")
    return named[layer], False


@torch.no_grad()
def extract_features(model: nn.Module, batches, *, layer: str | None = None, pool: int = 2) -> Tensor:
    """The features of every image in ``batches`` (tensors fed to ``model`` in eval mode), as one
    float32 ``(N, D)`` tensor on the CPU.

    ``layer`` names the module whose output is taken (default: the input of the model's last
    ``nn.Linear``, what its classifier sees). A 4-D output ``(N, C, H, W)`` is average-pooled to
    ``pool x pool`` cells and flattened channel-major (Coates et al.'s quadrant pooling for
    ``pool=2``); ``pool=0`` flattens the whole map. The model's mode is restored afterwards.
    """
    module, take_input = _feature_module(model, layer)
    got: list[Tensor] = []

    def hook(mod, args, output):
        t = args[0] if take_input else output
        if t.dim() == 4 and pool:
            t = F.adaptive_avg_pool2d(t.float(), pool)
        got.append(t.float().flatten(1).cpu())

    handle = module.register_forward_hook(hook)
    with kept_modes(model):  # each module's own mode back, not one for all
        try:
            model.eval()
            for xb in batches:
                model(xb)
        finally:
            handle.remove()
    if not got:
        raise ValueError("extract_features: no batches given")
    return torch.cat(got)


@dataclass
class LinearProbe:
    """A fitted probe: ``logits = ((x - mean) / std) @ weight.T + bias``."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    weight_decay: float
    val_accuracy: dict  # weight decay -> validation accuracy, for every one tried

    def logits(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return _accuracy(self.logits(x), y)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return int((logits.argmax(1) == y).sum()) / len(y)


def probe_objective(z: Tensor, y: Tensor, weight: Tensor, bias: Tensor, weight_decay: float) -> Tensor:
    """Mean cross-entropy of ``z @ weight.T + bias`` plus ``weight_decay / 2 * ||weight||^2`` (the
    bias unpenalized): what :func:`fit_linear_probe` minimizes on standardized features ``z``."""
    return F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()


def fit_linear_probe(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, weight_decays=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                     max_iter: int = 300, extend: int = 2, num_classes: int | None = None, log=None) -> LinearProbe:
    """Fit a multinomial logistic regression to features ``x`` (``(N, D)``) and labels ``y``, once per
    L2 weight in ``weight_decays``, and keep the one most accurate on ``(x_val, y_val)`` (the larger
    weight on a tie). Where that is the largest (smallest, if above 0) weight tried, up to ``extend``
    more fits go on past it by factors of 10 while the best stays at the end.

    Features are standardized by their training mean and standard deviation; each fit minimizes
    :func:`probe_objective` by full-batch L-BFGS (strong Wolfe line search) from the previous,
    more strongly regularized solution. Deterministic for given inputs.
    """
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) with N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x_val.dim() != 2 or x_val.shape[1] != x.shape[1] or len(x_val) != len(y_val):
        raise ValueError(f"validation features must be (M, {x.shape[1]}) with M labels, got {tuple(x_val.shape)} "
                         f"and {tuple(y_val.shape)}")
    if not weight_decays:
        raise ValueError("weight_decays: give at least one")
    x, x_val = x.float(), x_val.float()
    k = num_classes or int(max(y.max(), y_val.max())) + 1
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)  # a constant feature (a dead unit) stays 0, not NaN
    z, z_val = (x - mean) / std, (x_val - mean) / std
    fits: dict = {}  # weight decay -> (validation accuracy, weight, bias)

    def fit(wd: float) -> None:
        # Warm start from the solved weight decay nearest to this one (the optimum does not depend on
        # the start: the objective is strictly convex for wd > 0).
        near = min(fits, key=lambda v: abs(math.log10(max(v, 1e-30)) - math.log10(max(wd, 1e-30))), default=None)
        weight = (fits[near][1].clone() if near is not None else torch.zeros(k, x.shape[1])).requires_grad_()
        bias = (fits[near][2].clone() if near is not None else torch.zeros(k)).requires_grad_()
        opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = probe_objective(z, y, weight, bias, wd)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            fits[wd] = (_accuracy(z_val @ weight.T + bias, y_val), weight.detach(), bias.detach())
        if log:
            log(f"probe: weight decay {wd:g}: validation accuracy {fits[wd][0]:.4f}")

    for wd in sorted(set(weight_decays), reverse=True):
        fit(wd)
    # A best weight at an end of those tried may not be the best there is: go on past that end, a
    # factor of 10 at a time, while it stays the best (at most ``extend`` more fits).
    for _ in range(extend):
        best = max(fits, key=lambda v: (fits[v][0], v))
        if best == max(fits):
            fit(float(f"{best * 10:g}"))  # 1e-05 * 10 read as 0.0001, not 0.00010000000000000002
        elif best == min(fits) and best > 0:
            fit(float(f"{best / 10:g}"))
        else:
            break
    wd = max(fits, key=lambda v: (fits[v][0], v))  # the larger weight on a tie
    _, w, b = fits[wd]
    accs = {v: a for v, (a, _, _) in fits.items()}
    return LinearProbe(mean, std, w, b, wd, {f"{k_:g}": v for k_, v in sorted(accs.items())})


def probe(cfg: ProbeConfig, *, dataset=None, log=print) -> dict:
    """Initialize ``cfg.model`` by ``cfg.init``, freeze it, fit a linear probe to its features; write
    ``config.json`` and ``results.json`` into ``cfg.out`` and return the results."""
    from .distributed import setup
    from .init import InitReport
    from .train import RunError, _init, build_model, prepare_data

    cfg.validate()
    out = Path(cfg.out)
    if (out / "results.json").exists():
        raise RunError(f"{out}: already holds a probe's results; choose another --out")
    _, device = setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tcfg = cfg.train_config()
    t0 = time.perf_counter()
    ds, pool, norm, _ = prepare_data(tcfg, dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(tcfg, ds.num_classes, ds.train_x.shape[1]).to(device)
    _feature_module(model, cfg.layer)  # a bad layer name fails before the init's work
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    t_init = time.perf_counter()
    report = _init(model, tcfg, pool, norm, device, progress=False)
    t_init = time.perf_counter() - t_init
    model.requires_grad_(False)
    log(f"probe: {cfg.model} initialized by {cfg.init} in {t_init:.1f} s")

    def feed(x):
        return (norm(part.to(device)) for part in x.split(cfg.batch_size))

    feats = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        if cfg.calibrate_images:
            log(f"probe: BN statistics from {min(cfg.calibrate_images, len(pool.train_x))} unlabelled images ...")
            idx = torch.randperm(len(pool.train_x), generator=torch.Generator().manual_seed(cfg.seed))
            calibrate_bn_(model, feed(pool.train_x[idx[:cfg.calibrate_images]]))
        for name, x in (("train", ds.train_x), ("val", ds.val_x), ("test", ds.test_x)):
            log(f"probe: {name} features of {len(x)} images ...")
            t = time.perf_counter()
            feats[name] = extract_features(model, feed(x), layer=cfg.layer, pool=cfg.pool)
            log(f"probe: {name} features {tuple(feats[name].shape)} in {time.perf_counter() - t:.1f} s")
    fit = fit_linear_probe(feats["train"], ds.train_y, feats["val"], ds.val_y, weight_decays=cfg.weight_decays,
                           max_iter=cfg.max_iter, extend=cfg.extend, num_classes=ds.num_classes, log=log)
    results = dict(
        init=cfg.init, model=cfg.model, labels=len(ds.train_y), features=feats["train"].shape[1],
        weight_decay=fit.weight_decay, val_accuracy_by_weight_decay=fit.val_accuracy,
        train_acc=fit.accuracy(feats["train"], ds.train_y), val_acc=fit.accuracy(feats["val"], ds.val_y),
        test_acc=fit.accuracy(feats["test"], ds.test_y), init_seconds=t_init,
        seconds=time.perf_counter() - t0,
        init_report=report.to_dict() if isinstance(report, InitReport) else None,
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"probe: {cfg.init}: validation {results['val_acc']:.4f}, test {results['test_acc']:.4f} "
        f"(weight decay {fit.weight_decay:g}, {results['features']} features, {results['labels']} labels)")
    return results
