"""Every target layer's inputs in one pass through the net, for inits that set layers in forward order.

A layer-wise init (k-means layer by layer, the variance calibration) needs layer ``l``'s inputs with
layers ``1..l-1`` already at their new weights. Recomputing them from the images for each layer costs
a forward pass up to ``l`` per layer, ``O(L^2)`` layer calls in all: on MobileNetV2 (52 convs) that
recomputation was 78% of the init (benchmarks/RESULTS.md). :class:`Lockstep` instead traces the
model once with ``torch.fx`` (the target layers kept as leaves) and runs the traced graph node by node
over all chunks of images together, pausing before each target layer: the caller reads the layer's
inputs over every chunk, sets its weights, and the pass resumes from there with the new weights.
Each layer is called once per chunk (``O(L)``), on the same chunks and with the same BN batch
statistics as the recomputing path, so the inputs are the same tensors.

A model that ``torch.fx`` cannot trace (data-dependent control flow), a target called more than
once or with more than one argument, raises :class:`Untraceable`, and the caller recomputes instead.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ._model import Taps

__all__ = ["Lockstep", "Untraceable"]


class Untraceable(Exception):
    """The model cannot be stepped layer by layer; the reason is the message."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with the target layers kept as single calls (their hooks then fire)."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)


class Lockstep:
    """A traced forward pass over ``images`` in chunks of ``batch_size``, stopped before each target layer.

    Use :meth:`inputs` with target names in forward order; between two calls, change the weights of
    the layers already returned (the modules themselves: the traced graph calls them). Must be used
    under the same modes and hooks as the recomputing path (``taps`` is the init's :class:`Taps`).
    """

    def __init__(self, taps: Taps, images: Tensor, batch_size: int):
        model = taps.model
        try:
            graph = _LeafTracer({id(m) for m in taps.targets.values()}).trace(model)
        except Exception as e:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Untraceable(f"torch.fx cannot trace {type(model).__name__}: {first}") from e
        self.taps = taps
        self.nodes = list(graph.nodes)
        module_of = {id(m): n for n, m in model.named_modules()}
        self.stops = {}  # target name -> index of the node that calls it
        for i, node in enumerate(self.nodes):
            if node.op != "call_module":
                continue
            name = module_of.get(id(model.get_submodule(node.target)))
            if name in taps.targets:
                if name in self.stops:
                    raise Untraceable(f"layer {name} is called more than once in the forward pass")
                if len(node.args) != 1 or node.kwargs:
                    raise Untraceable(f"layer {name} is called with more than one argument")
                self.stops[name] = i
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            raise Untraceable(f"{type(model).__name__}.forward does not take exactly one tensor")
        # torch.fx's own Interpreter runs each node (and knows each value's last use); one env and
        # one argument iterator per chunk: the image is the first placeholder, the rest keep their
        # defaults.
        self.interp = fx.Interpreter(model, graph=graph)
        chunks = images.split(batch_size)
        self.args = [iter([c]) for c in chunks]
        self.envs: list[dict[fx.Node, object]] = [{} for _ in chunks]
        self.next = 0  # index of the next node to run

    def inputs(self, name: str) -> list[Tensor]:
        """Layer ``name``'s input for every chunk (detached; later names only, in forward order)."""
        if name not in self.stops:
            raise ValueError(f"layer {name} is not a target reached by the traced forward pass")
        stop = self.stops[name]
        if stop < self.next:
            raise ValueError(f"layer {name} was already passed; ask for layers in forward order")
        self._run_until(stop)
        arg = self.nodes[stop].args[0]
        return [env[arg].detach() for env in self.envs]

    def _run_until(self, stop: int) -> None:
        # Nothing may end the pass early: the init's Taps raise _Stop at `stop_at`.
        self.taps.stop_at = None
        interp = self.interp
        with torch.no_grad():
            while self.next < stop:
                node = self.nodes[self.next]
                for args, env in zip(self.args, self.envs):
                    interp.env, interp.args_iter = env, args
                    env[node] = interp.run_node(node)
                    for dead in interp.user_to_last_uses.get(node, ()):
                        env.pop(dead, None)
                self.next += 1
