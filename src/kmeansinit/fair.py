"""The fair-evidence grid: does an init still win when every init gets its own best learning rate?

Two stages per architecture and optimizer, every choice made on a validation split held out of the
training set (``val`` images, the same for every run; the test set only gives the final numbers):

1. ``sweep``: every init at every learning rate of the architecture's list, one seed, a short budget
   (``sweep_epochs``, or ``sweep_steps``). Where an init's best rate is at an end of the list, the grid adds the next rate
   beyond it (a factor ``step`` on), up to ``extend`` times, so that each best rate lies inside the
   range it was chosen from.
2. ``final``: each init at its best rate (highest validation accuracy at the end of the sweep run),
   ``seeds`` seeds, a longer budget (``final_epochs``, or ``final_steps``).

A setting with ``rates_from`` has no sweep of its own: its final runs take each init's best rate from
that setting's finished sweep (``paper-long``, ``vgg11-long``, ...: the source's rates, five times its
final runs' budget).

Folders: ``OUT/<arch>-<optimizer>/sweep/<init>/lr<rate>`` and ``OUT/<arch>-<optimizer>/final/<init>/s<seed>``;
each is an ordinary resumable run folder (:mod:`kmeansinit.experiments`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .experiments import Cell, _cell, finished, run_grid
from .train import RECIPES

__all__ = ["FairArch", "FAIR_ARCHS", "FAIR_INITS", "sweep_cells", "final_cells", "best_lrs", "run_fair"]

#: Every init the grid compares. ``kmeans-he-norm``: the preset's directions at He's filter norm;
#: ``he-kmeans-norm``: He's directions at the preset's norms (the two controls for direction vs scale);
#: ``he-variance-norm``: He's directions at ``kmeans-variance``'s norms (that preset's control).
FAIR_INITS = {
    "he": dict(init="he"),
    "xavier": dict(init="xavier"),
    "lsuv": dict(init="lsuv"),
    "whitening": dict(init="whitening"),
    "kmeans": dict(init="kmeans"),
    "kmeans-he-norm": dict(init="kmeans-he-norm"),
    "he-kmeans-norm": dict(init="he-kmeans-norm"),
    # Joined after the PaperNet, ResNet-20 and 2,000-label sweeps had run (the no-BN lead): a later
    # candidate, one more comparison. With BN its per-layer variance norm only sets each layer's
    # effective rate, as LSUV's does.
    "kmeans-variance": dict(init="kmeans-variance"),
    # Its control, joined after kmeans-variance's PaperNet lead (fifth session): He's directions at
    # kmeans-variance's filter norms, so a lead it shares comes from the norms, not the k-means directions.
    "he-variance-norm": dict(init="he-variance-norm"),
    # Joined in the seventh session, for the settings where no k-means init was ahead (VGG-11,
    # ResNet-20): k-means directions in the first two layers only, LSUV in every other layer.
    "kmeans-lsuv": dict(init="kmeans-lsuv"),
    # Joined in the ninth session: kmeans-variance with a weaker whitening, the ZCA screen's best
    # uniform choice (docs/results/epsscreen: at least as good as the default 0.01 on all four nets).
    "kmeans-variance-eps0.1": dict(init="kmeans-variance", init_options=dict(zca_eps=0.1)),
}
#: PaperNet only: the paper's recipe, with 2,000 of its 10,000 gradient steps (the recipe is at 99.5%
#: of its 10,000-step objective after 1,000: benchmarks/RESULTS.md, "Joint solver sweep").
PAPER_ONLY = {"kmeans-paper": dict(init="kmeans-paper", init_options=dict(steps=2000))}
#: The nets with BN (tenth session on the zoo, eleventh on PaperNet): a still weaker whitening, the eps
#: screen's best on VGG-11 and MobileNetV2 (+10.0 over eps 0.01 there, VGG-11 +0.4 over 0.1), +1.0 on
#: ResNet-20, -4.3 on PaperNet at kmeans-variance's rate; on PaperNet after it had won on all three zoo
#: nets' means, to learn whether one setting can serve every net with BN.
EPS1 = {"kmeans-variance-eps1": dict(init="kmeans-variance", init_options=dict(zca_eps=1.0))}
#: The cheap k-means init (thirty-first session, the init-cost target): `kmeans-variance` in the first
#: layer only, LSUV in the rest; on the PaperNet settings (with and without BN, 2,000 labels) and on
#: VGG-11, to learn how much of the k-means presets' leads it keeps at its own best rate; on ResNet-20
#: (all labels and 2,000) and MobileNetV2 from the thirty-second session.
FAST = {"kmeans-fast": dict(init="kmeans-fast")}
#: The cheap init at the zoo's weaker whitening (thirty-second session): on VGG-11 `kmeans-fast` at the
#: default `zca_eps` kept +1.4 of the `zca_eps=1.0` preset's +3.6 over LSUV; the zoo nets with BN only.
FAST_EPS1 = {"kmeans-fast-eps1": dict(init="kmeans-fast", init_options=dict(zca_eps=1.0))}
#: The residual nets' own answer to no BN (thirty-sixth session): Fixup's weight rules (Zhang et al.
#: 2019), a baseline beside He, Xavier, LSUV and whitening where the net is a ResNet without BN.
FIXUP = {"fixup": dict(init="fixup")}


@dataclass
class FairArch:
    model: str
    lrs: dict  # optimizer -> learning rates of the sweep (ascending)
    width: float = 1.0
    sweep_epochs: float = 1.0
    final_epochs: float = 2.0
    recipe: str = "zoo"
    extra: dict = field(default_factory=dict)  # TrainConfig fields of every cell (labels, batch_norm, ...)
    inits: dict = field(default_factory=dict)  # inits compared here besides FAIR_INITS
    #: After the sweep, also try each init's best rate x2 and /2 (one seed each) and take the best of
    #: all. With BN a filter norm acts as a learning-rate factor (lr / ||w||^2): inits whose norms differ
    #: by 2-3x (Xavier vs He) are compared at different effective rates on a factor-4 grid.
    refine: bool = False
    #: No sweep of its own: each init's best rate comes from this setting's finished sweep.
    rates_from: str | None = None
    #: With ``rates_from``: the inits compared (default all of that setting's), in this order.
    compare: tuple = ()
    #: With ``rates_from``: after the final runs, each init also trained (seed 0, this budget) at its
    #: borrowed rate times each of these factors. A rate chosen on a short budget need not be the best
    #: for a longer one, and a lead that a baseline's neighbouring rate closes is no lead.
    rate_check: tuple = ()
    #: A budget in optimizer steps instead of epochs (both stages; ``None``: the epochs above). The
    #: few-label settings at other label counts than 2,000 keep its 300 and 900 steps, so that only the
    #: number of labels changes between them.
    sweep_steps: int | None = None
    final_steps: int | None = None


def _budget_text(epochs: float, steps: int | None) -> str:
    return f"{steps} steps" if steps else f"{epochs:g} epochs"


#: PaperNet keeps the paper's recipe (momentum 0.9, wd 1e-5, flips, lr halved after 2/3); the zoo nets
#: the usual CIFAR one (train.RECIPES["zoo"]). VGG-11 at width 0.5, MobileNetV2 at width 0.25: full
#: width costs several times a ResNet-20 epoch on the 2-core CPU this grid was sized for, and a
#: MobileNetV2 step at width 0.5 still 1.7x one at 0.25 in bf16 (benchmarks/zoo_step_time.py).
FAIR_ARCHS = {
    "paper": FairArch("paper", {"sgd": [1e-3, 4e-3, 1.6e-2, 6.4e-2], "adam": [2.5e-4, 1e-3, 4e-3, 1.6e-2]},
                      recipe="paper", final_epochs=3.0, inits={**EPS1, **FAST}),
    "resnet20": FairArch("resnet20", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, inits={**EPS1, **FAST, **FAST_EPS1}),
    # Refined (sixth session): at the factor-4 grid every init was best at 0.0125 and the 2-epoch finals
    # ordered them by filter norm (Xavier-sized first), the learning-rate effect `refine` checks for.
    "vgg11": FairArch("vgg11", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, width=0.5, refine=True,
                    inits={**EPS1, **FAST, **FAST_EPS1}),
    # Refined too (seventh session): its factor-4 sweep put every init at 0.05 with Xavier first, as
    # VGG-11's had before its refinement moved 7 of 9 best rates.
    "mobilenetv2": FairArch("mobilenetv2", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, width=0.25, refine=True,
                            inits={**EPS1, **FAST, **FAST_EPS1}),
    # Where a data-dependent init is known to matter most. Without BN nothing renormalizes the
    # activations, so the init's scale is the forward pass's scale: k-means directions get a
    # data-dependent norm too (LSUV-style unit output variance per layer).
    "paper-nobn": FairArch("paper", {"sgd": [1e-3, 4e-3, 1.6e-2, 6.4e-2]}, recipe="paper", final_epochs=3.0,
                           extra=dict(batch_norm=False),
                           # = the kmeans-variance preset, added after these cells ran (same weights: tested)
                           inits={"kmeans-variance": dict(init="kmeans", init_options=dict(scale="variance")), **FAST}),
    # The same question on a modern plain net: VGG-11 without BN (the original VGG, a bias per conv),
    # which trains from scratch only from a well-scaled init (Mishkin & Matas 2016 used LSUV). The rates
    # start a factor 4 below VGG-11-BN's best (0.0125); the sweep extends them where a best is at an end.
    # Its first list (0.0008, 0.003125, 0.0125, 0.05: not a factor-4 grid) left only 0.0008 on the
    # grid `best_lrs` extends, which then added 0.0002, 5e-05 and 0.0032 to 0.2048 beside the listed
    # rates (eighth session). These are the rates it ran; the others stay in the sweep as extra rates.
    "vgg11-nobn": FairArch("vgg11", {"sgd": [0.0008, 0.0032, 0.0128, 0.0512]}, width=0.5,
                           extra=dict(batch_norm=False)),
    # A residual net without BN (thirty-sixth session): ResNet-20 with a bias per conv and no BN, where
    # He's init lets the activations grow stage by stage (logits' std 7.1 on a cell's 256 init images, LSUV's
    # and kmeans-variance's 1.0-1.8: docs/results/fair/nobn/scale.md) and Fixup's rescaling is the usual fix. VGG-11
    # without BN's rates (a factor 4 below the nets with BN), extended where a best is at an end;
    # ResNet-20's k-means candidates, and Fixup's init among the baselines.
    "resnet20-nobn": FairArch("resnet20", {"sgd": [0.0008, 0.0032, 0.0128, 0.0512]}, extra=dict(batch_norm=False),
                              inits={**EPS1, **FAST, **FAST_EPS1, **FIXUP}),
    # Few labels, many unlabelled images (Coates & Ng 2011): 2,000 labelled training images (200 a
    # class); the data-dependent inits see all 45,000. 20 epochs of the labelled set (300 steps) to
    # sweep, 60 (900 steps) for the final runs.
    "paper-labels2k": FairArch("paper", {"sgd": [1e-3, 4e-3, 1.6e-2, 6.4e-2]}, recipe="paper", sweep_epochs=20.0,
                               final_epochs=60.0, extra=dict(labels=2000), inits=FAST),
    # The same few-labels question on a zoo net with BN (twenty-fifth session): VGG-11 at width 0.5,
    # where the weaker whitening led with all labels (+3.6 after 2 epochs, +1.3 after 10 at tuned
    # rates); paper-labels2k's labels and budgets, VGG-11's rates, refined by 2 as its sweep was.
    # kmeans-fast-eps1 joined in the thirty-third session: does the cheap init keep the few-label lead?
    "vgg11-labels2k": FairArch("vgg11", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, width=0.5, refine=True, sweep_epochs=20.0,
                               final_epochs=60.0, extra=dict(labels=2000), inits={**EPS1, **FAST_EPS1}),
    # How the few-label lead changes with the number of labels (twenty-seventh session): VGG-11 as
    # above with 500 labels (50 a class) and 8,000 (800), at vgg11-labels2k's budgets in steps (300 to
    # sweep, 900 for the final runs: 300 labelled epochs at 500 labels, 14.5 at 8,000), the unlabelled
    # images the same 45,000.
    **{f"vgg11-labels{name}": FairArch("vgg11", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, width=0.5, refine=True,
                                       sweep_steps=300, final_steps=900, extra=dict(labels=n), inits=EPS1)
       for name, n in (("500", 500), ("8k", 8000))},
    # Few labels on a residual net (twenty-eighth session): ResNet-20 with 2,000 labels at the VGG-11
    # label settings' budgets in steps; ResNet-20's rates, refined by 2 as theirs were.
    "resnet20-labels2k": FairArch("resnet20", {"sgd": [0.0125, 0.05, 0.2, 0.8]}, refine=True, sweep_steps=300,
                                  final_steps=900, extra=dict(labels=2000), inits={**EPS1, **FAST}),
}


def _longer(source: str, compare: tuple, factor: float = 5.0, optimizers: tuple = ("sgd",),
            rate_check: tuple = ()) -> FairArch:
    """A setting that trains ``compare`` ``factor`` times longer than ``source``'s final runs, each init
    at the rate ``source``'s sweep chose for it (for ``optimizers`` only): the same net, recipe and
    extras, no sweep of its own. The rates are not re-swept for the longer budget (a longer run may
    prefer another rate); ``rate_check`` factors train each init's neighbouring rates too, one seed."""
    a = FAIR_ARCHS[source]
    return replace(a, lrs={o: a.lrs[o] for o in optimizers}, final_epochs=factor * a.final_epochs,
                   final_steps=round(factor * a.final_steps) if a.final_steps else None,
                   rates_from=source, compare=compare, refine=False, inits={}, rate_check=tuple(rate_check))


# Do the short-budget leads last? Each setting's leaders and its best baselines, trained 5x longer
# than its final runs (the lr still halves at 2/3 under the paper's recipe, follows the cosine under
# the zoo's), at the rates its own sweep chose.
FAIR_ARCHS.update({
    # kmeans-variance's 3-epoch lead on PaperNet (+3.2 over LSUV), against He, LSUV and its control.
    # kmeans-fast joined in the thirty-first session (level with kmeans-variance after 3 epochs).
    "paper-long": _longer("paper", ("he", "lsuv", "kmeans-variance", "he-variance-norm", "kmeans-fast"),
                          rate_check=(0.5, 2.0)),
    # Without BN, where the grid's lead is largest (+8.8 after 3 epochs): He and whitening, the best
    # baselines there. Its lead was gone after 15 epochs at the 1-epoch rates (eighteenth session);
    # without BN the scale and the rate interact most (vgg11-nobn-long's check moved every best rate),
    # so each init's factor-2 neighbours are checked at 15 epochs too.
    "paper-nobn-long": _longer("paper-nobn", ("he", "whitening", "kmeans-variance"), rate_check=(0.5, 2.0)),
    # The zoo nets' leads beyond the noise after 2 epochs: the weaker whitening (zca_eps=1.0) on VGG-11
    # (+3.6 over LSUV) and MobileNetV2 (+5.0 over Xavier), and kmeans-he-norm on VGG-11 without BN
    # (+3.8 over LSUV); each against the best baseline there, and He, the default a user has.
    # Its lead lasted (+2.4 over LSUV after 10 epochs, nineteenth session) at rates chosen after one
    # epoch: each init's factor-2 neighbours at 10 epochs check that no baseline's better rate closes it.
    # kmeans-fast-eps1 (+2.5 over LSUV after 2 epochs) joined in the thirty-third session, and with it
    # whitening and Xavier, level with LSUV after 2 epochs: the best baseline at 10 epochs could be either.
    "vgg11-long": _longer("vgg11", ("he", "lsuv", "kmeans-variance-eps1", "kmeans-fast-eps1", "whitening", "xavier"),
                          rate_check=(0.5, 2.0)),
    "mobilenetv2-long": _longer("mobilenetv2", ("he", "xavier", "kmeans-variance-eps1"), rate_check=(0.5, 2.0)),
    # ResNet-20, the net users train most: its 2-epoch leads at the zoo's weaker whitening (zca_eps=1.0:
    # the preset +1.0 over LSUV, kmeans-fast +0.9, 10 seeds each, thirty-fourth session) at 10 epochs,
    # against LSUV, the best baseline there, and He.
    "resnet20-long": _longer("resnet20", ("he", "lsuv", "kmeans-fast-eps1", "kmeans-variance-eps1"),
                             rate_check=(0.5, 2.0)),
    # Without BN an init's scale and the rate interact most, so its rates are checked at 10 epochs too.
    "vgg11-nobn-long": _longer("vgg11-nobn", ("he", "lsuv", "kmeans-he-norm"), rate_check=(0.5, 2.0)),
    # ResNet-20 without BN (thirty-seventh session): after 2 epochs the zoo's preset led LSUV, the best
    # baseline, by about 5 points and Fixup, the residual nets' own answer to no BN, by about 20; Fixup
    # starts every block at its shortcut, a slow start that a longer budget may make up.
    "resnet20-nobn-long": _longer("resnet20-nobn", ("lsuv", "fixup", "kmeans-variance-eps1"), rate_check=(0.5, 2.0)),
})


def _inits(arch: str) -> dict:
    a = FAIR_ARCHS[arch]
    if a.rates_from:
        src = _inits(a.rates_from)
        return {k: src[k] for k in a.compare} if a.compare else src
    # kmeans-paper (20 CPU minutes an init) on the paper's own setting only.
    return {**FAIR_INITS, **(PAPER_ONLY if arch == "paper" else {}), **a.inits}


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def _base(a: FairArch, optimizer: str, data: str, val: int, precision: str, epochs: float,
          steps: int | None = None) -> dict:
    recipe = dict(RECIPES[a.recipe])
    if optimizer == "adam":
        recipe.update(optimizer="adam", nesterov=False)
    per_epoch = (50_000 - val) // 128  # CIFAR-10's training set less the validation split
    quarter = max(1, per_epoch // 4)
    budget = {"iterations": steps, "epochs": None} if steps else {"epochs": epochs}
    return {**recipe, "model": a.model, "width": a.width, "data": data, "val": val, "precision": precision, **budget,
            "eval_every": quarter, "log_every": max(1, quarter // 2), "test_every": per_epoch,
            "checkpoint_every": per_epoch // 2, **a.extra}


def sweep_cells(out, arch: str, optimizer: str, lrs=None, *, data: str = "../shared/data", val: int = 5000,
                precision: str = "bf16", inits=None) -> list[Cell]:
    a = FAIR_ARCHS[arch]
    root = Path(out) / f"{arch}-{optimizer}"
    base = _base(a, optimizer, data, val, precision, a.sweep_epochs, a.sweep_steps)
    cells = []
    for name, kw in (inits or _inits(arch)).items():
        for lr in (lrs or {}).get(name, a.lrs[optimizer]):
            cells.append(_cell(root / "sweep", f"{name}/{_lr_name(lr)}", base, lr=lr, seed=0, **kw,
                               init_cache=str(Path(out) / "init-cache" / arch)))
    return cells


def _final_acc(cell: Cell) -> float | None:
    """Validation accuracy at the end of a finished sweep run; 0 for one that diverged; None if unfinished."""
    if (cell.out / "diverged.json").exists():
        return 0.0
    if not finished(cell.out):
        return None
    rows = [json.loads(x) for x in (cell.out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r["val_acc"] for r in rows if "val_acc" in r]
    return vals[-1] if vals else None


def best_lrs(out, arch: str, optimizer: str, *, extend: int = 2, step: float = 4.0, **kw):
    """(best lr per init, lrs to add): per init, the best finished rate and, where it lies at an end
    of the swept range (and fewer than ``extend`` rates were added on that side), the next rate."""
    a = FAIR_ARCHS[arch]
    base_lrs = a.lrs[optimizer]
    off = [lr for lr in base_lrs if not _on_grid(lr, base_lrs[0], step)]
    if off:  # the extension and refinement below walk that grid; off it they extend at every end
        raise ValueError(f"{arch} {optimizer}: learning rates {base_lrs} are not a factor-{step:g} grid "
                         f"({off[0]:g} is off it)")
    found: dict[str, dict[float, float | None]] = {}
    # The swept rates with those added by earlier extensions.
    for c in sweep_cells(out, arch, optimizer, _extra_lrs(out, arch, optimizer, kw.get("inits")), **kw):
        found.setdefault(c.name.split("/")[0], {})[c.config.lr] = _final_acc(c)
    best, more = {}, {}
    for name, accs in found.items():
        if any(v is None for v in accs.values()):
            continue  # the sweep of this init is not finished
        lrs = sorted(accs)
        coarse = [lr for lr in lrs if _on_grid(lr, base_lrs[0], step)]
        top = _top(accs)
        ctop = _top({lr: accs[lr] for lr in coarse})
        lo_added = sum(lr < base_lrs[0] for lr in coarse)
        hi_added = sum(lr > base_lrs[-1] for lr in coarse)
        if ctop == coarse[0] and lo_added < extend:
            more[name] = coarse[0] / step
        elif ctop == coarse[-1] and hi_added < extend and accs[ctop] > 0:
            more[name] = coarse[-1] * step
        elif a.refine and accs[ctop] > 0 and (todo := [r for r in (ctop * 2, ctop / 2) if not _swept(r, lrs)]):
            more[name] = todo[0]  # the factor-2 neighbours of the coarse grid's best, one at a time
        else:
            best[name] = top
    return best, more


def _swept(lr: float, lrs) -> bool:
    return any(abs(lr / x - 1) < 1e-6 for x in lrs)


def _on_grid(lr: float, first: float, step: float) -> bool:
    """Whether ``lr`` is ``first * step**k`` for an integer k (a rate of the coarse sweep or its extensions)."""
    k = math.log(lr / first) / math.log(step)
    return abs(k - round(k)) < 1e-6


def _final_budget(out, arch, optimizer, data, val, precision, inits):
    """(setting, its folder, the final runs' config, the inits, the init cache) of the cells trained
    at a setting's final budget: final runs, rate check, tuned seeds."""
    a = FAIR_ARCHS[arch]
    base = _base(a, optimizer, data, val, precision, a.final_epochs, a.final_steps)
    # A setting that borrows another's rates shares its inits too (the same net, seed and images).
    cache = str(Path(out) / "init-cache" / (a.rates_from or arch))
    return a, Path(out) / f"{arch}-{optimizer}", base, inits or _inits(arch), cache


def final_cells(out, arch: str, optimizer: str, best: dict, *, seeds: int = 3, data: str = "../shared/data",
                val: int = 5000, precision: str = "bf16", inits=None) -> list[Cell]:
    _, root, base, inits, cache = _final_budget(out, arch, optimizer, data, val, precision, inits)
    return [_cell(root / "final", f"{name}/s{s}", base, lr=lr, seed=s, **inits[name], init_cache=cache)
            for s in range(seeds) for name, lr in best.items()]


def rate_check_cells(out, arch: str, optimizer: str, best: dict, *, data: str = "../shared/data",
                     val: int = 5000, precision: str = "bf16", inits=None) -> list[Cell]:
    """Seed 0 of each init at its chosen rate times each of the setting's ``rate_check`` factors, and
    at any rate an earlier extension added (a folder in ``ratecheck/<init>``), at the setting's
    budget, in ``<arch>-<optimizer>/ratecheck/<init>/lr<rate>``. The chosen rate's own seed 0 is
    the final runs' s0 (the same init weights and data order)."""
    a, root, base, inits, cache = _final_budget(out, arch, optimizer, data, val, precision, inits)
    cells = []
    for name, lr in best.items():
        for r in sorted({lr * f for f in a.rate_check} | _lr_folders(root / "ratecheck" / name)):
            if not _swept(r, [lr]):
                cells.append(_cell(root / "ratecheck", f"{name}/{_lr_name(r)}", base, lr=r, seed=0, **inits[name],
                                   init_cache=cache))
    return cells


def rate_check_more(out, arch: str, optimizer: str, best: dict, *, extend: int = 2, **kw) -> dict:
    """Per init whose best validation accuracy at the end (seed 0, over its chosen rate and the
    checked ones, all finished) lies at an end of the checked rates: the next rate beyond that end
    (the factors' own step, at most ``extend`` beyond the factors on each side). A baseline still
    improving at the edge has not had its best rate yet."""
    return _more(FAIR_ARCHS[arch], _rate_check_accs(out, arch, optimizer, best, **kw), best, extend)


def _top(found: dict) -> float:
    """The rate of the best accuracy; ties go to the smaller rate."""
    return max(found, key=lambda lr: (found[lr], -lr))


def _more(a: FairArch, accs: dict, best: dict, extend: int = 2) -> dict:
    lo_f, hi_f = min(a.rate_check), max(a.rate_check)
    step = hi_f if hi_f > 1 else 1 / lo_f
    more = {}
    for name, found in accs.items():
        if any(v is None for v in found.values()):
            continue
        lrs = sorted(found)
        top = _top(found)
        hi_added = sum(lr > best[name] * hi_f * (1 + 1e-6) for lr in lrs)
        lo_added = sum(lr < best[name] * lo_f * (1 - 1e-6) for lr in lrs)
        if top == lrs[-1] and hi_added < extend and found[top] > 0:
            more[name] = top * step
        elif top == lrs[0] and lo_added < extend:
            more[name] = top / step
    return more


def _rate_check_accs(out, arch: str, optimizer: str, best: dict, **kw) -> dict:
    """Per init: {rate: validation accuracy at the end of seed 0, or None while unfinished} over its
    chosen rate (the final runs' s0) and its rate-check rates."""
    finals = {c.name.split("/")[0]: c for c in final_cells(out, arch, optimizer, best, seeds=1, **kw)}
    accs: dict[str, dict[float, float | None]] = {}
    for c in rate_check_cells(out, arch, optimizer, best, **kw):
        accs.setdefault(c.name.split("/")[0], {})[c.config.lr] = _final_acc(c)
    for name in accs:
        accs[name][best[name]] = _final_acc(finals[name])
    return accs


def tuned_cells(out, arch: str, optimizer: str, best: dict, *, seeds: int = 3, data: str = "../shared/data",
                val: int = 5000, precision: str = "bf16", inits=None) -> list[Cell]:
    """Where the rate check (finished, nothing left to extend) found a better rate for an init at this
    budget than the one it borrowed: seeds 1 .. seeds-1 at that rate, in ``tuned/<init>/s<k>`` (its
    seed 0 is the rate-check run). With them every init has ``seeds`` seeds at its own best rate for
    this budget, not only for its source's."""
    accs = _rate_check_accs(out, arch, optimizer, best, data=data, val=val, precision=precision, inits=inits)
    a, root, base, inits, cache = _final_budget(out, arch, optimizer, data, val, precision, inits)
    if _more(a, accs, best):
        return []
    cells = []
    for name, found in accs.items():
        if any(v is None for v in found.values()):
            continue
        top = _top(found)
        if not _swept(top, [best[name]]):
            cells += [_cell(root / "tuned", f"{name}/s{s}", base, lr=top, seed=s, **inits[name], init_cache=cache)
                      for s in range(1, seeds)]
    return cells


def _lr_folders(folder: Path) -> set:
    """The rates of the ``lr<rate>`` run folders in ``folder`` (a sweep's or a rate check's, per init)."""
    return {float(d.name[2:]) for d in folder.glob("lr*") if d.is_dir()}


def _extra_lrs(out, arch, optimizer, inits=None) -> dict:
    root = Path(out) / f"{arch}-{optimizer}" / "sweep"
    base = set(FAIR_ARCHS[arch].lrs[optimizer])
    extra = {}
    for name in inits or _inits(arch):
        lrs = sorted(_lr_folders(root / name) | base)
        extra[name] = lrs
    return extra


def run_fair(out, archs, optimizers=("sgd",), *, seeds: int = 3, jobs: int = 2, dry_run: bool = False,
             data: str = "../shared/data", val: int = 5000, precision: str = "bf16", stack: int = 1,
             only=None, log=print) -> list[Cell]:
    """Sweep, extend where a best rate is at an end, then the final runs; returns failed cells.
    ``stack``: cells that share a rate (and so an optimizer step) train up to that many at a time as one
    stacked model (:mod:`kmeansinit.train_stacked`). ``only``: init names; every other init's cells are
    neither run nor read (a later candidate's cells, say, in a folder of their own)."""
    failed = []
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    for arch in archs:
        if arch not in FAIR_ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(FAIR_ARCHS)}")
    if only:
        every = {name for arch in archs for name in _inits(arch)}
        unknown = sorted(set(only) - every)
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} is not an init of {', '.join(archs)}; choose from {', '.join(sorted(every))}")
    for arch in archs:
        for opt in optimizers:
            if opt not in FAIR_ARCHS[arch].lrs:
                continue
            every = _inits(arch)  # with --only, in the order given (as table2's rows): the first named runs first
            inits = {k: every[k] for k in dict.fromkeys(only) if k in every} if only else every
            if not inits:
                continue
            kw = dict(data=data, val=val, precision=precision, inits=inits)
            a = FAIR_ARCHS[arch]
            if a.rates_from:  # no sweep of its own: the final runs at another setting's chosen rates
                best, _ = best_lrs(out, a.rates_from, opt, **kw)
                missing = [k for k in inits if k not in best]
                if missing and not dry_run:
                    raise ValueError(f"{arch} {opt}: the {a.rates_from}-{opt} sweep in {out} has no chosen rate for "
                                     f"{', '.join(missing)}; run `kmeansinit reproduce fair --arch {a.rates_from}` first")
                best = {k: best[k] for k in inits if k in best}
                plan = (f"each init at the best rate of the {a.rates_from} sweep x {seeds} seeds, "
                        f"{_budget_text(a.final_epochs, a.final_steps)} (chosen so far: {best})")
                chosen = f"the {a.rates_from} sweep's best rates"
            else:
                failed += _sweep(out, arch, opt, kw, jobs=jobs, dry_run=dry_run, log=log, stack=stack)
                best, _ = best_lrs(out, arch, opt, **kw)
                plan = (f"then each init's best rate x {seeds} seeds, {_budget_text(a.final_epochs, a.final_steps)}"
                        + (f" (chosen so far: {best})" if best else " (chosen after the sweep)"))
                chosen = "the best rates"
            if dry_run:
                log(f"# {arch} {opt}: {plan}")
            cells = final_cells(out, arch, opt, best, seeds=seeds, **kw)
            if cells:
                log(f"{arch} {opt}: final runs at {chosen} {json.dumps(best)}")
                failed += run_grid(cells, jobs=jobs, dry_run=dry_run, log=log, stack=stack)
            if a.rate_check and best:
                factors = ", ".join(f"{f:g}" for f in a.rate_check)
                log(f"{'# ' if dry_run else ''}{arch} {opt}: rate check: each init at its rate x {factors}, "
                    f"seed 0, {_budget_text(a.final_epochs, a.final_steps)}")
                while True:  # extended, as the sweep is, where a best rate lies at an end
                    failed += run_grid(rate_check_cells(out, arch, opt, best, **kw), jobs=jobs, dry_run=dry_run,
                                       log=log, stack=stack)
                    more = {} if dry_run else rate_check_more(out, arch, opt, best, **kw)
                    if not more:
                        break
                    for name, lr in more.items():
                        log(f"{arch} {opt} {name}: best of the rate check at an end; adding lr {lr:g}")
                        (Path(out) / f"{arch}-{opt}" / "ratecheck" / name / _lr_name(lr)).mkdir(parents=True, exist_ok=True)
                tuned = tuned_cells(out, arch, opt, best, seeds=seeds, **kw)
                if tuned:
                    log(f"{arch} {opt}: {seeds - 1} more seeds of each init whose best rate at this budget differs")
                    failed += run_grid(tuned, jobs=jobs, dry_run=dry_run, log=log, stack=stack)
    # A run stopped by a NaN loss is a result (the rate is too high), not a failure.
    return [c for c in failed if not (c.out / "diverged.json").exists()]


def _sweep(out, arch: str, opt: str, kw: dict, *, jobs: int, dry_run: bool, log, stack: int) -> list[Cell]:
    """Run the learning-rate sweep of one setting, adding a rate beyond each end where a best lies
    there, until every init's best rate is inside its range; returns the failed cells."""
    failed = []
    while True:
        cells = sweep_cells(out, arch, opt, _extra_lrs(out, arch, opt, kw["inits"]), **kw)
        if dry_run:
            log(f"# {arch} {opt}: learning-rate sweep on the validation split")
            return failed + run_grid(cells, jobs=jobs, dry_run=True, log=log, stack=stack)
        log(f"{arch} {opt}: sweep")
        failed += run_grid(cells, jobs=jobs, log=log, stack=stack)
        _, more = best_lrs(out, arch, opt, **kw)
        if not more:
            return failed
        for name, lr in more.items():
            rates = [c.config.lr for c in cells if c.name.split("/")[0] == name]
            why = "best rate at an end of the range" if not min(rates) < lr < max(rates) else "refining beside the best rate"
            log(f"{arch} {opt} {name}: {why}; adding lr {lr:g}")
            (Path(out) / f"{arch}-{opt}" / "sweep" / name / _lr_name(lr)).mkdir(parents=True, exist_ok=True)
