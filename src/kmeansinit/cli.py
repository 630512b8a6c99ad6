"""Command line: ``kmeansinit train``; every bad input ends in one line naming what is wrong."""
from __future__ import annotations

import argparse
import json
import sys

from .init import METHODS

__all__ = ["main", "build_parser", "train_config_from_args"]


def _option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default=d.dataset)
    p.add_argument("--data", default=d.data, help="dataset folder or archive (default %(default)s)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR from the official source into --data")
    p.add_argument("--label", choices=["fine", "coarse"], default=d.label, help="CIFAR-100 labels")
    p.add_argument("--image-size", type=int, default=None, help="resize image-folder images to N x N")
    p.add_argument("--crop", type=int, default=d.crop, help="random-crop padding in pixels (0: flips only, the paper)")
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--gated", action="store_true", help="GatedConv2d in every conv layer")
    p.add_argument("--width", type=float, default=d.width, help="width multiplier (3 = the paper's 'vanilla x3')")
    p.add_argument("--init", choices=list(METHODS), default=d.init)
    p.add_argument("--init-images", type=int, default=d.init_images, help="images for the init; 0 = all")
    p.add_argument("--init-split", choices=["train", "test"], default=d.init_split,
                   help="draw init images from train (default, no leakage) or test (as the paper)")
    p.add_argument("--init-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the init, e.g. steps=20 or cosine_weight=0 (repeatable)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
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


def train_config_from_args(a: argparse.Namespace):
    from .train import TrainConfig

    names = {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names}
    kw["init_options"] = dict(a.init_option)
    return TrainConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmeansinit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one network (the paper's recipe by default)")
    add_train_arguments(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (other options are ignored)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("reproduce", help="run one of the paper's grids and write its report")
    r.add_argument("grid", choices=["table2", "table3", "ablation", "study", "screen"])
    r.add_argument("--schedule", choices=["paper", "short", "tiny"], default="short",
                   help="paper: 75,000 iterations; short: 1,200 (see README)")
    r.add_argument("--seeds", type=int, default=1)
    r.add_argument("--iterations", type=int, default=None,
                   help="override the schedule's iteration count (lr still halves at 2/3)")
    r.add_argument("--out", default=None, help="grid folder (default runs/<grid>)")
    r.add_argument("--data", default="../shared/data")
    r.add_argument("--init", default=None, help="table3: the init of every cell (default he)")
    r.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    r.add_argument("--dry-run", action="store_true", help="print each cell's kmeansinit train command")
    rep = sub.add_parser("report", help="write report.md, curves.png, filters.png from run folders")
    rep.add_argument("dir")
    rep.add_argument("--title", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .train import RunError, train

    try:
        if args.command == "train":
            cfg = train_config_from_args(args)
            if args.resume:
                cfg.out = args.resume
            last = train(cfg, resume=bool(args.resume), progress=not args.quiet)
            print(json.dumps(last))
        elif args.command == "reproduce":
            from .experiments import build_grid, run_grid
            from .report import write_report

            out = args.out or f"runs/{args.grid}"
            cells = build_grid(args.grid, out=out, schedule=args.schedule, seeds=args.seeds, data=args.data,
                               init=args.init, extra=None if args.iterations is None else dict(iterations=args.iterations))
            failed = run_grid(cells, jobs=args.jobs, dry_run=args.dry_run)
            if not args.dry_run:
                print(f"report: {write_report(out, title=f'{args.grid} ({args.schedule} schedule)')}")
            if failed:
                print(f"kmeansinit: error: {len(failed)} cells failed: {', '.join(c.name for c in failed)}", file=sys.stderr)
                return 1
        elif args.command == "report":
            from .report import write_report

            print(write_report(args.dir, title=args.title))
        return 0
    except KeyboardInterrupt:
        return 130
    except (DataError, RunError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"kmeansinit: error: {e}", file=sys.stderr)
        return 2
