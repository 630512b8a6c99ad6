"""Stacked cells: up to N runs of one model shape and optimizer trained as one grouped model.

``train_stacked(configs)`` does what ``train(config)`` does for each config, in one computation: the
cells' nets sit side by side along the channel axis (:mod:`kmeansinit.stacked`: convs with N times
the groups, batch norm over N times the channels, a batched linear layer), so one forward, backward
and optimizer step serve every cell. What makes each cell its own run is kept per cell: its init (and
init cache), its seed's data order, flips and crops, its loss, its optimizer state (SGD and Adam are
elementwise, so the stacked step is each cell's step), its BN statistics, and its run folder, written
in exactly ``train``'s format: config.json, init_report.json, init.pt, metrics.jsonl, checkpoint.pt
(+ .prev), final.pt. A stacked cell therefore equals the cell run alone up to float rounding
(tests/test_train_stacked.py), and any cell can be resumed alone, or in a stack with cells at the
same step.

What the cells share, and must agree on, is everything that shapes the computation or the step
(:data:`STACK_FIELDS`: model, data, optimizer, learning-rate schedule, batch size, iterations,
precision, the evaluation cadence). ``wall`` in each cell's metrics is the stack's clock: the time
this cell took, shared with the others (config.json's ``stacked_with`` names them).

A cell whose loss turns non-finite stops as a run alone does (diverged.json, its last good checkpoint
kept) and the others go on without it. Ctrl-C or SIGTERM checkpoints every cell at the current step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BatchLoader, Normalizer
from .distributed import setup, world
from .stacked import stack_models, stack_tensors, unstack_state, unstack_tensors
from .train import (CKPT, Interrupted, RunError, TrainConfig, _atomic_save, _autocast, _cached_init, _fault, _full,
                    _load_checkpoint, _Progress, _read_rows, _save_checkpoint, _write_text, build_model, load_run_config,
                    lr_at, make_optimizer, prepare_data, warn_if_emulated_bf16)

__all__ = ["train_stacked", "STACK_FIELDS", "stack_key"]

#: TrainConfig fields every cell of a stack must share: they decide the model's shape, the data, the
#: optimizer step and when the loop evaluates and saves. Cells may differ in the rest (init, its
#: options, images and cache, seed, out, tag).
STACK_FIELDS = ("dataset", "data", "download", "label", "image_size", "crop", "flip", "model", "gated", "width",
                "batch_norm", "patch_norm", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size", "iterations",
                "lr_schedule", "halve_at", "warmup", "epochs", "val", "test_every", "labels", "eval_every",
                "log_every", "checkpoint_every", "precision", "channels_last", "compile", "device")


def stack_key(cfg: TrainConfig) -> tuple:
    """Cells with equal keys can share a stack."""
    return tuple(json.dumps(getattr(cfg, f), default=str) for f in STACK_FIELDS)


@dataclass
class _Cell:
    """One run of the stack: its configuration, files, loader, and a model and optimizer of its own
    shape that hold its state whenever it is checkpointed (the stack holds it in between)."""
    cfg: TrainConfig
    out: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    loader: BatchLoader | None = None
    wall0: float = 0.0
    start: int = 0
    losses: list = field(default_factory=list)
    last_saved: int = 0
    last: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.tag or self.out.name


def _stack_optimizer(opt: torch.optim.Optimizer, stacked: nn.Module, cells: list[_Cell]) -> None:
    """Put the cells' optimizer states (momentum, Adam moments and step) into the stack's optimizer."""
    names = [n for n, _ in cells[0].model.named_parameters()]
    per_cell = [dict(zip(names, c.model.parameters())) for c in cells]
    states = [c.opt.state for c in cells]
    for name, p in stacked.named_parameters():
        got = [s.get(pc[name]) for s, pc in zip(states, per_cell)]
        if not all(got):
            if any(got):
                raise RunError("cells of one stack differ in optimizer state (some have taken steps, some not)")
            continue
        entry = {}
        for key, value in got[0].items():
            if not torch.is_tensor(value) or value.dim() == 0:  # Adam's step: the same in every cell
                entry[key] = value.clone() if torch.is_tensor(value) else value
            else:
                entry[key] = stack_tensors([{name: g[key]} for g in got], cells[0].model)[name]
        opt.state[p] = entry


def _unstack_into(stacked: nn.Module, opt: torch.optim.Optimizer, cells: list[_Cell], lr: float) -> None:
    """Copy the stack's weights, BN statistics and optimizer state into each cell's own model and optimizer."""
    like = cells[0].model
    for c, state in zip(cells, unstack_state(stacked, like, len(cells))):
        c.model.load_state_dict(state)
    own = [list(c.model.parameters()) for c in cells]
    for c in cells:
        c.opt.state.clear()
        for g in c.opt.param_groups:
            g["lr"] = lr
    for i, (name, p) in enumerate(stacked.named_parameters()):
        entry = opt.state.get(p)
        if not entry:
            continue
        split = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                split[key] = [part[name] for part in unstack_tensors({name: value}, like, len(cells))]
        for j, c in enumerate(cells):
            c.opt.state[own[j][i]] = {key: (split[key][j] if key in split else
                                            (value.clone() if torch.is_tensor(value) else value))
                                      for key, value in entry.items()}


def _build(cells: list[_Cell], device):
    """(stacked model, its optimizer holding the cells' states, the training forward: compiled with
    ``compile``; checkpoints, evaluation and unstacking use the module itself)."""
    cfg = cells[0].cfg
    stacked = stack_models([c.model for c in cells]).to(device)
    if cfg.channels_last:
        stacked = stacked.to(memory_format=torch.channels_last)
    if [n for n, _ in stacked.named_parameters()] != [n for n, _ in cells[0].model.named_parameters()]:
        raise RunError("the stacked model's parameters do not line up with a cell's")  # a stacking bug, not input
    opt = make_optimizer(cfg, stacked.parameters())
    _stack_optimizer(opt, stacked, cells)
    return stacked, opt, torch.compile(stacked) if cfg.compile else stacked


def _evaluate(stacked: nn.Module, n: int, x, y, norm: Normalizer, device, cfg: TrainConfig) -> list[tuple[float, float]]:
    """Each cell's (mean loss, accuracy) on ``x``: every cell sees the same images, in its own channels."""
    stacked.eval()
    loss, correct = [0.0] * n, [0] * n
    with torch.no_grad(), _autocast(cfg, device):
        for xb, yb in zip(x.split(1000), y.split(1000)):
            xb = norm(xb.to(device)).repeat(1, n, 1, 1)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = _full(stacked(xb)).reshape(xb.shape[0], n, -1)
            yb = yb.to(device)
            for i in range(n):
                loss[i] += float(F.cross_entropy(out[:, i], yb, reduction="sum"))
                correct[i] += int((out[:, i].argmax(1) == yb).sum())
    stacked.train()
    return [(loss[i] / len(y), correct[i] / len(y)) for i in range(n)]


def _check_shared(cfgs: list[TrainConfig]) -> None:
    for f in STACK_FIELDS:
        values = {json.dumps(getattr(c, f), default=str) for c in cfgs}
        if len(values) > 1:
            raise ValueError(f"cells of one stack must share {f}; got {', '.join(sorted(values))} "
                             f"({', '.join(c.out for c in cfgs)})")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise ValueError(f"two cells of one stack write the same run folder: {sorted(o for o in outs if outs.count(o) > 1)[0]}")


def train_stacked(cfgs: list[TrainConfig], *, resume: list[bool] | bool = False, progress: bool = True,
                  dataset=None) -> list[dict]:
    """Run (or resume) the cells ``cfgs`` as one stacked model; return each cell's last metrics row.

    ``resume``: per cell (or for all): continue the run saved in ``cfg.out`` (its config.json is used,
    as ``train --resume`` does). Cells resumed together must be at the same checkpointed step.
    """
    if not cfgs:
        raise ValueError("train_stacked needs at least one cell")
    flags = list(resume) if isinstance(resume, (list, tuple)) else [bool(resume)] * len(cfgs)
    if len(flags) != len(cfgs):
        raise ValueError(f"resume has {len(flags)} flags for {len(cfgs)} cells")
    cfgs = [load_run_config(c.out) if r else c for c, r in zip(cfgs, flags)]
    for c in cfgs:
        c.validate()
    _check_shared(cfgs)
    for c, r in zip(cfgs, flags):
        out = Path(c.out)
        if not r and ((out / CKPT).exists() or (out / "final.pt").exists()):
            raise RunError(f"{out}: already holds a run; resume it or choose another out")
    if world()[1] > 1:
        raise ValueError("stacked cells run in one process; under torchrun use kmeansinit train")
    cfg0 = cfgs[0]
    info, device = setup(cfg0.device)
    if cfg0.threads:
        torch.set_num_threads(cfg0.threads)
    ds, pool, norm, total = prepare_data(cfg0, dataset)  # the cells share every field that decides these
    log = _Progress(total, 0, progress)
    warn_if_emulated_bf16(cfg0, device, log.line)  # precision is shared by every cell of a stack
    names = ", ".join(Path(c.out).name for c in cfgs)

    cells: list[_Cell] = []
    for cfg, r in zip(cfgs, flags):
        out = Path(cfg.out)
        torch.manual_seed(cfg.seed)  # the module defaults a run alone draws before its init
        model = build_model(cfg, ds.num_classes, ds.train_x.shape[1]).to(device)
        cell = _Cell(cfg, out, model, make_optimizer(cfg, model.parameters()))
        cell.loader = BatchLoader(ds.train_x, ds.train_y, cfg.batch_size, norm, seed=cfg.seed, flip=cfg.flip,
                                  crop=cfg.crop, device=device)
        out.mkdir(parents=True, exist_ok=True)
        ck = None
        if r:
            for stale in out.glob("*.tmp"):
                stale.unlink(missing_ok=True)
            ck = _load_checkpoint(out, "cpu", log.line)
        if ck is not None:
            model.load_state_dict(ck["model"])
            cell.opt.load_state_dict(ck["optimizer"])
            cell.start = cell.last_saved = ck["step"]
            cell.wall0, cell.losses = ck["wall"], list(ck.get("losses", []))
            rows = [row for row in _read_rows(out / "metrics.jsonl", log.line) if row["step"] <= cell.start]
            _write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
            log.line(f"resumed {out} at step {cell.start}/{total}")
        else:
            (out / "config.json").write_text(json.dumps(
                dataclasses.asdict(cfg) | {"resolved_iterations": total, "normalizer": norm.state_dict(),
                                           "world_size": 1, "stacked_with": [str(c.out) for c in cfgs]}, indent=2))
            (out / "metrics.jsonl").write_text("")
            report = _cached_init(model, cfg, pool, norm, device, progress)
            _fault("init")
            report.save(out / "init_report.json")
            _atomic_save(model.state_dict(), out / "init.pt")
            _save_checkpoint(out, model, cell.opt, 0, 0.0)
            log.line(f"{cell.name}: {str(report).splitlines()[0]}")
        cells.append(cell)
    steps = {c.start for c in cells}
    if len(steps) > 1:
        raise RunError("cells of one stack must resume at the same step; got "
                       + ", ".join(f"{c.out}: {c.start}" for c in cells) + "; run them one by one")
    step = steps.pop()  # total when every cell's last checkpoint is its end (a kill before final.pt)
    stacked, opt, forward = _build(cells, device)
    if log.bar is not None:
        log.bar.update(step - log.bar.n)
    log.line(f"stack of {len(cells)} cells ({names}) from step {step}/{total}")

    interrupted = {"flag": 0}
    handlers = {sig: signal.signal(sig, lambda signum, frame: interrupted.__setitem__("flag", signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    diverged: list[str] = []
    stacked.train()
    try:
        while step < total and cells:
            lr = lr_at(step, cfg0.lr, total, cfg0.halve_at, cfg0.lr_schedule, cfg0.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            batches = [c.loader.batch(step) for c in cells]
            xb = torch.cat([b[0] for b in batches], dim=1)
            if cfg0.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg0, device):
                logits = _full(forward(xb)).reshape(xb.shape[0], len(cells), -1)
                parts = [F.cross_entropy(logits[:, i], b[1]) for i, b in enumerate(batches)]
            # Each cell's gradient is that of its own loss: the terms share no parameters.
            opt.zero_grad(set_to_none=True)
            torch.stack(parts).sum().backward()
            lvs = [float(p.detach().double()) for p in parts]
            stop = interrupted["flag"]
            dead = [i for i, lv in enumerate(lvs) if not math.isfinite(lv)]
            for i in dead:  # as a run alone: diverged.json, the last good checkpoint kept, no step taken
                c = cells[i]
                (c.out / "diverged.json").write_text(json.dumps(dict(step=step + 1, loss=str(lvs[i]), lr=lr)))
                log.line(f"{c.out}: loss became {lvs[i]} at step {step + 1}; the last good checkpoint "
                         f"(step {c.last_saved}) is kept; the other cells go on")
                diverged.append(f"{c.out} (step {step + 1})")
            opt.step()  # the dead cells' step is dropped with them just below
            step += 1
            _fault("step")
            if dead:
                keep = [i for i in range(len(cells)) if i not in dead]
                if not keep:
                    cells = []
                    break
                _unstack_into(stacked, opt, cells, lr)
                cells, lvs = [cells[i] for i in keep], [lvs[i] for i in keep]
                stacked, opt, forward = _build(cells, device)
            elapsed = time.perf_counter() - t0
            for c, lv in zip(cells, lvs):
                c.losses.append(lv)
            log.step(" ".join(f"{lv:.3f}" for lv in lvs))
            is_test = cfg0.val and cfg0.test_every and step % cfg0.test_every == 0
            is_eval = step % cfg0.eval_every == 0 or step == total or bool(is_test)
            if step % cfg0.log_every == 0 or is_eval:
                evals = {}
                if is_eval and cfg0.val:
                    evals["val"] = _evaluate(stacked, len(cells), ds.val_x, ds.val_y, norm, device, cfg0)
                if is_eval and (not cfg0.val or step == total or is_test):
                    evals["test"] = _evaluate(stacked, len(cells), ds.test_x, ds.test_y, norm, device, cfg0)
                for i, c in enumerate(cells):
                    row = dict(step=step, epoch=step / c.loader.per_epoch, lr=lr,
                               train_loss=sum(c.losses) / len(c.losses), wall=c.wall0 + elapsed)
                    c.losses = []
                    for k, per in evals.items():
                        row[f"{k}_loss"], row[f"{k}_acc"] = per[i]
                    if evals:
                        log.line(f"{c.name}: step {step}/{total} train_loss {row['train_loss']:.4f} "
                                 + " ".join(f"{k}_loss {row[k + '_loss']:.4f} {k}_acc {row[k + '_acc']:.4f}"
                                            for k in evals) + f" ({row['wall']:.0f}s)")
                    _write_text(c.out / "metrics.jsonl", json.dumps(row) + "\n", append=True)
                    c.last = row
            if step % cfg0.checkpoint_every == 0 or step == total or stop:
                _unstack_into(stacked, opt, cells, lr)
                for c in cells:  # metrics rows up to `step` are on disk before the checkpoint covering them
                    _save_checkpoint(c.out, c.model, c.opt, step, c.wall0 + time.perf_counter() - t0, c.losses)
                    c.last_saved = step
            if stop:
                log.line(f"{signal.Signals(stop).name} at step {step}: checkpoints saved; "
                         f"rerun the stack (or each cell with kmeansinit train --resume) to continue")
                raise Interrupted(stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close()
    for c in cells:  # each cell's own model holds its last step (checkpointed, or loaded at total)
        _atomic_save({k: v.contiguous() for k, v in c.model.state_dict().items()}, c.out / "final.pt")
    if diverged:
        raise RunError(f"loss became non-finite in {', '.join(diverged)}; "
                       f"{len(cells)} other cell{'s' if len(cells) != 1 else ''} finished")
    return [c.last for c in cells]
