"""Validated configuration of the AGS-CL strategy.

The builder (:func:`server.engine.agscl.build_agscl`) takes flat keyword arguments; they are checked
once here (every problem reported at once, each naming its option) and frozen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from server.engine.agscl.growth import growth_option_errors

#: Unlearning methods; the first is the default (see :mod:`server.engine.agscl.strategy`).
UNLEARN_METHODS: tuple[str, ...] = ("release", "amnesia")

#: Values of ``capacity``: ``auto`` and ``on`` grow and prune (every backbone has resizable layers since the
#: ResNets grow too; ``on`` is kept as the explicit spelling), ``off`` keeps the configured width.
CAPACITY_MODES: tuple[str, ...] = ("auto", "on", "off")

#: Backbones AGS-CL knows the nodes of.
SUPPORTED_BACKBONES: tuple[str, ...] = ("mlp", "cnn", "resnet18", "resnet50")

#: Backbones whose node layers can grow and shrink (capacity): all of them. In a ResNet only the inner
#: convs of each block resize; the residual-stream widths stay fixed (:mod:`server.engine.agscl.capacity`).
RESIZABLE_BACKBONES: tuple[str, ...] = SUPPORTED_BACKBONES

#: Options that only steer what the server keeps, not the model: left out of :meth:`AgsclConfig.as_dict`.
RETENTION_OPTIONS: frozenset[str] = frozenset({"retain_training_data"})


@dataclass(frozen=True)
class AgsclConfig:
    """Everything that shapes an :class:`~server.engine.agscl.strategy.AgsclStrategy`.

    Attributes:
        backbone: backbone name (one of :data:`SUPPORTED_BACKBONES`).
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: size of the output space shared by all tasks (a task's unseen classes are masked).
        seed: root of every random draw (initialization, shuffles, re-initializations, growth).
        cifar_stem: 3x3 stride-1 first convolution without max-pool for ResNets on small images.
        width: initial ``mlp`` hidden width or ``cnn`` base channels; 0 = the backbone's default.
        mu: μ, weight of the group-lasso term (a) on the unimportant nodes' incoming groups
            (paper: 10). Each proximal step shrinks a group's norm by ``learning_rate · mu``, once
            per epoch; on digits with 20 epochs per task few groups reach exact zero, so capacity
            (growth) supplies the free nodes (see ``docs/reproduction-agscl.md``).
        lamb: λ, weight of the drift term (b) pulling important nodes toward their previous
            weights in proportion to their importance Ω. The paper searches λ per data set; on
            permuted digits 100 let the first tasks drift (ACC 95 on split digits, first task 82),
            1000 and 10000 gave the same ACC (96.7/96.8 on 10 permuted tasks).
        eta: η, the exponential averaging of Ω across tasks (paper: always 0.9).
        rho: ρ, the probability that an unimportant node's incoming weights are re-initialized
            after a task (I.2; paper: 0.3, "≤ 0.5 typically a good trade-off").
        prox_every_epoch: apply the proximal step after every epoch (the paper). With False it is
            applied after every optimizer step (Adam then PGD each step, the textbook PGD); μ and λ
            then act that many times more often (scale μ down by the steps per epoch: with μ = 10 a
            second split-digits task on a 64-unit MLP could recruit no free node and reached 60 %).
        release_share: data-free unlearning releases the nodes of which the forgotten task holds at
            least this share of Ω (beyond the paper). 1 releases only the nodes no other live task
            activates (its share is all of Ω): their outputs are zero on every other task's training
            data, so releasing them changes nothing those tasks learned. Lower values free more
            capacity at the cost of spill: 0.5 released 177 of 512 units after two split-digits tasks
            and took the retained one from 90 to 58 %; 0.9 released 9 (logits moved by 2e-3).
        amnesia_epochs: epochs of the ``amnesia`` unlearning method over the forgotten task's data.
        amnesia_learning_rate: Adam learning rate of ``amnesia``.
        amnesia_ewc: weight of the EWC penalty (Fisher of the retained tasks) in ``amnesia``.
        amnesia_replay: weight of the replay cross-entropy on retained tasks in ``amnesia``.
        capacity: see :data:`CAPACITY_MODES`.
        grow_percent: k, the percentage by which every resizable node layer grows (seed on dynamic
            size): every hidden layer of ``mlp`` and ``cnn``; in a ResNet the output channels of the
            convs inside each block (a basic block's ``conv1``, a bottleneck's ``conv1`` and ``conv2``),
            while the residual-stream widths (stem, each block's last conv, the downsample) stay fixed,
            because their channels are shared with the identity path.
        grow_loss: τ: the resizable layers also grow *during* a learn when the epoch's mean training loss
            has stayed above τ for ``grow_patience`` epochs in a row (the seed's DEN trigger,
            :mod:`server.engine.agscl.growth`); 0 = only before a task, when free units run out.
        grow_patience: epochs the loss must stay above ``grow_loss`` before a growth (and between two).
        dropout_percent: γ, targeted dropout (seed section 4.2.1, :mod:`server.engine.agscl.dropout`):
            the weakest γ % of each layer's free units (smallest incoming norm; never a unit with
            Ω > 0) are dropped during training and pruned from the task after it (left free);
            0 = off.
        dropout_rate: α, the probability that a targeted unit is dropped at a training step.
        min_free_fraction: before learning a new task, the resizable layers grow when any of them has
            fewer than this share of its units free (Ω = 0). With λ = 1000 the important nodes are
            frozen outright, so a new task learns mostly on free ones: on a 32-unit MLP the second
            split-digits task reached 78 % with 0.1 (no growth) and 92 % with 0.25 (16 units grown).
        prune: after an unlearn frees units, prune free units down to ``grow_percent`` of each layer.
        max_width_factor: resizable layers never grow beyond this multiple of their initial width.
        retain_training_data: ``learn`` returns ``Report(retain=data)`` so the server keeps each
            task's training data (needed by ``amnesia``). Not model state.
    """

    backbone: str
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    cifar_stem: bool = True
    width: int = 0
    mu: float = 10.0
    lamb: float = 1000.0
    eta: float = 0.9
    rho: float = 0.3
    prox_every_epoch: bool = True
    release_share: float = 1.0
    amnesia_epochs: int = 5
    amnesia_learning_rate: float = 1e-3
    amnesia_ewc: float = 100.0
    amnesia_replay: float = 1.0
    capacity: str = "auto"
    grow_percent: float = 25.0
    grow_loss: float = 0.5
    grow_patience: int = 10
    dropout_percent: float = 25.0
    dropout_rate: float = 0.5
    min_free_fraction: float = 0.25
    prune: bool = True
    max_width_factor: float = 8.0
    retain_training_data: bool = False

    def __post_init__(self) -> None:
        errors: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                errors.append(message)

        def finite(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        need(
            self.backbone in SUPPORTED_BACKBONES,
            f"backbone must be one of {', '.join(SUPPORTED_BACKBONES)}, got {self.backbone!r}",
        )
        for flag in ("prox_every_epoch", "prune"):
            value = getattr(self, flag)
            need(isinstance(value, bool), f"{flag} must be true or false, got {value!r}")
        need(finite(self.mu) and self.mu >= 0, f"mu must be a finite number >= 0, got {self.mu!r}")
        need(finite(self.lamb) and self.lamb >= 0, f"lamb must be a finite number >= 0, got {self.lamb!r}")
        need(finite(self.eta) and 0 < self.eta <= 1, f"eta must be in (0, 1], got {self.eta!r}")
        need(finite(self.rho) and 0 <= self.rho <= 1, f"rho must be in [0, 1], got {self.rho!r}")
        need(
            finite(self.release_share) and 0 < self.release_share <= 1,
            f"release_share must be in (0, 1], got {self.release_share!r}",
        )
        need(
            isinstance(self.amnesia_epochs, int) and self.amnesia_epochs >= 1,
            f"amnesia_epochs must be an integer >= 1, got {self.amnesia_epochs!r}",
        )
        need(
            finite(self.amnesia_learning_rate) and self.amnesia_learning_rate > 0,
            f"amnesia_learning_rate must be > 0, got {self.amnesia_learning_rate!r}",
        )
        need(finite(self.amnesia_ewc) and self.amnesia_ewc >= 0, f"amnesia_ewc must be >= 0, got {self.amnesia_ewc!r}")
        need(
            finite(self.amnesia_replay) and self.amnesia_replay >= 0,
            f"amnesia_replay must be >= 0, got {self.amnesia_replay!r}",
        )
        need(
            self.capacity in CAPACITY_MODES,
            f"capacity must be one of {', '.join(CAPACITY_MODES)}, got {self.capacity!r}",
        )
        errors += growth_option_errors(
            grow_percent=self.grow_percent,
            grow_loss=self.grow_loss,
            grow_patience=self.grow_patience,
            max_width_factor=self.max_width_factor,
        )
        need(
            finite(self.dropout_percent) and 0 <= self.dropout_percent < 100,
            f"dropout_percent must be in [0, 100) (0 = no targeted dropout), got {self.dropout_percent!r}",
        )
        need(
            finite(self.dropout_rate) and 0 <= self.dropout_rate <= 1,
            f"dropout_rate must be in [0, 1], got {self.dropout_rate!r}",
        )
        need(
            finite(self.min_free_fraction) and 0 <= self.min_free_fraction < 1,
            f"min_free_fraction must be in [0, 1), got {self.min_free_fraction!r}",
        )
        need(
            not finite(self.grow_percent)
            or not finite(self.min_free_fraction)
            or self.grow_percent / 100 >= self.min_free_fraction,
            "grow_percent / 100 must be >= min_free_fraction (a pruned layer keeps grow_percent free and must not "
            f"grow again at once), got grow_percent={self.grow_percent!r}, "
            f"min_free_fraction={self.min_free_fraction!r}",
        )
        if errors:
            raise ValueError("invalid agscl configuration: " + "; ".join(errors))

    @property
    def resizable(self) -> bool:
        """Whether node layers grow and shrink (capacity ``auto`` or ``on``, on a resizable backbone)."""
        return self.capacity != "off" and self.backbone in RESIZABLE_BACKBONES

    def as_dict(self) -> dict[str, Any]:
        """Plain values of the options that shape the model, for a state dict (retention left out)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if key not in RETENTION_OPTIONS
        }
