"""When to grow during a learn, and how the optimizer follows (seed on dynamic model size, DEN).

The seed grows the network "when the loss for a new task [stays above] a specified threshold"
(its section 2.2, after Dynamically Expandable Networks: if ``L_t > τ`` then expand). Lethe checks
the mean training loss of each epoch: when it has stayed above ``grow_loss`` for ``grow_patience``
epochs in a row, the hidden layers grow by ``grow_percent`` *during* the learn, and training goes on
with the wider network; the count starts again after a growth. Growing mid-task rather than
retraining the task from scratch (DEN's second pass) keeps one pass over the data: the grown
network computes exactly what it computed before (see :mod:`server.engine.agscl.capacity`), so
what the epochs so far learned is kept, and the optimizer's state is extended with zeros for the
new weights (:func:`extend_adam`), as for a parameter that has not had a gradient yet.

Used by ``agscl`` and, with capacity on, by ``finetune``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def growth_option_errors(
    *, grow_percent: object, grow_loss: object, grow_patience: object, max_width_factor: object
) -> list[str]:
    """Problems with the growth options, each naming its option and the allowed values (empty when fine)."""

    def finite(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    errors = []
    if not (finite(grow_percent) and 0 < grow_percent <= 400):  # type: ignore[operator]
        errors.append(f"grow_percent must be in (0, 400], got {grow_percent!r}")
    if not (finite(grow_loss) and grow_loss >= 0):  # type: ignore[operator]
        errors.append(f"grow_loss must be a finite number >= 0 (0 = never grow on the loss), got {grow_loss!r}")
    if not (isinstance(grow_patience, int) and not isinstance(grow_patience, bool) and grow_patience >= 1):
        errors.append(f"grow_patience must be an integer >= 1 (epochs), got {grow_patience!r}")
    if not (finite(max_width_factor) and max_width_factor >= 1):  # type: ignore[operator]
        errors.append(f"max_width_factor must be >= 1, got {max_width_factor!r}")
    return errors


@dataclass
class LossTrigger:
    """Decides, after each epoch, whether the learn loss has stayed above ``threshold`` long enough to grow.

    Attributes:
        threshold: τ; 0 disables the trigger.
        patience: epochs in a row the epoch's mean loss must exceed τ.
        above: epochs in a row so far (reset by a growth and by an epoch at or below τ).
    """

    threshold: float
    patience: int
    above: int = 0

    def update(self, epoch_loss: float, *, epochs_left: int) -> bool:
        """Record one epoch's mean loss; True when the layers should grow now.

        Never True when no epoch is left to train the grown units (``epochs_left`` = 0).
        """
        if self.threshold <= 0:
            return False
        self.above = self.above + 1 if epoch_loss > self.threshold else 0
        if self.above >= self.patience and epochs_left > 0:
            self.above = 0
            return True
        return False


@torch.no_grad()
def extend_adam(
    optimizer: torch.optim.Adam, old: Sequence[nn.Parameter], new: Sequence[nn.Parameter]
) -> torch.optim.Adam:
    """A fresh Adam over ``new`` (same hyperparameters) whose state is ``optimizer``'s, extended with zeros.

    ``new[i]`` is ``old[i]`` grown: every dimension at least as large, the old values in the leading
    corner (what :func:`server.engine.agscl.capacity.grow` produces). The moment estimates of the old
    entries are copied there and the new entries start at zero, as for a weight without a gradient
    yet; the step count is kept.

    Raises:
        ValueError: if the parameter lists do not pair up, or a new parameter is smaller than its old one.
    """
    if len(old) != len(new):
        raise ValueError(f"cannot extend Adam over {len(old)} parameters to {len(new)}")
    defaults = optimizer.defaults
    grown = torch.optim.Adam(
        list(new),
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
    )
    for before, after in zip(old, new, strict=True):
        if before.dim() != after.dim() or any(a < b for a, b in zip(after.shape, before.shape, strict=True)):
            raise ValueError(f"parameter of shape {tuple(before.shape)} cannot grow to {tuple(after.shape)}")
        state = optimizer.state.get(before)
        if not state:
            continue
        corner = tuple(slice(0, size) for size in before.shape)
        extended: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == "step" or value.shape != before.shape:
                extended[key] = value.clone()
            else:
                padded = torch.zeros_like(after)
                padded[corner] = value
                extended[key] = padded
        grown.state[after] = extended
    return grown
