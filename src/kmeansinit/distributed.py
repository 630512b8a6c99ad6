"""torch.distributed glue for ``torchrun``: process group set-up, sharding helpers, and a SyncBatchNorm
that also works on CPU (gloo), where ``nn.SyncBatchNorm`` refuses to run.

Launch: ``torchrun --nproc_per_node=N -m kmeansinit train ...`` (add ``--nnodes``/``--rdzv-*`` as
torchrun allows). Every rank holds the whole dataset in memory and takes its shard of each global
batch; gradients are averaged by DistributedDataParallel, so the global batch and the update are
those of a single process. BN statistics are per shard unless ``--sync-bn`` is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = ["DistInfo", "setup", "cleanup", "world", "all_reduce_", "all_gather_object", "broadcast_object",
           "GlobalBatchNorm", "convert_sync_batchnorm", "TIMEOUT_ENV"]

#: Seconds a collective may wait for the other ranks before it fails (default 900): a rank that is
#: lost or out of step ends the run with an error instead of a hang.
TIMEOUT_ENV = "KMEANSINIT_DIST_TIMEOUT"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "auto":
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    elif device == "cuda":
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        from datetime import timedelta

        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "900")))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    if size > 1:
        return DistInfo(dist.get_rank(), dist.get_world_size(), local), dev
    return DistInfo(), dev


def cleanup() -> None:
    if dist.is_initialized():
        # Every rank reaches the end before any tears its gloo context down: rank 0 is still writing
        # final.pt when the others get here (one run of the two-process test saw rank 1 abort in
        # teardown). A peer that already failed makes the barrier raise; its error is the one to see.
        try:
            dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (itself in one process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    size = world()[1]
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, differentiable, on any backend (gloo included).

    Train mode: per-channel sum and sum of squares are all-reduced with autograd
    (``torch.distributed.nn.functional.all_reduce``), so forward and backward equal one process
    normalizing the whole global batch. Eval mode: the running statistics, as ``nn.BatchNorm``.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world()[1] > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        stats = torch.cat([xf.sum(dims), xf.square().sum(dims), x.new_tensor([x.numel() / x.shape[1]], dtype=torch.float32)])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BN layer normalizes over the global batch: nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    if any(p.is_cuda for p in model.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            # The same Parameter and buffer objects, so an optimizer built before the swap still holds them.
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child)
    return model
