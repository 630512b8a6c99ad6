"""Walking an arbitrary nn.Module: find its layers, capture their inputs, and leave it as it was."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..objectives import SUPPORTED_LAYERS

__all__ = ["Taps", "find_layers", "check_images", "preserved_state", "batchnorm_train_mode", "kept_modes"]


class _Stop(Exception):
    """Raised in a hook to end a forward pass once the layer we need has its input."""


def check_images(images, *, name: str = "images", min_count: int = 1) -> Tensor:
    """Validate an image tensor for data-dependent inits; return it (not copied)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (got {images.dtype}); convert and normalize uint8 images first")
    if images.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one more, got shape {tuple(images.shape)}")
    if images.shape[0] < min_count:
        raise ValueError(f"{name} holds {images.shape[0]} samples; at least {min_count} needed")
    # In slices: a mask of the whole set would be as large as the images (50,000 CIFAR images: 150 MB).
    if not all(bool(torch.isfinite(part).all()) for part in images.split(1024)):
        raise ValueError(f"{name} contains NaN or inf values")
    return images


def find_layers(model: nn.Module, include_linear: bool = False, layers=None) -> dict[str, nn.Module]:
    """Supported layers of ``model`` by name, in registration order (forward order is found later).

    ``layers``: None (every conv, plus linear layers when ``include_linear``), or a list of module names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kinds = SUPPORTED_LAYERS if include_linear else tuple(t for t in SUPPORTED_LAYERS if t is not nn.Linear)
    found = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    if layers is not None and not isinstance(layers, int):
        names = list(layers)
        all_supported = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
        missing = [n for n in names if n not in all_supported]
        if missing:
            raise ValueError(f"layers {missing} are not supported layers of the model; choose from {list(all_supported)}")
        found = {n: all_supported[n] for n in names}
    if not found:
        what = "conv or linear" if include_linear else "conv (nn.Conv1d/2d/3d, GatedConv2d)"
        raise ValueError(f"model {type(model).__name__} has no supported {what} layer to initialize")
    return found


class Taps:
    """Forward pre-hooks recording each target layer's input; optionally ending the forward at one layer."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], outputs: bool = False):
        self.model = model
        self.targets = targets
        self.capture_outputs = outputs
        self.outputs: dict[str, Tensor] = {}
        self.inputs: dict[str, Tensor] = {}
        self.order: list[str] = []
        self.stop_at: str | None = None
        self._handles = []

    def __enter__(self):
        for name, m in self.targets.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
            if self.capture_outputs:
                # A gated layer's objective lives in its pre-gate outputs, not in its output.
                point = getattr(m, "pre_gate_tap", m)
                self._handles.append(point.register_forward_hook(self._out_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(module, args):
            self.inputs[name] = args[0]
            if name not in self.order:
                self.order.append(name)
            if name == self.stop_at and not self.capture_outputs:
                raise _Stop

        return hook

    def _out_hook(self, name):
        def hook(module, args, out):
            self.outputs[name] = out
            if name == self.stop_at:
                raise _Stop
            # The model goes on with a copy, so in-place ops after the layer cannot touch ours.
            return out.clone()

        return hook

    def run(self, x: Tensor, overrides: dict[str, Tensor] | None = None, stop_at: str | None = None) -> dict[str, Tensor]:
        """Forward ``x`` (with parameters/buffers replaced by ``overrides``); return captured inputs."""
        self.inputs, self.outputs = {}, {}
        self.stop_at = stop_at
        try:
            if overrides:
                functional_call(self.model, overrides, (x,), strict=False)
            else:
                self.model(x)
        except _Stop:
            pass
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"images of shape {tuple(x.shape)} do not fit the model: {first}") from e
        return self.inputs


def forward_order(model: nn.Module, targets: dict[str, nn.Module], sample: Tensor) -> list[str]:
    """Target names in the order the forward pass calls them; layers never called are dropped with a warning."""
    with Taps(model, targets) as taps, torch.no_grad():
        taps.run(sample)
    never = [n for n in targets if n not in taps.order]
    if never:
        warnings.warn(f"layers {never} are not called in the forward pass and are left as they are")
    if not taps.order:
        raise ValueError(f"no target layer of {type(model).__name__} is reached in the forward pass")
    return list(taps.order)


@contextmanager
def kept_modes(model: nn.Module):
    """Every module's own train/eval mode restored on exit (``model.train(mode)`` would set one mode for all)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextmanager
def batchnorm_train_mode(model: nn.Module):
    """Eval mode everywhere (no dropout) except BN layers, which use batch statistics; modes restored after."""
    with kept_modes(model):
        model.eval()
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
        yield


@contextmanager
def preserved_state(model: nn.Module, keep: set[str]):
    """Restore every parameter and buffer not named in ``keep`` (and all train/eval modes) on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if k not in keep}
    with kept_modes(model):
        try:
            yield
        finally:
            with torch.no_grad():
                state = model.state_dict(keep_vars=True)
                for k, v in saved.items():
                    state[k].copy_(v)
