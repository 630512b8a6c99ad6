"""The paper's training recipe: a ``TrainConfig`` dataclass, a resumable run folder, and the loop.

A run folder holds ``config.json`` (the resolved configuration), ``init_report.json``,
``metrics.jsonl`` (one row per log point), ``checkpoint.pt`` and ``checkpoint.prev.pt`` (the last two
checkpoints: model, optimizer, iteration, RNG state; each written to a temp file and renamed) and, at
the end, ``final.pt`` (model weights). Every file is read back with ``torch.load(weights_only=True)``:
tensors and plain data only, so a planted pickle is refused, never run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BatchLoader, Normalizer, load_dataset
from .distributed import all_reduce_, broadcast_object, cleanup, convert_sync_batchnorm, setup, world
from .init import DATA_FREE, RUNS_KMEANS, check_options, initialize_, seeded_options
from .models import MODELS, create_model, fit_whitening_

__all__ = ["TrainConfig", "train", "lr_at", "RunError", "Interrupted", "RECIPES", "VAL_SEED", "split_validation",
           "load_state"]

CKPT, PREV = "checkpoint.pt", "checkpoint.prev.pt"

#: The recipe each model family's users expect; ``kmeansinit train`` fills the options a user did
#: not give from here. "paper": sec. 4 of Zhou. "zoo": the usual CIFAR recipe of ResNet/VGG/MobileNet
#: papers (He et al. 2016): SGD with Nesterov momentum, weight decay 5e-4, 4-pixel random crops and
#: flips, lr 0.1 with cosine decay.
RECIPES = {
    "paper": dict(optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-5, crop=0,
                  lr_schedule="paper"),
    "zoo": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, crop=4,
                lr_schedule="cosine"),
}

#: The validation split (``--val N``) is drawn with this seed, whatever the run's seed: every run
#: of a grid holds out the same images, so their validation accuracies compare.
VAL_SEED = 20_170_000
LABEL_SEED = 20_110_000  # the labelled subset of --labels (Coates & Ng 2011's year, as VAL_SEED is the paper's)



class RunError(RuntimeError):
    """A run that cannot go on (NaN loss, a config mismatch on resume); earlier results are kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint of the current step was saved; ``kmeansinit train --resume`` goes on."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_FAULT_HITS: dict[str, int] = {}


def _fault(point: str) -> None:
    """Fault injection for the kill tests: ``KMEANSINIT_FAULT=point:n`` SIGKILLs this process the n-th
    time it passes ``point`` (init, save, eval, step). Without the variable: nothing."""
    spec = os.environ.get("KMEANSINIT_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == point:
        _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
        if _FAULT_HITS[point] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def load_state(path: Path, map_location="cpu"):
    """``torch.load`` of a run folder's or init cache's file: tensors and plain data only.

    Raises :class:`RunError` naming the file when it is cut short, garbage, or holds pickled objects
    (which ``weights_only`` refuses to run).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        raise RunError(f"{path}: refused: it holds pickled objects, not only tensors and plain data "
                       f"({str(e).strip().splitlines()[0][:120]})") from e
    except Exception as e:  # truncated zip, garbage bytes, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RunError(f"{path}: unreadable ({first})") from e


@dataclass
class TrainConfig:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | folder
    data: str = "../shared/data"
    download: bool = False
    label: str = "fine"  # CIFAR-100 fine or coarse labels
    image_size: int | None = None
    crop: int = 0  # random-crop padding (0 = the paper: flips only)
    flip: bool = True
    # model
    model: str = "paper"  # paper | resnet20 | resnet56 | vgg11 | mobilenetv2 (kmeansinit.models.MODELS)
    gated: bool = False
    width: float = 1.0
    batch_norm: bool = True  # False: the net without BN layers (--no-batch-norm; create_model's NO_BN)
    patch_norm: bool = False  # coates only: contrast-normalize each patch before the filters (--patch-norm)
    # init
    init: str = "kmeans"
    init_images: int = 256  # images for data-dependent inits; 0 = the whole training set
    init_split: str = "train"  # train (no test leakage) | test (the paper used 256 test images)
    init_options: dict = field(default_factory=dict)
    init_cache: str | None = None  # folder of finished inits, shared by runs that differ only after init
    # optimization: the paper's recipe
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adam
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-5
    batch_size: int = 128
    iterations: int = 75_000
    lr_schedule: str = "paper"  # paper (halve once) | step (/10 at 1/2 and 3/4) | cosine | constant
    halve_at: float = 2 / 3  # paper schedule: lr halves after this fraction of iterations (50k of 75k)
    warmup: int = 0  # iterations of linear warm-up from lr / warmup to lr
    epochs: float | None = None  # if set, overrides iterations
    val: int = 0  # training images held out (seed VAL_SEED) for validation; the test set is for final numbers
    test_every: int = 0  # with val: evaluate the test set every this many iterations (0: only at the end)
    labels: int = 0  # train on this many labelled images (class-balanced, seed LABEL_SEED); 0: all. Inits see all
    # bookkeeping
    seed: int = 0
    eval_every: int = 1000
    log_every: int = 100
    checkpoint_every: int = 500
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = True
    sync_bn: bool = False  # under torchrun: BN over the global batch (else per rank's shard)
    compile: bool = False  # torch.compile the training model (pays off on long GPU runs)
    threads: int = 0  # 0 = all cores
    device: str = "auto"
    out: str = "runs/run"
    tag: str = ""  # free label for grids and reports

    def resolved_iterations(self, train_size: int) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * (train_size // self.batch_size)))
        return self.iterations

    def validate(self) -> None:
        checks = [
            (self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam, got {self.optimizer!r}"),
            (self.model in MODELS, f"model must be one of {', '.join(MODELS)}, got {self.model!r}"),
            (not self.patch_norm or self.model == "coates", f"patch_norm is offered for model coates only, got {self.model!r}"),
            (self.lr_schedule in SCHEDULE_NAMES, f"lr_schedule must be one of {', '.join(SCHEDULE_NAMES)}, "
                                                 f"got {self.lr_schedule!r}"),
            (self.warmup >= 0 and self.val >= 0 and self.test_every >= 0 and self.labels >= 0,
             "warmup, val, test_every and labels must be >= 0"),
            (not (self.nesterov and self.optimizer != "sgd"), "nesterov applies to optimizer sgd only"),
            (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}"),
            (self.init_split in ("train", "test"), f"init_split must be train or test, got {self.init_split!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.halve_at <= 1, f"halve_at must be in (0, 1], got {self.halve_at}"),
            (self.eval_every >= 1 and self.log_every >= 1 and self.checkpoint_every >= 1,
             "eval_every, log_every and checkpoint_every must be >= 1"),
            (self.width > 0, f"width must be > 0, got {self.width}"),
            (self.init_images >= 0, f"init_images must be >= 0, got {self.init_images}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        # Before any data is read: a misspelt or mistyped --init-option fails at once, by name.
        check_options(self.init, init_options(self))


SCHEDULE_NAMES = ("paper", "step", "cosine", "constant")


def lr_at(step: int, base: float, total: int, halve_at: float = 2 / 3, schedule: str = "paper",
          warmup: int = 0) -> float:
    """Learning rate of (0-based) ``step`` of ``total``.

    ``paper``: ``base`` until ``halve_at * total`` iterations, then ``base / 2`` (Zhou, sec. 4).
    ``step``: divided by 10 after 1/2 and again after 3/4 of the run (He et al. 2016).
    ``cosine``: ``base (1 + cos(pi t / total)) / 2`` (Loshchilov & Hutter 2017), t counted after warm-up.
    ``constant``: ``base``. The first ``warmup`` steps ramp linearly up to the schedule's value.
    """
    if schedule == "paper":
        lr = base if step < round(halve_at * total) else base / 2
    elif schedule == "step":
        lr = base * (0.1 ** ((step >= round(total / 2)) + (step >= round(3 * total / 4))))
    elif schedule == "cosine":
        span = max(1, total - warmup)
        lr = base * 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0), span) / span))
    elif schedule == "constant":
        lr = base
    else:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {schedule!r}")
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


def labelled_subset(ds, n: int):
    """``ds`` with its training set cut to ``n`` labelled images, as equal a number per class as ``n``
    allows, drawn with :data:`LABEL_SEED` (the same images for every run and seed)."""
    if not 0 < n <= len(ds.train_y):
        raise ValueError(f"labels must be between 1 and {len(ds.train_y)} (training images), got {n}")
    g = torch.Generator().manual_seed(LABEL_SEED)
    order = torch.randperm(len(ds.train_y), generator=g)
    # Round robin over classes in a random order: class c's k-th image comes before any class's (k+1)-th.
    rank = torch.empty_like(order)
    y = ds.train_y[order]
    for c in range(ds.num_classes):
        idx = (y == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx)) * ds.num_classes + c
    keep = order[rank.argsort()[:n]].sort().values
    out = dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
    for name in ("val_x", "val_y"):  # a validation split (plain attributes) comes along
        if hasattr(ds, name):
            setattr(out, name, getattr(ds, name))
    return out


def split_validation(ds, n: int):
    """``ds`` with ``n`` training images (drawn with :data:`VAL_SEED`) moved into ``val_x``/``val_y``."""
    if not 0 < n < len(ds.train_y):
        raise ValueError(f"val must be between 1 and {len(ds.train_y) - 1} (training images), got {n}")
    perm = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(VAL_SEED))
    val, rest = perm[:n].sort().values, perm[n:].sort().values
    out = dataclasses.replace(ds, train_x=ds.train_x[rest], train_y=ds.train_y[rest])
    out.val_x, out.val_y = ds.train_x[val], ds.train_y[val]
    return out


def _atomic_save(obj, path: Path, previous: Path | None = None) -> None:
    """Write ``obj`` to a temp file and rename it onto ``path`` (first moving ``path`` to ``previous``).

    A kill at any moment leaves the old file or the new one, never half of one; a write error (a
    full disk) leaves the files that were there and raises :class:`RunError` naming ``path``.
    """
    # Per-process temporary name: two runs may write the same file (a shared init cache).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        _fault("save")
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or ["?"])[0]
        raise RunError(f"{path}: could not be written ({why}); the files already there are kept") from e


def _evaluate(model: nn.Module, x, y, norm: Normalizer, device, cfg: TrainConfig) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad(), _autocast(cfg, device):
        for xb, yb in zip(x.split(1000), y.split(1000)):
            xb = norm(xb.to(device))
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = _full(model(xb))
            _fault("eval")
            yb = yb.to(device)
            total_loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    model.train()
    return total_loss / len(y), correct / len(y)


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) raised to float32; float32 and float64 kept as they are (the
    float64 equality tests of stacked training run the whole loop in float64)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 arithmetic units (the ``avx512_bf16`` or ``amx_bf16`` flag); None where
    ``cpuinfo`` cannot be read (not Linux). Without them bf16 autocast is emulated: on an AVX2-only AMD
    EPYC a bf16 training step took 6.5-14x its fp32 one (benchmarks/RESULTS.md, "Zoo training-step time")."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def warn_if_emulated_bf16(cfg: TrainConfig, device, line) -> None:
    """Say (through ``line``) when bf16 is asked for on a CPU that would emulate it; shared by
    :func:`train` and stacked training, the two places a run starts."""
    if cfg.precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        line("kmeansinit: warning: --precision bf16 on a CPU without bf16 units (no avx512_bf16 or "
             "amx_bf16 flag): it is emulated, many times slower than fp32 here; --precision fp32 is faster")


def _autocast(cfg: TrainConfig, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _read_rows(path: Path, log=None) -> list[dict]:
    """The rows of a metrics.jsonl; a corrupt line is skipped and named (through ``log``)."""
    if not path.exists():
        return []
    rows, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError
            rows.append(row)
        except ValueError:
            bad.append(i)
    if bad and log is not None:
        log(f"{path}: line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} corrupt; skipped")
    return rows


def newest_readable_checkpoint(out: Path, device="cpu", log=lambda line: None) -> tuple[Path, dict] | None:
    """(path, contents) of the newest readable checkpoint of ``out`` (checkpoint.pt, else
    checkpoint.prev.pt), or None if there is none; an unreadable one is named in one line and passed
    over, and ``RunError`` says so when every one present is unreadable."""
    present = [out / n for n in (CKPT, PREV) if (out / n).exists()]
    reasons = []
    for path in present:
        try:
            ck = load_state(path, map_location=device)
            if not isinstance(ck, dict) or not {"model", "optimizer", "step", "wall", "rng"} <= set(ck):
                raise RunError(f"{path}: unreadable (not a kmeansinit checkpoint)")
        except RunError as e:
            reasons.append(str(e).replace(f"{out}/", ""))
            if path.name == CKPT and len(present) > 1:
                log(f"{e}; trying the previous checkpoint")
            continue
        if path.name == PREV:
            log(f"resuming from {path} (step {ck['step']})")
        return path, ck
    if present:
        raise RunError(f"{out}: no readable checkpoint: {'; '.join(reasons)}; start the run again with a new --out")
    return None


def _load_checkpoint(out: Path, device, log) -> dict | None:
    """The contents of :func:`newest_readable_checkpoint`, or None if there is none."""
    hit = newest_readable_checkpoint(out, device, log)
    return None if hit is None else hit[1]


class _Progress:
    def __init__(self, total: int, start: int, enabled: bool, quiet: bool = False):
        self.bar = None
        self.total = total
        self.quiet = quiet
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, info: str | None = None):
        if self.bar is not None:
            self.bar.update(1)
            if info:
                self.bar.set_postfix_str(info, refresh=False)

    def line(self, text: str):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    return create_model(cfg.model, num_classes=num_classes, width=cfg.width, gated=cfg.gated, in_channels=in_channels,
                        batch_norm=cfg.batch_norm, patch_norm=cfg.patch_norm)


def load_run_config(out: str | Path) -> TrainConfig:
    """The configuration saved in ``out/config.json`` by a started run (what ``--resume`` continues)."""
    out = Path(out)
    path = out / "config.json"
    if not path.exists():
        raise RunError(f"{out}: no config.json here; nothing to resume")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: corrupt ({e}); the run cannot be resumed without its configuration") from e
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in names} | {"out": str(out)})


def prepare_data(cfg: TrainConfig, dataset=None):
    """(training data, init pool, normalizer, iterations) of a run: the dataset (or ``dataset``), its
    validation split, its labelled subset. With ``labels`` training sees the labelled subset while the
    init and the normalization see every training image, unlabelled (few labels, many images)."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data, download=cfg.download,
                                                          label=cfg.label, image_size=cfg.image_size)
    if cfg.val:
        ds = split_validation(ds, cfg.val)
    pool = ds
    if cfg.labels:
        ds = labelled_subset(ds, cfg.labels)
    return ds, pool, Normalizer.fit(pool.train_x), cfg.resolved_iterations(len(ds.train_y))


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """SGD with momentum (optionally Nesterov) or Adam, with the run's weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dataset=None) -> dict:
    """Run (or, with ``resume``, continue) one training run into ``cfg.out``; return the last metrics row."""
    cfg.validate()
    out = Path(cfg.out)
    ckpt_path, cfg_path, metrics_path = out / CKPT, out / "config.json", out / "metrics.jsonl"
    if resume:
        # The run's own settings come from its folder; the threads are this machine's, so a --threads
        # given now (non-zero) is kept rather than silently replaced by the saved value.
        threads = cfg.threads
        cfg = load_run_config(out)
        cfg.threads = threads or cfg.threads
    elif ckpt_path.exists() or (out / "final.pt").exists():
        raise RunError(f"{out}: already holds a run; use --resume to continue it or choose another --out")
    info, device = setup(cfg.device)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    main = info.main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds, pool, norm, total = prepare_data(cfg, dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds.num_classes, ds.train_x.shape[1]).to(device)
    opt = make_optimizer(cfg, model.parameters())
    loader = BatchLoader(ds.train_x, ds.train_y, cfg.batch_size, norm, seed=cfg.seed, flip=cfg.flip,
                         crop=cfg.crop, device=device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = _Progress(total, 0, progress and main, quiet=not main)
    warn_if_emulated_bf16(cfg, device, log.line)
    start_step = 0
    wall0 = 0.0
    pending: list[float] = []
    ck = None
    if resume:
        if main:
            for stale in out.glob("*.tmp"):  # a write cut short by a kill
                stale.unlink(missing_ok=True)
        # Rank 0 reads the checkpoint and every rank resumes from exactly that state: ranks that read
        # the file themselves could see different steps (a file replaced meanwhile) and then wait on
        # each other forever. An unreadable one stops every rank with the same line.
        try:
            ck = _load_checkpoint(out, "cpu", log.line) if main else None
            err = None
        except RunError as e:
            ck, err = None, str(e)
        ck, err = broadcast_object((ck, err))
        if err:
            raise RunError(err)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        start_step, wall0 = ck["step"], ck["wall"]
        pending = list(ck.get("losses", []))
        if main:
            rows = [r for r in _read_rows(metrics_path, log.line) if r["step"] <= start_step]
            _write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        log.line(f"resumed {out} at step {start_step}/{total}")
    else:
        if resume:
            log.line(f"{out}: no checkpoint yet; starting from the beginning")
        if main:
            cfg_path.write_text(json.dumps(dataclasses.asdict(cfg) | {"resolved_iterations": total,
                                                                       "normalizer": norm.state_dict(),
                                                                       "world_size": info.world_size}, indent=2))
            metrics_path.write_text("")
        report = _cached_init(model, cfg, pool, norm, device, progress and main, main)
        _fault("init")
        if main:
            report.save(out / "init_report.json")
            _atomic_save(model.state_dict(), out / "init.pt")
            _save_checkpoint(out, model, opt, 0, 0.0)
        log.line(str(report).splitlines()[0])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model  # checkpoints, evaluation and final weights use the unwrapped model
    if info.enabled:
        # After the init: it shares its chunks over ranks itself, and BN there must stay per chunk.
        if cfg.sync_bn:
            model = raw = convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    shard = slice(info.rank * cfg.batch_size // info.world_size, (info.rank + 1) * cfg.batch_size // info.world_size)
    if log.bar is not None:
        log.bar.update(start_step - log.bar.n)
    model.train()
    # Ctrl-C and SIGTERM (what schedulers send) save a checkpoint of the current step and stop.
    interrupted = {"flag": 0}
    handlers = {sig: signal.signal(sig, lambda signum, frame: interrupted.__setitem__("flag", signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter() - wall0
    sleep = float(os.environ.get("KMEANSINIT_TEST_STEP_SLEEP", "0"))  # lets tests kill a tiny run mid-way
    losses = pending
    last = {}
    last_saved = start_step
    board = _tensorboard(out) if main else None
    try:
        step = start_step
        while step < total:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, total, cfg.halve_at, cfg.lr_schedule, cfg.warmup)
            xb, yb = loader.batch(step)
            xb, yb = xb[shard], yb[shard]
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg, device):
                loss = F.cross_entropy(_full(model(xb)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lv = loss.detach().double()
            stop = interrupted["flag"]
            if info.enabled:
                # Every rank sees the global loss and any rank's signal, so all stop at the same step.
                both = all_reduce_(torch.stack([lv, torch.tensor(float(stop), dtype=torch.float64)]))
                lv, stop = both[0] / info.world_size, int(both[1]) and (stop or signal.SIGTERM)
            lv = float(lv)
            if not math.isfinite(lv):
                if main:  # a grid counts a diverged run as finished (at chance): rerunning it repeats the NaN
                    (out / "diverged.json").write_text(json.dumps(dict(step=step + 1, loss=str(lv), lr=opt.param_groups[0]["lr"])))
                raise RunError(f"{out}: loss became {lv} at step {step + 1}; the last good checkpoint "
                               f"(step {last_saved}) is kept")
            opt.step()
            step += 1
            _fault("step")
            losses.append(lv)
            if sleep:
                time.sleep(sleep)
            log.step(f"loss {lv:.3f}")
            # With a validation split the test set has its own period, which need not divide eval_every.
            is_test = cfg.val and cfg.test_every and step % cfg.test_every == 0
            is_eval = step % cfg.eval_every == 0 or step == total or bool(is_test)
            if main and (step % cfg.log_every == 0 or is_eval):
                row = dict(step=step, epoch=step / loader.per_epoch, lr=opt.param_groups[0]["lr"],
                           train_loss=sum(losses) / len(losses), wall=time.perf_counter() - t0)
                losses = []
                if is_eval:
                    shown = []
                    if cfg.val:
                        row["val_loss"], row["val_acc"] = _evaluate(raw, ds.val_x, ds.val_y, norm, device, cfg)
                        shown.append("val")
                    if not cfg.val or step == total or is_test:
                        row["test_loss"], row["test_acc"] = _evaluate(raw, ds.test_x, ds.test_y, norm, device, cfg)
                        shown.append("test")
                    log.line(f"step {step}/{total} train_loss {row['train_loss']:.4f} "
                             + " ".join(f"{k}_loss {row[k + '_loss']:.4f} {k}_acc {row[k + '_acc']:.4f}" for k in shown)
                             + f" ({row['wall']:.0f}s)")
                _write_text(metrics_path, json.dumps(row) + "\n", append=True)
                if board is not None:
                    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "lr"):
                        if key in row:
                            board.add_scalar(key, row[key], step)
                    board.flush()
                last = row
            if step % cfg.checkpoint_every == 0 or step == total or stop:
                if main:  # metrics rows up to `step` are on disk before the checkpoint that covers them
                    _save_checkpoint(out, raw, opt, step, time.perf_counter() - t0, losses)
                last_saved = step
            if stop:
                name = signal.Signals(stop).name
                log.line(f"{name} at step {step}: checkpoint saved; continue with: kmeansinit train --resume {out}")
                raise Interrupted(stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close()
        if board is not None:
            board.close()
    if main:
        _atomic_save({k: v.contiguous() for k, v in raw.state_dict().items()}, out / "final.pt")
    cleanup()
    return last


def _tensorboard(out: Path):
    """A SummaryWriter into ``out/tensorboard`` when the ``tensorboard`` extra is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _save_checkpoint(out: Path, model, opt, step: int, wall: float, losses=()) -> None:
    """checkpoint.pt, the one before it kept as checkpoint.prev.pt (a fallback if the newest is damaged).

    ``losses``: the training losses since the last metrics row, so that the first row after a
    resume averages over the same steps as in an uninterrupted run.
    """
    _atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, wall=wall,
                      rng={"torch": torch.get_rng_state()}, losses=list(losses)), out / CKPT, previous=out / PREV)


def _write_text(path: Path, text: str, append: bool = False) -> None:
    """Write (or append) ``text``; a write error is one line naming the file, earlier files kept."""
    try:
        with open(path, "a" if append else "w") as f:
            f.write(text)
    except OSError as e:
        raise RunError(f"{path}: could not be written ({e.strerror or e}); the last checkpoint is kept") from e


def init_key(cfg: TrainConfig, ds) -> str:
    """What determines an init's result: model, init and its options, the images it sees, the seed.

    Options are resolved against the preset, so ``kmeans-paper`` and ``kmeans-paper`` with its own
    ``cosine_weight=100`` spelled out share one init.
    """
    import hashlib

    from .init import PRESETS

    options = {**PRESETS.get(cfg.init, {}), **cfg.init_options}
    fields = dict(dataset=cfg.dataset, data=str(Path(cfg.data).resolve()), label=cfg.label, image_size=cfg.image_size,
                  gated=cfg.gated, width=cfg.width, classes=ds.num_classes, init=cfg.init, init_images=cfg.init_images,
                  init_split=cfg.init_split, init_options=options, seed=cfg.seed, n_train=len(ds.train_y))
    # Added only when not the default, so the keys of caches made before these options stay valid.
    if cfg.model != "paper":
        fields["model"] = cfg.model
    if cfg.val:
        fields["val"] = cfg.val
    if not cfg.batch_norm:
        fields["batch_norm"] = False
    if cfg.patch_norm:  # the same filters, but LSUV's and kmeans-variance's scales see other outputs
        fields["patch_norm"] = True
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_init(model: nn.Module, cfg: TrainConfig, ds, norm: Normalizer, device, progress: bool, main: bool = True):
    """Run the init, or load it from ``cfg.init_cache`` when an identical one was done before."""
    from .init import InitReport

    if not cfg.init_cache:
        return _init(model, cfg, ds, norm, device, progress)
    cache = Path(cfg.init_cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{cfg.init}-{init_key(cfg, ds)}.pt"
    # Runs of a grid that share an init wait for the one computing it instead of repeating it.
    # Under torchrun all ranks take part in one init, so only single-process runs lock.
    with _file_lock(path.with_name(path.name + ".lock"), enabled=world()[1] == 1):
        if path.exists():
            blob = load_state(path, map_location=device)
            model.load_state_dict(blob["model"])
            return InitReport.from_dict(blob["report"])
        report = _init(model, cfg, ds, norm, device, progress)
        if main:
            _atomic_save(dict(model=model.state_dict(), report=report.to_dict()), path)
        return report


@contextmanager
def _file_lock(path: Path, enabled: bool = True):
    """An exclusive advisory lock on ``path`` (released by the OS if the holder dies); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: runs may repeat a shared init, which is slower but correct
        yield
        return
    if not enabled:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _init(model: nn.Module, cfg: TrainConfig, ds, norm: Normalizer, device, progress: bool):
    g = torch.Generator().manual_seed(cfg.seed)
    src = ds.train_x if cfg.init_split == "train" else ds.test_x
    n = src.shape[0] if cfg.init_images == 0 else min(cfg.init_images, src.shape[0])
    idx = torch.randperm(src.shape[0], generator=g)[:n]
    # Unlabelled images, normalized exactly as the training batches are.
    images = torch.cat([norm(part.to(device)) for part in src[idx].split(1024)]) if n else None
    # A net's own data-fitted layer (coates-triangle's patch whitening) first: every init sees its output.
    fit_whitening_(model, images, seed=cfg.seed)
    needs = cfg.init not in DATA_FREE
    return initialize_(model, cfg.init, images if needs else None, **init_options(cfg, progress))


def init_options(cfg: TrainConfig, progress: bool = False) -> dict:
    """The keyword options a run passes to ``initialize_``: its ``init_options`` and its seed."""
    options = seeded_options(cfg.init, cfg.init_options, cfg.seed)  # a control's k-means copy gets its own cell's seed
    if cfg.init in RUNS_KMEANS:
        options.setdefault("progress", progress)
    return options
