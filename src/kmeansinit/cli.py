"""Command line: ``kmeansinit train``; every bad input ends in one line naming what is wrong."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .init import METHODS

__all__ = ["main", "build_parser", "train_config_from_args", "stack_configs_from_args", "probe_config_from_args"]


def _option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .models import MODELS
    from .train import SCHEDULE_NAMES, TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default=d.dataset)
    p.add_argument("--data", default=d.data, help="dataset folder or archive (default %(default)s)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR from the official source into --data")
    p.add_argument("--label", choices=["fine", "coarse"], default=d.label, help="CIFAR-100 labels")
    p.add_argument("--image-size", type=int, default=None, help="resize image-folder images to N x N")
    p.add_argument("--crop", type=int, default=None, help="random-crop padding in pixels (paper recipe: 0, flips only; zoo: 4)")
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                   help="the net without BN layers: PaperNet, the ResNets, VGG-11, coates (where an init's scale matters)")
    p.add_argument("--patch-norm", action="store_true",
                   help="coates: contrast-normalize each patch before the filters, as Coates et al. encode")
    p.add_argument("--model", choices=list(MODELS), default=d.model,
                   help="network (default paper: Table 1); the zoo models default to their own recipe (README)")
    p.add_argument("--gated", action="store_true", help="GatedConv2d in every conv layer larger than 1x1")
    p.add_argument("--width", type=float, default=d.width, help="width multiplier (3 = the paper's 'vanilla x3')")
    p.add_argument("--init", choices=list(METHODS), default=d.init)
    p.add_argument("--init-images", type=int, default=d.init_images, help="images for the init; 0 = all")
    p.add_argument("--init-split", choices=["train", "test"], default=d.init_split,
                   help="draw init images from train (default, no leakage) or test (as the paper)")
    p.add_argument("--init-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the init, e.g. steps=20 or cosine_weight=0 (repeatable)")
    # Recipe options default to None: filled from the model's recipe (train.RECIPES) unless given.
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None, help="default: sgd")
    p.add_argument("--lr", type=float, default=None, help="default: paper 1e-3, zoo 0.1 (Adam: 1e-3)")
    p.add_argument("--momentum", type=float, default=None, help="default 0.9")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (zoo default)")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    p.add_argument("--weight-decay", type=float, default=None, help="default: paper 1e-5, zoo 5e-4")
    p.add_argument("--lr-schedule", choices=list(SCHEDULE_NAMES), default=None,
                   help="paper (halve once, at --halve-at), step (/10 at 1/2 and 3/4), cosine, constant; "
                        "default: paper for the paper's net, cosine for the zoo")
    p.add_argument("--warmup", type=int, default=d.warmup, help="iterations of linear lr warm-up")
    p.add_argument("--val", type=int, default=d.val,
                   help="hold out N training images (fixed seed) and evaluate on them; test only at the end")
    p.add_argument("--test-every", type=int, default=d.test_every,
                   help="with --val: also evaluate the test set every N iterations (0: at the end only)")
    p.add_argument("--labels", type=int, default=d.labels,
                   help="train on N labelled training images (class-balanced, the same for every run); "
                        "data-dependent inits and the normalization still see every training image (0: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--iterations", type=int, default=d.iterations, help="total steps; lr halves at 2/3")
    p.add_argument("--halve-at", type=float, default=d.halve_at, help="fraction of the run after which lr halves (paper: 2/3)")
    p.add_argument("--epochs", type=float, default=None, help="overrides --iterations")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: BN statistics over the global batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (for long runs, mostly on GPU)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: all cores)")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--init-cache", default=None, help="folder of finished inits to reuse across runs")
    p.add_argument("--tag", default="", help="a label for grids and reports")


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    from .models import MODELS
    from .probe import ProbeConfig

    d = ProbeConfig()
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default=d.dataset)
    p.add_argument("--data", default=d.data, help="dataset folder or archive (default %(default)s)")
    p.add_argument("--label", choices=["fine", "coarse"], default=d.label, help="CIFAR-100 labels")
    p.add_argument("--image-size", type=int, default=None, help="resize image-folder images to N x N")
    p.add_argument("--model", choices=list(MODELS), default=d.model,
                   help="network (default coates: Coates et al.'s 1,600 6x6 filters and quadrant pooling)")
    p.add_argument("--width", type=float, default=d.width, help="width multiplier (coates: 1,600 x width filters)")
    p.add_argument("--gated", action="store_true", help="GatedConv2d in every conv layer larger than 1x1")
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false", help="the net without BN layers")
    p.add_argument("--patch-norm", action="store_true",
                   help="coates: contrast-normalize each patch before the filters, as Coates et al. encode")
    p.add_argument("--init", choices=list(METHODS), default=d.init)
    p.add_argument("--init-images", type=int, default=d.init_images, help="images for the init; 0 = all")
    p.add_argument("--init-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the init, e.g. zca_eps=1.0 (repeatable)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val", type=int, default=d.val, help="training images held out to choose the regularizer")
    p.add_argument("--labels", type=int, default=d.labels,
                   help="fit the classifier to N labelled images (class-balanced); init and BN see every image (0: all)")
    p.add_argument("--layer", default=None,
                   help="module whose output is the feature, e.g. features (default: the last linear layer's input)")
    p.add_argument("--pool", type=int, default=d.pool, help="average-pool a feature map to N x N (0: flatten it whole)")
    p.add_argument("--calibrate-images", type=int, default=d.calibrate_images,
                   help="unlabelled training images that set BN's running statistics (0: leave them)")
    p.add_argument("--weight-decay", type=float, action="append", default=None, dest="weight_decays",
                   help=f"an L2 weight to try (repeatable; the best on validation is kept; default {list(d.weight_decays)})")
    p.add_argument("--extend", type=int, default=d.extend,
                   help="more weight decays (x10 steps) tried past an end of those given where the best lies")
    p.add_argument("--max-iter", type=int, default=d.max_iter, help="L-BFGS iterations per weight decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision, help="feature extraction precision")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: all cores)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=d.out, help="folder for config.json and results.json")


def probe_config_from_args(a: argparse.Namespace):
    """A ProbeConfig from ``kmeansinit probe``'s parsed arguments."""
    import dataclasses

    from .probe import ProbeConfig

    names = {f.name for f in dataclasses.fields(ProbeConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names and v is not None}
    kw["init_options"] = dict(a.init_option)
    if a.weight_decays:
        kw["weight_decays"] = tuple(a.weight_decays)
    return ProbeConfig(**kw)


def train_config_from_args(a: argparse.Namespace):
    """A TrainConfig from parsed arguments; options not given come from the model's recipe (RECIPES)."""
    from .train import RECIPES, TrainConfig

    names = {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names}
    kw["init_options"] = dict(a.init_option)
    recipe = dict(RECIPES["paper" if kw.get("model", "paper") == "paper" else "zoo"])
    if kw.get("optimizer") == "adam":
        recipe.update(lr=1e-3, nesterov=False)
    for key, value in recipe.items():
        if kw.get(key) is None:
            kw[key] = value
    return TrainConfig(**kw)


def stack_configs_from_args(cells: list[str]):
    """(configs, resume flags) of ``kmeansinit stack``'s ``--cell`` strings, each parsed as ``train``'s
    arguments; a bad one is named in the one-line error."""
    import shlex

    from .train import load_run_config

    parser = build_parser()
    cfgs, flags = [], []
    for i, text in enumerate(cells, 1):
        try:
            a = parser.parse_args(["train", *shlex.split(text)])
        except SystemExit as e:  # argparse printed its own line about the bad argument
            raise ValueError(f"--cell {i} ({text!r}) is not a valid set of train arguments") from e
        if a.resume:
            cfgs.append(load_run_config(a.resume))
            flags.append(True)
        else:
            cfgs.append(train_config_from_args(a))
            flags.append(False)
    return cfgs, flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmeansinit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one network (the paper's recipe by default)")
    add_train_arguments(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (other options are ignored)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("stack", help="train several runs of one model shape and optimizer as one stacked model")
    s.add_argument("--cell", action="append", required=True, metavar="TRAIN_ARGS",
                   help="one run's `kmeansinit train` arguments as one quoted string, e.g. "
                        "\"--init he --seed 1 --out runs/a\" or \"--resume runs/a\" (repeat per cell)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("reproduce", help="run one of the paper's grids and write its report")
    r.add_argument("grid", choices=["table2", "table3", "ablation", "study", "screen", "fair"])
    r.add_argument("--schedule", choices=["paper", "short", "tiny"], default=None,
                   help="table2/table3/ablation: paper (75,000 iterations) or short (1,200, the default)")
    r.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 1; fair: 3 for the final runs)")
    r.add_argument("--iterations", type=int, default=None,
                   help="override the schedule's iteration count (lr still halves at 2/3)")
    r.add_argument("--out", default=None, help="grid folder (default runs/<grid>)")
    r.add_argument("--data", default="../shared/data")
    r.add_argument("--init", default=None, help="table3: the init of every cell (default he)")
    r.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    r.add_argument("--dry-run", action="store_true", help="print each cell's kmeansinit train command")
    r.add_argument("--stack", type=int, default=1, metavar="N",
                   help="train up to N cells that share a model shape and optimizer as one stacked model "
                        "(kmeansinit stack; 1: every cell alone)")
    from .fair import FAIR_ARCHS

    swept = ", ".join(k for k, a in FAIR_ARCHS.items() if a.rates_from is None)
    longer = ", ".join(k for k, a in FAIR_ARCHS.items() if a.rates_from is not None)
    r.add_argument("--arch", action="append", default=None,
                   help=f"fair: settings (repeatable; default all: {swept}, and {longer}: "
                        "a few inits at their source setting's chosen rates, 5x its final runs' epochs, "
                        "each also at x0.5 and x2 its rate, seed 0, extended where a best lies at an end (<setting>/ratecheck), "
                        "then more seeds of an init at a better rate found there (<setting>/tuned))")
    r.add_argument("--optimizer", action="append", default=None, choices=["sgd", "adam"],
                   help="run only the cells of these optimizers (repeatable), in the order given; "
                        "fair: default sgd, and adam on paper")
    r.add_argument("--val", type=int, default=5000, help="fair: validation images held out of the training set")
    r.add_argument("--only", action="append", default=None, metavar="ROW",
                   help="run only these rows (repeatable), in the order given (table2: inits, he, kmeans-variance, ...; "
                        "table3: cifar10-gated, ...; fair: inits); the others' cells are neither run nor read")
    r.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="training precision. fair: bf16 by default (faster on CPUs with bf16 units; accuracy parity "
                        "in docs/results/bf16); the other grids: fp32 by default, and bf16 cells are named <row>-bf16")
    pr = sub.add_parser("probe", help="freeze an initialized net and fit a linear classifier to its features "
                                      "(Coates et al. 2011; results.json in --out)")
    add_probe_arguments(pr)
    pk = sub.add_parser("pack", help="write a compact JPEG copy of a dataset (.npz) that --data accepts")
    pk.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default="cifar10")
    pk.add_argument("--data", default="../shared/data", help="the dataset to pack (as train's --data)")
    pk.add_argument("--label", choices=["fine", "coarse"], default="fine", help="CIFAR-100: the labels the pack keeps")
    pk.add_argument("--image-size", type=int, default=None, help="image folders: resize to N x N")
    pk.add_argument("--quality", type=int, default=75, help="JPEG quality (default 75: our CIFAR-10 copy's own)")
    pk.add_argument("--out", required=True, help="the pack, a .npz file")
    ar = sub.add_parser("archive", help="copy run folders' results (and, optionally, checkpoints) into a folder to commit")
    ar.add_argument("src", help="a folder of runs, e.g. runs/fair")
    ar.add_argument("dst", help="where the copy goes, e.g. docs/results/fair/runs (same layout)")
    ar.add_argument("--checkpoints", action="store_true",
                    help="also copy each unfinished run with its newest checkpoint, so --resume goes on from the copy")
    ar.add_argument("--weights", action="store_true", help="also copy each finished run's final.pt")
    rep = sub.add_parser("report", help="write report.md, curves.png, filters.png from run folders "
                                          "(fair.md for `reproduce fair`, probe.md for probe runs)")
    rep.add_argument("dir")
    rep.add_argument("--title", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    failed = []  # grid cells that failed (reproduce)
    from .data import DataError
    from .train import RunError, train

    try:
        if args.command == "train":
            cfg = train_config_from_args(args)
            if args.resume:
                cfg.out = args.resume
            last = train(cfg, resume=bool(args.resume), progress=not args.quiet)
            print(json.dumps(last))
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # A torchrun worker whose run is complete (final.pt written, process group destroyed)
                # ends here: about 1 in 50 two-process runs saw a rank abort afterwards, in the C++
                # teardown of gloo's threads at interpreter exit ("terminate called without an active
                # exception"), which turned a finished run into a failed job.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        elif args.command == "stack":
            from .train_stacked import train_stacked

            cfgs, flags = stack_configs_from_args(args.cell)
            for c in cfgs:
                c.threads = args.threads or c.threads
            for row in train_stacked(cfgs, resume=flags, progress=not args.quiet):
                print(json.dumps(row))
        elif args.command == "reproduce" and args.grid in ("study", "screen", "fair") and (args.schedule or args.iterations):
            raise ValueError(f"the {args.grid} grid has its own fixed schedule; --schedule and --iterations do not apply to it")
        elif args.command == "reproduce" and args.grid == "fair":
            from .fair import FAIR_ARCHS, run_fair

            out = args.out or "runs/fair"
            failed = run_fair(out, args.arch or list(FAIR_ARCHS), args.optimizer or ("sgd", "adam"),
                              seeds=3 if args.seeds is None else args.seeds, jobs=args.jobs, dry_run=args.dry_run,
                              data=args.data, val=args.val, precision=args.precision or "bf16", stack=args.stack,
                              only=args.only)
        elif args.command == "reproduce":
            from .experiments import build_grid, run_grid, select_cells
            from .report import write_report

            out = args.out or f"runs/{args.grid}"
            if args.schedule is None:
                args.schedule = "short"
            cells = build_grid(args.grid, out=out, schedule=args.schedule, seeds=1 if args.seeds is None else args.seeds, data=args.data,
                               init=args.init, extra=None if args.iterations is None else dict(iterations=args.iterations),
                               precision=args.precision)
            cells = select_cells(cells, optimizers=args.optimizer, only=args.only, grid=args.grid)
            failed = run_grid(cells, jobs=args.jobs, dry_run=args.dry_run, stack=args.stack)
            if not args.dry_run:
                print(f"report: {write_report(out, title=f'{args.grid} ({args.schedule} schedule)')}")
        elif args.command == "probe":
            from .probe import probe

            probe(probe_config_from_args(args))
        elif args.command == "pack":
            from .data import load_dataset
            from .packed import pack_dataset

            ds = load_dataset(args.dataset, args.data, label=args.label, image_size=args.image_size)
            info = pack_dataset(ds, args.out, quality=args.quality,
                                label=args.label if args.dataset == "cifar100" else None, progress=True)
            print(f"{args.out}: {info['train_images']} + {info['test_images']} images, {info['bytes'] / 2**20:.1f} MiB; "
                  f"mean absolute pixel error {info['train_mean_abs_error']:.3f} (train), "
                  f"{info['test_mean_abs_error']:.3f} (test) grey levels")
        elif args.command == "archive":
            from .archive import archive_runs

            print(f"{args.dst}: {archive_runs(args.src, args.dst, checkpoints=args.checkpoints, weights=args.weights)}")
        elif args.command == "report":
            from pathlib import Path

            from .report_probe import is_probe_folder

            if is_probe_folder(args.dir):  # runs of `kmeansinit probe`
                from .report_probe import write_probe_report

                print(write_probe_report(args.dir))
            elif any((d / "sweep").is_dir() for d in Path(args.dir).glob("*-*")):  # a `reproduce fair` folder
                from .report_fair import write_fair_report

                print(write_fair_report(args.dir))
            else:
                from .report import write_report

                print(write_report(args.dir, title=args.title))
        if failed:
            print(f"kmeansinit: error: {len(failed)} cells failed: {', '.join(c.name for c in failed)}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt as e:  # train saved a checkpoint first (Interrupted); 128 + signal, as shells do
        return 128 + getattr(e, "signum", 2)
    except (DataError, RunError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"kmeansinit: error: {e}", file=sys.stderr)
        return 2
