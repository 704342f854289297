"""Strategy ``agscl``: AGS-CL (adaptive group sparsity), with data-free unlearning and capacity growth.

Public API: :func:`build_agscl` (the builder the registry calls), :class:`AgsclStrategy`,
:class:`AgsclPredictor` and :class:`AgsclConfig`.
"""

from __future__ import annotations

import torch

from server.engine.agscl.config import CAPACITY_MODES, UNLEARN_METHODS, AgsclConfig
from server.engine.agscl.predictor import AgsclPredictor
from server.engine.agscl.strategy import AgsclStrategy

__all__ = [
    "CAPACITY_MODES",
    "UNLEARN_METHODS",
    "AgsclConfig",
    "AgsclPredictor",
    "AgsclStrategy",
    "build_agscl",
]


def build_agscl(
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    cifar_stem: bool = True,
    width: int = 0,
    mu: float = 10.0,
    lamb: float = 1000.0,
    eta: float = 0.9,
    rho: float = 0.3,
    prox_every_epoch: bool = True,
    release_share: float = 1.0,
    amnesia_epochs: int = 5,
    amnesia_learning_rate: float = 1e-3,
    amnesia_ewc: float = 100.0,
    amnesia_replay: float = 1.0,
    capacity: str = "auto",
    grow_percent: float = 25.0,
    grow_loss: float = 0.5,
    grow_patience: int = 10,
    dropout_percent: float = 25.0,
    dropout_rate: float = 0.5,
    min_free_fraction: float = 0.25,
    prune: bool = True,
    max_width_factor: float = 8.0,
    retain_training_data: bool = False,
) -> AgsclStrategy:
    """Build the ``agscl`` strategy.

    Args:
        backbone: ``mlp``, ``cnn``, ``resnet18`` or ``resnet50`` (see ``agscl.nodes`` for what a node is in each).
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes over all tasks.
        device: where the model lives and trains; data arrives on the CPU.
        seed: seeds the initialization and every random draw of every operation.
        cifar_stem: ResNets only; see ``backbones.build_backbone``.
        width: ``mlp`` hidden width or ``cnn`` base channels; 0 = the backbone's default.
        mu: μ, group-lasso weight on unimportant nodes (the paper's 10).
        lamb: λ, weight of the pull of important nodes toward their previous weights, times their
            importance Ω (searched per data set in the paper; 1000 on permuted digits, where 100 let the
            first tasks drift and 10000 gave the same accuracy; see docs/reproduction-agscl.md).
        eta: η, exponential averaging of Ω across tasks (paper: 0.9).
        rho: ρ, probability that a free node's incoming weights are re-initialized after a task (paper: 0.3).
        prox_every_epoch: the proximal step once per epoch (the paper); False = after every Adam step.
        release_share: ``release`` unlearning frees the nodes of which the forgotten task holds at least
            this share of Ω; 1 (default) = only nodes no other live task activates, which leaves the other
            tasks' training-set outputs exactly as they were (0.5 released a third of the units on split digits
            and took the retained task from 90 to 58 %).
        amnesia_epochs: epochs of ``amnesia`` unlearning over the forgotten task's retained data.
        amnesia_learning_rate: Adam learning rate of ``amnesia``.
        amnesia_ewc: weight of ``amnesia``'s EWC penalty (diagonal Fisher of the retained tasks).
        amnesia_replay: weight of ``amnesia``'s replay cross-entropy on the retained tasks' data.
        capacity: ``auto`` or ``on`` (the same: grow and prune the resizable node layers, on every backbone) or
            ``off`` (fixed width). In a ResNet only the convs inside each block resize (a basic block's first
            conv, a bottleneck's first two); the residual-stream widths (stem, each block's last conv, the
            downsample) stay fixed, since their channels are shared with the identity path.
        grow_percent: k, the percentage every resizable layer grows by when free units run out (or the loss stays
            above ``grow_loss``).
        grow_loss: τ; the resizable layers also grow during a learn when the epoch's mean training loss stays above τ
            for ``grow_patience`` epochs in a row (the seed's DEN trigger); 0 = never on the loss.
        grow_patience: epochs in a row the training loss must stay above ``grow_loss`` before a growth.
        dropout_percent: γ, targeted dropout: the weakest γ % (smallest incoming norm) of each layer's free units,
            never one with importance > 0, are dropped during training and pruned from the task after it (they
            stay free); 0 = off.
        dropout_rate: α, the probability that a targeted unit is dropped at each training step.
        min_free_fraction: grow before a new task when a resizable layer has fewer than this share of units free
            (importance 0).
        prune: after an unlearn, prune free units beyond a reserve of ``grow_percent`` per layer, never below
            the configured width.
        max_width_factor: resizable layers never grow beyond this multiple of the configured width.
        retain_training_data: ``learn`` returns ``Report(retain=data)`` so the server keeps each task's
            training data, which unlearn method ``amnesia`` needs. Not model state.

    Returns:
        A fresh strategy at version 0.

    Raises:
        ValueError: for an invalid option (all problems at once, each naming its option) or backbone configuration.
    """
    config = AgsclConfig(
        backbone=backbone,
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        seed=int(seed),
        cifar_stem=bool(cifar_stem),
        width=int(width),
        mu=_number(mu),
        lamb=_number(lamb),
        eta=_number(eta),
        rho=_number(rho),
        prox_every_epoch=prox_every_epoch,
        release_share=_number(release_share),
        amnesia_epochs=amnesia_epochs,
        amnesia_learning_rate=_number(amnesia_learning_rate),
        amnesia_ewc=_number(amnesia_ewc),
        amnesia_replay=_number(amnesia_replay),
        capacity=str(capacity),
        grow_percent=_number(grow_percent),
        grow_loss=_number(grow_loss),
        grow_patience=grow_patience,
        dropout_percent=_number(dropout_percent),
        dropout_rate=_number(dropout_rate),
        min_free_fraction=_number(min_free_fraction),
        prune=prune,
        max_width_factor=_number(max_width_factor),
        retain_training_data=bool(retain_training_data),
    )
    return AgsclStrategy(config, torch.device(device))


def _number(value: object) -> float:
    """``value`` as a float when it is a number; otherwise unchanged, for the configuration to report it."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value  # type: ignore[return-value]
