"""Strategy ``lure``: Learn, Unlearn and Relearn over a stream of mega-batches.

Public API:

* :func:`build_lure` -- the builder the registry calls with flat arguments.
* :class:`LureStrategy`, :class:`LurePredictor`, :class:`LureConfig`, :class:`MegaBatch`.
* :func:`apply_reset` (the resets, usable on any backbone), :func:`later_layer_modules`.
* The option vocabularies: :data:`RESETS`, :data:`IMPORTANCES`, :data:`KEEP_SCOPES`, :data:`AUGMENTS`,
  :data:`REPLAY_MODES`.
"""

from __future__ import annotations

import torch

from server.engine.lure.config import (
    AUGMENTS,
    IMPORTANCES,
    KEEP_SCOPES,
    REPLAY_MODES,
    RESETS,
    LureConfig,
    ReplaySpec,
)
from server.engine.lure.predictor import LurePredictor
from server.engine.lure.resets import ResetOutcome, apply_reset, later_layer_modules
from server.engine.lure.strategy import LureStrategy, MegaBatch

__all__ = [
    "AUGMENTS",
    "IMPORTANCES",
    "KEEP_SCOPES",
    "REPLAY_MODES",
    "RESETS",
    "LureConfig",
    "LurePredictor",
    "LureStrategy",
    "MegaBatch",
    "ReplaySpec",
    "ResetOutcome",
    "apply_reset",
    "build_lure",
    "later_layer_modules",
]


def build_lure(
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    cifar_stem: bool = True,
    width: int = 0,
    replay: str = "full",
    reset: str = "lure",
    importance: str = "snip",
    keep_fraction: float = 0.8,
    importance_fraction: float = 0.2,
    keep_scope: str = "global",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    epochs: int = 10,
    batch_size: int = 64,
    val_fraction: float = 0.1,
    shrink: float = 0.4,
    perturb: float = 0.1,
    augment: str = "auto",
    unlearn_fraction: float = 0.2,
    relearn_epochs: int = 5,
    snapshot_every: int = 1,
) -> LureStrategy:
    """Build the ``lure`` strategy (class-incremental: predict with ``task=None``).

    Defaults follow the LURE paper (SGD momentum 0.9, weight decay 1e-4, lr 0.1 with steps at 40% and
    80% of the epochs, batch 64, 90/10 split, SNIP on 20% of the mega-batch, keep 80% of the weights,
    ranked globally as in SNIP).

    Args:
        backbone: ``mlp``, ``cnn``, ``resnet18`` or ``resnet50``.
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes of the single output space.
        device: where the model lives and trains; data arrives on the CPU.
        seed: root of every random draw.
        cifar_stem: ResNets only; see ``backbones.build_backbone``.
        width: ``mlp`` hidden width or ``cnn`` base channels; 0 = the backbone's default.
        replay: ``full`` (train on the new mega-batch and every retained one; needed for exact
            unlearning), ``buffer:N`` (retain a reservoir sample of N samples per mega-batch) or
            ``none``.
        reset: before each mega-batch from the second on: ``lure`` (importance-guided
            re-initialization), ``warm-start`` (none), ``shrink-perturb`` (θ ← λθ + σ·θ_fresh), ``llf``
            (re-initialize the later layers and the head), ``fc`` (re-initialize the head).
        importance: ``snip``, ``fisher``, ``magnitude`` or ``random`` (``lure`` reset only).
        keep_fraction: weights kept by the ``lure`` reset, in (0, 1].
        importance_fraction: share of the mega-batch's training split scored, in (0, 1].
        keep_scope: ``global`` (one ranking over all weights, the paper) or ``layer``.
        lr: learning rate when a Learn call leaves it at 0 (the server's lure default is 0.1).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        epochs: epochs per mega-batch when a Learn call leaves it at 0.
        batch_size: batch size when a Learn call leaves it at 0.
        val_fraction: validation share of each mega-batch, in [0, 1).
        shrink: shrink-perturb λ, in [0, 1].
        perturb: shrink-perturb σ, >= 0.
        augment: ``auto`` (random crop and flip for RGB images of at least 16x16), ``on`` or ``off``.
        unlearn_fraction: share of weights re-initialized by ``approximate`` unlearning, in (0, 1].
        relearn_epochs: epochs on the retained data after ``approximate`` unlearning, >= 0.
        snapshot_every: keep the model taken before every k-th mega-batch (``replay=full``): memory and
            checkpoint size of the snapshots / k, at the price of replaying up to k - 1 more
            mega-batches in an exact unlearning. 1 = one snapshot per mega-batch.

    Returns:
        A fresh strategy at version 0.

    Raises:
        ValueError: naming the option and its allowed values, for any invalid option.
    """
    config = LureConfig(
        backbone=backbone,
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        seed=int(seed),
        cifar_stem=bool(cifar_stem),
        width=int(width),
        replay=ReplaySpec.parse(replay),
        reset=reset,
        importance=importance,
        keep_fraction=float(keep_fraction),
        importance_fraction=float(importance_fraction),
        keep_scope=keep_scope,
        lr=float(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        epochs=int(epochs),
        batch_size=int(batch_size),
        val_fraction=float(val_fraction),
        shrink=float(shrink),
        perturb=float(perturb),
        augment=augment,
        unlearn_fraction=float(unlearn_fraction),
        relearn_epochs=int(relearn_epochs),
        snapshot_every=int(snapshot_every),
    )
    return LureStrategy(config, torch.device(device))
