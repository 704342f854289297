"""Capacity growth for ``finetune`` (seed on dynamic model size, section 4.2.2), optional.

``finetune`` has no notion of a free unit (every unit serves every task), so it grows as the seed
describes it: before every new task every hidden layer of an ``mlp`` or ``cnn`` trunk grows by
``grow_percent`` (old weights copied, new ones initialized as at construction), and also during a
learn when the training loss stays above ``grow_loss`` (:mod:`server.engine.agscl.growth`), never
beyond ``max_width_factor`` times the configured width. New units feed no existing unit and no
existing head (zero weights), so a growth changes no prediction; training then uses them freely.
There is no pruning: deleting a task's head frees no unit of the shared trunk. The node layers and
the resizing are AGS-CL's (:mod:`server.engine.agscl.capacity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from server.engine.agscl import capacity
from server.engine.agscl.growth import growth_option_errors
from server.engine.agscl.nodes import NodeLayer, node_layers, width_of

#: Values of finetune's ``capacity`` option.
FINETUNE_CAPACITY_MODES: tuple[str, ...] = ("off", "on")

#: Backbones whose trunk can grow.
GROWABLE_BACKBONES: tuple[str, ...] = ("mlp", "cnn")


@dataclass(frozen=True)
class FinetuneCapacity:
    """Validated growth options of ``finetune``.

    Attributes:
        capacity: ``off`` (fixed width, the default) or ``on``.
        grow_percent: k, the percentage every hidden layer grows by (before each new task, and on the loss).
        grow_loss: τ: also grow during a learn when the epoch's mean loss stayed above it for
            ``grow_patience`` epochs in a row; 0 = never on the loss.
        grow_patience: epochs in a row above ``grow_loss`` before a growth.
        max_width_factor: hidden layers never grow beyond this multiple of the configured width.
    """

    capacity: str = "off"
    grow_percent: float = 25.0
    grow_loss: float = 0.5
    grow_patience: int = 10
    max_width_factor: float = 8.0

    @property
    def on(self) -> bool:
        """Whether the trunk grows."""
        return self.capacity == "on"

    def errors(self, backbone: str, retain_training_data: bool) -> list[str]:
        """Problems with these options for ``backbone``, each naming its option (empty when fine)."""
        errors = []
        if self.capacity not in FINETUNE_CAPACITY_MODES:
            errors.append(f"capacity must be one of {', '.join(FINETUNE_CAPACITY_MODES)}, got {self.capacity!r}")
        if self.on and backbone not in GROWABLE_BACKBONES:
            errors.append(
                f"capacity = 'on' needs a backbone whose trunk can grow ({', '.join(GROWABLE_BACKBONES)}), "
                f"got {backbone!r}; use capacity = 'off'"
            )
        if self.on and retain_training_data:
            errors.append(
                "capacity = 'on' cannot be combined with retain_training_data = true: records forgetting rolls the "
                "trunk back to a copy of another width; set one of them off"
            )
        return errors + growth_option_errors(
            grow_percent=self.grow_percent,
            grow_loss=self.grow_loss,
            grow_patience=self.grow_patience,
            max_width_factor=self.max_width_factor,
        )

    def as_dict(self) -> dict[str, object]:
        """The options as plain values (part of the strategy's configuration)."""
        return {
            "capacity": self.capacity,
            "grow_percent": self.grow_percent,
            "grow_loss": self.grow_loss,
            "grow_patience": self.grow_patience,
            "max_width_factor": self.max_width_factor,
        }


class TrunkGrowth:
    """Grows a finetune trunk with its heads; knows the node layers and the configured widths.

    Args:
        options: the growth options.
        trunk: the trunk as built (its widths are the configured ones).
        backbone: its backbone name.
    """

    def __init__(self, options: FinetuneCapacity, trunk: nn.Module, backbone: str) -> None:
        self.options = options
        self.layers: tuple[NodeLayer, ...] = node_layers(trunk, backbone) if options.on else ()
        self._initial = {layer.name: width_of(trunk, layer) for layer in self.layers}

    def widths(self, trunk: nn.Module) -> list[int]:
        """Current widths of the node layers (empty without capacity)."""
        return [width_of(trunk, layer) for layer in self.layers]

    def extra(self, trunk: nn.Module) -> dict[str, int]:
        """Units each layer gets in one growth: ``grow_percent`` of its width, up to the maximum."""
        extra = {}
        for layer in self.layers:
            width = width_of(trunk, layer)
            limit = math.floor(self._initial[layer.name] * self.options.max_width_factor)
            extra[layer.name] = max(0, min(math.ceil(width * self.options.grow_percent / 100), limit - width))
        return extra

    def grow(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Linear],
        template: nn.Linear,
        extra: Mapping[str, int],
        seed: int,
    ) -> tuple[dict[str, nn.Linear], nn.Linear]:
        """Add ``extra`` units per layer to ``trunk`` (in place); return the grown heads and template.

        Every existing unit is treated as important (Ω > 0 for AGS-CL's growth): the weights from new
        units into it are zero, as are the heads' columns for them, so the function of every task is
        unchanged. The template's new columns (and every other new weight) are drawn from ``seed``.
        """
        names = list(heads)
        omega = {layer.name: torch.ones(width_of(trunk, layer)) for layer in self.layers}
        grown = capacity.grow(
            trunk,
            self.layers,
            extra,
            [heads[name] for name in names],
            template,
            omega,
            torch.Generator().manual_seed(seed),
        )
        return dict(zip(names, grown, strict=False)), grown[-1]

    def reshape(self, trunk: nn.Module, widths: list[int]) -> None:
        """Give ``trunk`` (in place) the node-layer ``widths`` of a saved state, values to be loaded.

        Raises:
            ValueError: if the widths do not fit these layers.
        """
        if len(widths) != len(self.layers):
            raise ValueError(f"finetune state has widths {widths} for {len(self.layers)} growable layers")
        if widths != self.widths(trunk):
            capacity.reshape(trunk, self.layers, dict(zip((layer.name for layer in self.layers), widths, strict=True)))
