"""Targeted dropout of the weakest free units during a learn (seed on dynamic model size, section 4.2.1).

The seed's compression, after Gomez et al., *Learning sparse networks using targeted dropout*:

1. a unit's importance is the L2 norm of its incoming weights;
2. the bottom γ % are the candidates, each dropped with probability α at every training step;
3. the candidates are chosen again every epoch;
4. the trained model is pruned to its top units.

Adapted to AGS-CL: the candidates are the weakest γ % of the *free* units (Ω = 0) of each prunable
node layer. A unit that an earlier task made important (Ω > 0) is never a candidate: dropping it
would change the features that task's frozen weights compute with, and AGS-CL never lets a task
take it over anyway. γ is a share of the free units, not of the layer: with most of a layer
important, a share of the layer would take every unit the new task could train. The incoming
"weights" are the node's whole incoming group (weight row, bias, BatchNorm gain and shift), the same
group the proximal step shrinks. Dropped units output zero, without the usual 1/(1 − α) rescaling
of the others: pruning a unit later also just removes its output, and the network should already
compute without it. After the learn the final candidates are pruned from the task: their outgoing
weights are zeroed and they get no share of its Ω, so they stay free for later tasks, and capacity
pruning removes them from the network when an unlearn leaves more free units than the reserve.

Layers whose units cannot be cut from their consumers (a ResNet's residual stream,
``NodeLayer.reinit`` False) are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn

from server.engine.agscl.nodes import NodeLayer, group_matrix, module_at


def weakest_free(
    trunk: nn.Module, layers: tuple[NodeLayer, ...], omega: Mapping[str, torch.Tensor], percent: float
) -> dict[str, torch.Tensor]:
    """Layer name → bool ``[nodes]``: the ``percent`` % of its free units (Ω = 0) with the smallest incoming norm.

    ``floor(percent / 100 · free)`` units per prunable layer (ties broken by index, lower first); none
    in layers that cannot be pruned.
    """
    chosen: dict[str, torch.Tensor] = {}
    for layer in layers:
        free = (omega[layer.name] == 0).cpu()
        picked = torch.zeros_like(free)
        count = math.floor(percent / 100 * int(free.sum()))
        if layer.reinit and count > 0:
            norms = group_matrix(trunk, layer).norm(dim=1).cpu().double()
            norms[~free] = math.inf
            # A stable sort on the norms: equal norms (e.g. exact zeros) are taken in index order.
            order = torch.sort(norms, stable=True).indices
            picked[order[:count]] = True
        chosen[layer.name] = picked
    return chosen


class TargetedDropout:
    """Drops each candidate unit's output with probability ``rate`` in every forward pass while attached.

    Use as a context manager around the training epochs; :meth:`target` sets the candidates (every
    epoch). Per sample and unit, like dropout; the draws come from ``generator``, so a learn is
    reproducible.

    Args:
        trunk: the network being trained.
        layers: its node layers (the hook sits on each layer's BatchNorm, or producer, output: the
            ReLU that follows maps a zeroed pre-activation to zero).
        rate: α, the drop probability of a candidate.
        generator: CPU generator of the draws.
    """

    def __init__(
        self, trunk: nn.Module, layers: tuple[NodeLayer, ...], rate: float, generator: torch.Generator
    ) -> None:
        self._trunk = trunk
        self._layers = layers
        self._rate = rate
        self._generator = generator
        self._candidates: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def target(self, candidates: Mapping[str, torch.Tensor]) -> None:
        """Drop the units ``candidates`` (layer name → bool ``[nodes]``) from now on."""
        self._candidates = {name: mask.clone() for name, mask in candidates.items() if bool(mask.any())}

    def attach(self, trunk: nn.Module) -> None:
        """(Re)attach the hooks to ``trunk`` (after growth replaced its modules)."""
        self.close()
        self._trunk = trunk
        for layer in self._layers:
            module = module_at(trunk, layer.norm or layer.name)
            self._handles.append(module.register_forward_hook(self._hook(layer.name)))

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def drop(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
            candidates = self._candidates.get(name)
            if candidates is None or not module.training or self._rate <= 0:
                return None
            draws = torch.rand(output.shape[0], candidates.numel(), generator=self._generator)  # [b, nodes]
            dropped = (draws < self._rate) & candidates[None, :]
            keep = (~dropped).to(output.device, output.dtype)
            while keep.dim() < output.dim():
                keep = keep[..., None]  # [b, nodes, 1, 1] for conv channels
            return output * keep

        return drop

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TargetedDropout:
        self.attach(self._trunk)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
