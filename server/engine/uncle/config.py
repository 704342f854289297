"""Validated configuration of the UnCLE strategy.

The builder (:func:`server.engine.uncle.build_uncle`) takes flat keyword arguments; they are checked
once here and frozen, so the rest of the package never re-validates them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: Unlearning methods; the first is the default (see :mod:`server.engine.uncle.strategy`).
UNLEARN_METHODS: tuple[str, ...] = ("noise-align", "discard-embedding", "norm-reduce", "fixed-noise", "none")
#: When chunk embeddings are trained: ``always`` (every learn and unlearn, like the rest of φ) or
#: ``first-task`` (the paper, appendix B: learned with the first task, then frozen).
CHUNK_EMBEDDING_TRAINING: tuple[str, ...] = ("always", "first-task")

#: How a burn-in keeps the other tasks in place; the first is the default (see ``unlearn_update``).
UNLEARN_UPDATES: tuple[str, ...] = ("projected", "penalty")

#: Options that only steer serving, not the model: left out of :meth:`UncleConfig.as_dict`, so a
#: saved state neither records nor checks them and an operator may change them across restarts.
SERVING_OPTIONS: frozenset[str] = frozenset({"predict_cache_mb"})

#: Options that only steer what the server keeps, not the model: left out of
#: :meth:`UncleConfig.as_dict` for the same reason (each task records whether its data was retained).
RETENTION_OPTIONS: frozenset[str] = frozenset({"retain_training_data"})

#: Default burn-in learning rate of each update rule (``unlearn_learning_rate = 0``).
DEFAULT_UNLEARN_LEARNING_RATES: dict[str, float] = {"projected": 1e-2, "penalty": 1e-3}


@dataclass(frozen=True)
class UncleConfig:
    """Everything that shapes an :class:`~server.engine.uncle.strategy.UncleStrategy`.

    Attributes:
        backbone: backbone name (``server.engine.backbones.BACKBONES``).
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: size of the output space shared by all tasks (logits of a task's unseen
            classes are masked).
        seed: root of every random draw (initialization, shuffles, task subsets, noise).
        cifar_stem: 3x3 stride-1 first convolution without max-pool for ResNets on small images.
        width: backbone width override; 0 keeps the backbone's default.
        beta: weight of the output regularizer while learning (paper: 0.1 PMNIST/CIFAR-100,
            0.01 Tiny-ImageNet, 0.001 5-Tasks). Our distances are taken on the raw
            (Kaiming-normalized) output, where they are ``fan_in / 2`` times the parameter-space
            ones the paper used; 0.01 left new digits tasks under-fitted (two-class tasks at
            87-92% after 5 epochs), 0.001 learned them to 99-100% and forgot nothing.
        gamma: weight of the forgetting term while unlearning (paper: 0.01).
        unlearn_regularization: weight λ_u of the output regularizer while unlearning, with
            ``unlearn_update = "penalty"`` (the projected update enforces it as a constraint
            instead). The paper (eq. 3) uses 1; with distances measured on the raw output 0.1
            forgot the first task of a digits sequence fully (1 left it at ~30-55%) at the same
            spill, see the report.
        refit_head: after every learn and every burn-in, refit the hypernetwork's output layer in
            closed form so the other tasks generate what they did before (the task learned or
            unlearned keeps its new output); beyond the paper, see ``strategy._refit_head``. Only
            where one task's chunks fit the output layer's unknowns (chunks ≤ last trunk width + 1).
        unlearn_update: how a burn-in keeps the other tasks' networks in place. ``projected``
            (beyond the paper, see :mod:`server.engine.uncle.projection`): each trunk layer of φ
            changes only in directions the other tasks' inputs to it leave free, and the output
            layer is left to the refit, so a step generates part of one network instead of three.
            ``penalty`` (the paper, eq. 3): ``λ_u · L_reg`` on a sample of their chunks every step.
        projection_energy: with ``projected``, the fraction of the other tasks' input energy per
            layer the freed directions may hold (0 = only exactly unused directions).
        burn_in_chunks: with ``projected``, the share of the forgotten task's chunks each burn-in
            step aligns, drawn at random (an unbiased estimate of the whole forgetting term at a
            fraction of a step's cost).
        projected_output_layer: with ``projected``, also train the output layer's free directions
            in the burn-in. Off by default: the refit re-solves that layer right after, and on
            permuted digits training it cost 30% more unlearning time for 1-2 points on tasks
            learned right after an unlearn.
        burn_in: unlearning steps of the first unlearn (paper: 100).
        burn_in_decay: factor applied to the burn-in after each unlearn that used it (paper: 0.9).
        burn_in_min: the burn-in never anneals below this (paper: 20).
        noise_samples: n, the noise draws averaged per ``noise-align`` step (paper: 10).
        max_regularized_tasks: K, the most other tasks regularized per step (a random subset).
        regularized_networks: the most (task, chunk) pairs of those tasks whose distance is
            computed per step, in generated networks (2 = twice one network's chunks), drawn at
            random: an unbiased estimate of the whole distance. Bounds a step's regularization
            cost whatever the number of tasks; one network's worth doubled spill on permuted
            digits, two matched regularizing every chunk of every task.
        relapse_guard: also regularize unlearned tasks toward their generated parameters of the
            previous operation, so later learning cannot revive them.
        embedding_dim: task embedding size (paper: 32).
        chunk_embedding_dim: chunk embedding size (paper: 32).
        hidden: trunk widths of the hypernetwork (paper: 128, 256, 512).
        chunk_size: raw values generated per chunk; 0 chooses a size that minimizes the
            hypernetwork (``hypernetwork.auto_chunk_size``).
        chunk_embedding_training: see :data:`CHUNK_EMBEDDING_TRAINING`.
        grad_clip: maximal global gradient norm per step; 0 disables clipping.
        unlearn_learning_rate: Adam learning rate of the burn-in; 0 = the update rule's default
            (:data:`DEFAULT_UNLEARN_LEARNING_RATES`: 0.01 projected, 0.001 penalty as in the paper).
        lr_milestones: fractions of a learn's steps after which the learning rate is multiplied
            by ``lr_gamma`` (a step schedule).
        lr_gamma: see ``lr_milestones``.
        norm_scale: standard deviation of generated normalization gains and shifts at init.
        target_cache_mb: regularization targets H(e_t', φ*) of one operation are computed once
            and kept while they fit in this many MiB; beyond it they are recomputed every step.
        refit_unlearned_weight: weight of the unlearned (relapse-guarded) tasks' rows in the
            output-layer refit, against 1 for learned tasks. 1 restored them as exactly as the
            learned ones and, once the rows outnumbered the layer's unknowns, compromised each
            new task instead (tasks learned after three unlearns: 88-92%); 0 let them drift back
            (a forgotten split-digits task from 52% to 73-82% at the default width). 0.1: new
            tasks 92-97% (one or two torch threads), forgotten ones within 2-8 points of chance.
        predict_cache_mb: each serving snapshot keeps the generated networks of the most recently
            predicted tasks in at most this many MiB (parameter and buffer bytes; least recently
            used out first) and generates the others on demand; 0 caches nothing (every predict
            generates its network). Serving only (:data:`SERVING_OPTIONS`): not part of a saved
            state, so it may change across restarts.
        retain_training_data: ``learn`` hands the server each task's training data to keep
            (``Report(retain=data)``), which makes records-level forgetting possible
            (``forget_samples``: unlearn the task, relearn it from its retained data without the
            forgotten samples). Off, UnCLE keeps no data and forgets only whole tasks. Not part of
            a saved state (:data:`RETENTION_OPTIONS`); each task records whether its data was kept.
    """

    backbone: str
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    cifar_stem: bool = True
    width: int = 0
    beta: float = 0.001
    gamma: float = 0.01
    unlearn_regularization: float = 0.1
    refit_head: bool = True
    unlearn_update: str = "projected"
    projection_energy: float = 1e-5
    burn_in_chunks: float = 0.5
    projected_output_layer: bool = False
    burn_in: int = 100
    burn_in_decay: float = 0.9
    burn_in_min: int = 20
    noise_samples: int = 10
    max_regularized_tasks: int = 32
    regularized_networks: float = 2.0
    relapse_guard: bool = True
    embedding_dim: int = 32
    chunk_embedding_dim: int = 32
    hidden: tuple[int, ...] = (128, 256, 512)
    chunk_size: int = 0
    chunk_embedding_training: str = "always"
    grad_clip: float = 1.0
    unlearn_learning_rate: float = 0.0
    lr_milestones: tuple[float, ...] = field(default=(0.6, 0.85))
    lr_gamma: float = 0.3
    norm_scale: float = 0.1
    target_cache_mb: float = 256.0
    refit_unlearned_weight: float = 0.1
    predict_cache_mb: float = 512.0
    retain_training_data: bool = False

    def __post_init__(self) -> None:
        errors: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                errors.append(message)

        def finite(value: float) -> bool:
            return isinstance(value, int | float) and math.isfinite(value)

        need(finite(self.beta) and self.beta >= 0, f"beta must be >= 0, got {self.beta!r}")
        need(finite(self.gamma) and self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}")
        need(
            finite(self.unlearn_regularization) and self.unlearn_regularization >= 0,
            f"unlearn_regularization must be >= 0, got {self.unlearn_regularization!r}",
        )
        need(
            self.unlearn_update in UNLEARN_UPDATES,
            f"unlearn_update must be one of {', '.join(UNLEARN_UPDATES)}, got {self.unlearn_update!r}",
        )
        need(
            finite(self.projection_energy) and 0 <= self.projection_energy < 1,
            f"projection_energy must be in [0, 1), got {self.projection_energy!r}",
        )
        need(
            finite(self.burn_in_chunks) and 0 < self.burn_in_chunks <= 1,
            f"burn_in_chunks must be in (0, 1], got {self.burn_in_chunks!r}",
        )
        need(self.burn_in >= 1, f"burn_in must be >= 1, got {self.burn_in!r}")
        need(
            finite(self.burn_in_decay) and 0 < self.burn_in_decay <= 1,
            f"burn_in_decay must be in (0, 1], got {self.burn_in_decay!r}",
        )
        need(
            1 <= self.burn_in_min <= self.burn_in,
            f"burn_in_min must be in [1, burn_in={self.burn_in}], got {self.burn_in_min!r}",
        )
        need(self.noise_samples >= 1, f"noise_samples must be >= 1, got {self.noise_samples!r}")
        need(self.max_regularized_tasks >= 1, f"max_regularized_tasks must be >= 1, got {self.max_regularized_tasks!r}")
        need(
            finite(self.regularized_networks) and self.regularized_networks > 0,
            f"regularized_networks must be > 0, got {self.regularized_networks!r}",
        )
        need(self.embedding_dim >= 1, f"embedding_dim must be >= 1, got {self.embedding_dim!r}")
        need(self.chunk_embedding_dim >= 1, f"chunk_embedding_dim must be >= 1, got {self.chunk_embedding_dim!r}")
        need(
            len(self.hidden) >= 1 and all(isinstance(w, int) and w >= 1 for w in self.hidden),
            f"hidden must list at least one positive width, got {self.hidden!r}",
        )
        need(self.chunk_size >= 0, f"chunk_size must be >= 0 (0 = automatic), got {self.chunk_size!r}")
        need(
            self.chunk_embedding_training in CHUNK_EMBEDDING_TRAINING,
            f"chunk_embedding_training must be one of {', '.join(CHUNK_EMBEDDING_TRAINING)}, "
            f"got {self.chunk_embedding_training!r}",
        )
        need(finite(self.grad_clip) and self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip!r}")
        need(
            finite(self.unlearn_learning_rate) and self.unlearn_learning_rate >= 0,
            f"unlearn_learning_rate must be >= 0 (0 = the update rule's default), got {self.unlearn_learning_rate!r}",
        )
        need(
            all(finite(m) and 0 < m < 1 for m in self.lr_milestones)
            and list(self.lr_milestones) == sorted(self.lr_milestones),
            f"lr_milestones must be increasing fractions in (0, 1), got {self.lr_milestones!r}",
        )
        need(finite(self.lr_gamma) and 0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        need(finite(self.norm_scale) and self.norm_scale > 0, f"norm_scale must be > 0, got {self.norm_scale!r}")
        need(
            finite(self.target_cache_mb) and self.target_cache_mb >= 0,
            f"target_cache_mb must be >= 0, got {self.target_cache_mb!r}",
        )
        need(
            finite(self.refit_unlearned_weight) and 0 <= self.refit_unlearned_weight <= 1,
            f"refit_unlearned_weight must be in [0, 1], got {self.refit_unlearned_weight!r}",
        )
        need(
            finite(self.predict_cache_mb) and self.predict_cache_mb >= 0,
            f"predict_cache_mb must be >= 0, got {self.predict_cache_mb!r}",
        )
        if errors:
            raise ValueError("invalid uncle configuration: " + "; ".join(errors))

    @property
    def burn_in_learning_rate(self) -> float:
        """The burn-in's Adam learning rate: ``unlearn_learning_rate``, or the update rule's default."""
        return self.unlearn_learning_rate or DEFAULT_UNLEARN_LEARNING_RATES[self.unlearn_update]

    @property
    def predict_cache_bytes(self) -> int:
        """``predict_cache_mb`` in bytes."""
        return int(self.predict_cache_mb * 2**20)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists) of the options that shape the model, for a state dict.

        :data:`SERVING_OPTIONS` and :data:`RETENTION_OPTIONS` are left out: they are no model
        state, and a state saved with one value must load with another.
        """
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if key not in SERVING_OPTIONS | RETENTION_OPTIONS
        }
