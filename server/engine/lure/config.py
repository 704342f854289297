"""Validated configuration of the LURE strategy.

The builder (:func:`server.engine.lure.build_lure`) takes flat keyword arguments; they are checked
once here and frozen, so the rest of the package never re-validates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.engine.backbones import BACKBONES

#: Reset applied before each new mega-batch (from the second on).
RESETS: tuple[str, ...] = ("lure", "warm-start", "shrink-perturb", "llf", "fc")
#: Connection-importance criteria of the ``lure`` reset.
IMPORTANCES: tuple[str, ...] = ("snip", "fisher", "magnitude", "random")
#: Whether the keep fraction is applied over all weights at once (the paper) or per layer.
KEEP_SCOPES: tuple[str, ...] = ("global", "layer")
#: Data augmentation switch; ``auto`` augments RGB images of at least 16x16 pixels.
AUGMENTS: tuple[str, ...] = ("auto", "on", "off")
#: Replay modes, ``buffer:N`` with N a positive integer.
REPLAY_MODES: tuple[str, ...] = ("full", "buffer:N", "none")


@dataclass(frozen=True)
class ReplaySpec:
    """A parsed ``replay`` option.

    Attributes:
        mode: ``full``, ``buffer`` or ``none``.
        buffer_size: samples kept per mega-batch in ``buffer`` mode, else 0.
    """

    mode: str
    buffer_size: int = 0

    @classmethod
    def parse(cls, text: str) -> ReplaySpec:
        """Parse ``full``, ``none`` or ``buffer:N``.

        Raises:
            ValueError: naming the option and the allowed values.
        """
        if text in ("full", "none"):
            return cls(text)
        if text.startswith("buffer:"):
            size = text.removeprefix("buffer:")
            if size.isdigit() and int(size) > 0:
                return cls("buffer", int(size))
        raise ValueError(f"replay must be one of {', '.join(REPLAY_MODES)} (N a positive integer), got {text!r}")

    def __str__(self) -> str:
        return f"buffer:{self.buffer_size}" if self.mode == "buffer" else self.mode


@dataclass(frozen=True)
class LureConfig:
    """Everything that shapes a :class:`~server.engine.lure.strategy.LureStrategy`.

    Attributes:
        backbone: backbone name (see :data:`BACKBONES`).
        input_shape: shape of one sample, e.g. ``(1, 8, 8)`` or ``(3, 32, 32)``.
        num_classes: size of the single, class-incremental output space.
        seed: root of every random draw (initialization, splits, shuffles, resets).
        cifar_stem: 3x3 stride-1 first convolution without max-pool for ResNets on small images.
        width: backbone width override; 0 keeps the backbone's default.
        replay: ``full``, ``buffer:N`` or ``none``.
        reset: what happens to the weights before each new mega-batch (see :data:`RESETS`).
        importance: importance criterion of the ``lure`` reset (see :data:`IMPORTANCES`).
        keep_fraction: fraction of weights the ``lure`` reset keeps (paper: 0.8).
        importance_fraction: fraction of the new mega-batch's training split used to score importance (paper: 0.2).
        keep_scope: ``global`` ranks all weights together (the paper, as SNIP); ``layer`` keeps the fraction per layer.
        lr: default learning rate when a Learn call leaves it at 0.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        epochs: default epochs per mega-batch when a Learn call leaves it at 0.
        batch_size: default batch size when a Learn call leaves it at 0.
        val_fraction: validation share of each mega-batch (paper: 0.1).
        lr_milestones: fractions of the epochs at which the learning rate is multiplied by ``lr_gamma``
            (paper: epochs 20 and 40 of 50, i.e. 0.4 and 0.8).
        lr_gamma: step-schedule factor.
        shrink: shrink-perturb λ.
        perturb: shrink-perturb σ (scale of the fresh-initialization noise).
        augment: ``auto``, ``on`` or ``off``.
        unlearn_fraction: fraction of weights the ``approximate`` unlearning re-initializes (the most salient for the
            forget data).
        relearn_epochs: epochs of relearning on the retained data after an ``approximate`` unlearning.
        snapshot_every: keep the model taken before every ``snapshot_every``-th mega-batch of the live
            stream (``replay=full`` only). 1 keeps one per mega-batch (fastest exact unlearning); k > 1
            divides their memory and checkpoint size by k, and exact unlearning then rolls back to the
            nearest earlier snapshot and replays up to k - 1 more mega-batches.
    """

    backbone: str
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    cifar_stem: bool = True
    width: int = 0
    replay: ReplaySpec = ReplaySpec("full")
    reset: str = "lure"
    importance: str = "snip"
    keep_fraction: float = 0.8
    importance_fraction: float = 0.2
    keep_scope: str = "global"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    val_fraction: float = 0.1
    lr_milestones: tuple[float, ...] = (0.4, 0.8)
    lr_gamma: float = 0.1
    shrink: float = 0.4
    perturb: float = 0.1
    augment: str = "auto"
    unlearn_fraction: float = 0.2
    relearn_epochs: int = 5
    snapshot_every: int = 1

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("reset", self.reset, RESETS)
        _choice("importance", self.importance, IMPORTANCES)
        _choice("keep_scope", self.keep_scope, KEEP_SCOPES)
        _choice("augment", self.augment, AUGMENTS)
        if not self.input_shape or any(int(d) <= 0 for d in self.input_shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {self.input_shape!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.width < 0:
            raise ValueError(f"width must be >= 0 (0 = backbone default), got {self.width}")
        _fraction("keep_fraction", self.keep_fraction, low_open=True, high_open=False)
        _fraction("importance_fraction", self.importance_fraction, low_open=True, high_open=False)
        _fraction("val_fraction", self.val_fraction, low_open=False, high_open=True)
        _fraction("unlearn_fraction", self.unlearn_fraction, low_open=True, high_open=False)
        _positive("lr", self.lr)
        _positive("lr_gamma", self.lr_gamma)
        for name, value in (("momentum", self.momentum), ("weight_decay", self.weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.shrink) and 0 <= self.shrink <= 1):
            raise ValueError(f"shrink must be in [0, 1], got {self.shrink}")
        if not (math.isfinite(self.perturb) and self.perturb >= 0):
            raise ValueError(f"perturb must be a finite number >= 0, got {self.perturb}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {self.snapshot_every}")
        if self.relearn_epochs < 0:
            raise ValueError(f"relearn_epochs must be >= 0, got {self.relearn_epochs}")
        if any(not (0 < m < 1) for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing fractions in (0, 1), got {self.lr_milestones!r}")

    @property
    def is_image(self) -> bool:
        """True for ``C x H x W`` inputs."""
        return len(self.input_shape) == 3

    @property
    def augments(self) -> bool:
        """Whether training batches get random crops and horizontal flips."""
        if self.augment != "auto":
            return self.augment == "on"
        return self.is_image and self.input_shape[0] == 3 and min(self.input_shape[1:]) >= 16

    def architecture(self) -> dict[str, object]:
        """The settings a checkpoint must share with this config to be loadable."""
        return {
            "backbone": self.backbone,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "cifar_stem": self.cifar_stem,
            "width": self.width,
        }


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
    above = value > 0 if low_open else value >= 0
    below = value < 1 if high_open else value <= 1
    ok = math.isfinite(value) and above and below
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
