"""Strategy ``lure``: Learn, Unlearn and Relearn over a stream of mega-batches (class-incremental).

Each Learn call is one mega-batch of the ALMA stream (Caccia et al., 2021); the task name is the
mega-batch's name. Before training every mega-batch but the first, the weights least important
for the new data are re-initialized (the LURE paper's unlearn step), then the network is trained
on the new mega-batch plus the replayed ones (the relearn step). Unlearning a mega-batch (the right
to be forgotten) is either ``exact`` -- roll back to the model taken before it was first learned and
replay the learning of the later ones, which reproduces training without it bit for bit -- or
``approximate`` -- re-initialize the weights most salient for it and relearn on the retained data.
Forgetting some samples of live mega-batches (records-level forgetting, :meth:`LureStrategy.forget_samples`)
is the same rollback and replay, with the affected mega-batches replayed from what remains of them.

Reproducibility is what makes ``exact`` exact: every random draw of a mega-batch's learning (split,
importance subset, fresh initialization, shuffles, augmentation) comes from a seed derived from
the strategy seed, the mega-batch's name and its learn options, never from the model version, so
replaying it without a removed predecessor draws exactly what a strategy that never saw that
predecessor would draw.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from server.engine.backbones import build_backbone
from server.engine.lure.config import LureConfig, ReplaySpec
from server.engine.lure.data import concat, crop_padding, reservoir_sample, sample_fraction, split_train_val
from server.engine.lure.importance import importance_scores, top_fraction_masks
from server.engine.lure.loop import Distillation, TrainSettings, infer, step_milestones, train
from server.engine.lure.predictor import LurePredictor
from server.engine.lure.resets import apply_reset, reinit_where
from server.engine.metrics import accuracy, expected_calibration_error
from server.engine.protocol import LearnOptions, Progress, Report, TaskData, UnknownTaskError
from server.engine.temporary import DISTILL_WEIGHT, RoutedPredictor, SideNetwork, SideNetworks, side_logits
from server.engine.training import (
    check_learn_inputs,
    class_mask,
    derive_seed,
    module_state_cpu,
    scaled_progress,
    seeded_generator,
    seeded_rng,
)

_STATE_FORMAT = "lethe.lure/1"
#: Share of a learn call's progress spent on the reset before training (when there is one).
_RESET_SHARE = 0.05
#: Share of a learn call's progress spent on training; the rest is evaluation.
_TRAIN_END = 0.95
#: ``MegaBatch.before_version`` of a snapshot that no served model version names.
_UNSERVED = -1


@dataclass(frozen=True)
class MegaBatch:
    """One live mega-batch of the stream, in learning order.

    Attributes:
        name: the task name it was learned under.
        options: its learn options, with the server's zeros already replaced by defaults.
        before: CPU ``state_dict`` of the model just before it was learned (before the reset);
            kept only with ``replay=full`` (the one mode in which exact unlearning is possible) and
            only every ``snapshot_every`` positions of the live stream.
        exact: whether ``before`` equals what learning the live mega-batches that precede this one,
            from the initial model, produces -- False when an ``approximate`` unlearning left traces in it.
        before_version: the model version at which ``before`` was the live (served) model; -1 when
            no served version names it: there is no ``before``, it is an intermediate model of a
            replay (computed during an exact unlearning or a records forgetting, never published), or
            it was loaded from a state saved before this field existed.
    """

    name: str
    options: LearnOptions
    before: dict[str, torch.Tensor] | None
    exact: bool
    before_version: int = _UNSERVED


class LureStrategy:
    """LURE over a mega-batch stream, with exact and approximate unlearning of a mega-batch.

    Built by :func:`server.engine.lure.build_lure`. The worker thread is the only caller of every
    method except the predictors it hands out. Every learn and unlearn works on a copy of the model
    and commits at the end, so an exception (for example raised by ``progress`` to cancel) leaves the
    strategy exactly as it was.

    Retention goes through the server: ``learn`` returns in ``Report.retain`` what the server must keep
    for replay (the whole mega-batch with ``replay=full``, a reservoir sample of N samples with
    ``buffer:N``, nothing with ``none``) and the server passes it back as ``replay``.

    Temporary learning (:class:`~server.engine.protocol.TemporaryLearning`): a TEMPORARY mega-batch is
    learned by a side network, a fresh network trained on that mega-batch only (same SGD recipe);
    the stream and the main model are not touched. Predict routes every sample between the main
    model and the live side networks (:class:`~server.engine.temporary.RoutedModule`: the most
    confident expert answers). Committing learns the mega-batch into the stream as a permanent learn
    does (reset, then training with replay) plus logit matching to the side network on its samples,
    then deletes the side network. A later exact replay of a committed mega-batch learns it without
    the side network (it is gone): still a model that never saw any forgotten data.
    """

    name: str = "lure"
    task_incremental: bool = False
    unlearn_methods: tuple[str, ...] = ("exact", "approximate")

    def __init__(self, config: LureConfig, device: torch.device) -> None:
        """Build the initial network of ``config`` on ``device`` (seeded by ``config.seed``)."""
        self.config = config
        self.needs_replay: bool = config.replay.mode != "none"
        self.learn_defaults = LearnOptions(
            epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.lr, holdout_fraction=0.1
        )
        self.version = 0
        self._device = torch.device(device)
        self._model: nn.Module = self._fresh_network(derive_seed(config.seed, "lure-init")).to(self._device)
        # Never mutated in place (every change assigns a new list), and the snapshots in it are never
        # modified: rollback_predictor reads it from RPC threads while the worker trains.
        self._stream: list[MegaBatch] = []
        #: The model equals learning the live stream from the initial model (no approximate traces).
        self._model_exact = True
        #: After an approximate unlearning of the last mega-batch: the exact model before it, which is
        #: the exact "before" of the next mega-batch.
        self._pending_before: dict[str, torch.Tensor] | None = None
        self._pending_before_version = _UNSERVED
        self._published: LurePredictor | None = None
        self._sides = SideNetworks(self._fresh_network, config.num_classes, self._device)
        self._served: LurePredictor | RoutedPredictor | None = None

    # ------------------------------------------------------------------ verbs

    def learn(
        self,
        task: str,
        data: TaskData,
        options: LearnOptions,
        progress: Progress,
        replay: Mapping[str, TaskData],
    ) -> Report:
        """Learn mega-batch ``task``: reset (from the second mega-batch on), then train.

        Args:
            task: the mega-batch's name; must not be live already.
            data: its samples (CPU).
            options: epochs, batch size, learning rate, seed; zeros mean the builder's defaults.
            progress: called as the work advances; may raise to cancel (nothing is changed then).
            replay: retained data of the live mega-batches (``full``: whole mega-batches;
                ``buffer:N``: samples); used in learning order, ignored with ``replay=none``.

        Returns:
            Metrics ``train_accuracy``, ``val_accuracy`` (percent, the mega-batch's 90/10 split),
            ``generalization_gap`` (percentage points), ``ece`` (validation, fraction), ``train_loss``,
            ``train_seconds``, ``importance_seconds`` and ``reset_seconds`` (0 without a reset),
            ``reinitialized_fraction``, ``train_samples``, ``replayed_megabatches``, ``learn_seconds``;
            and ``retain``, the data the server keeps for replay.

        Raises:
            ValueError: if ``task`` is already live (or temporary), or for bad data or options.
        """
        if task in self._sides:
            raise ValueError(f"mega-batch {task!r} is a temporary one: commit it or unlearn it")
        return self._learn(task, data, options, progress, replay, None)

    def _learn(
        self,
        task: str,
        data: TaskData,
        options: LearnOptions,
        progress: Progress,
        replay: Mapping[str, TaskData],
        teacher: nn.Module | None,
    ) -> Report:
        """:meth:`learn`, distilling ``teacher`` (a side network) on the mega-batch's samples when given."""
        if any(m.name == task for m in self._stream):
            raise ValueError(f"mega-batch {task!r} is already learned; unlearn it before learning it again")
        opts = self._resolve(options)
        check_learn_inputs(data, opts, self.config.input_shape, self.config.num_classes)
        started = time.perf_counter()
        mode = self.config.replay.mode
        model = copy.deepcopy(self._model)
        before: dict[str, torch.Tensor] | None = None
        before_version = _UNSERVED
        if self._keeps_snapshot(len(self._stream)):
            if self._pending_before is not None:
                before, before_version = self._pending_before, self._pending_before_version
            else:
                before, before_version = module_state_cpu(model), self.version
        exact = self._pending_before is not None or self._model_exact
        previous = [] if mode == "none" else [replay[m.name] for m in self._stream if m.name in replay]
        missing = mode == "full" and len(previous) < len(self._stream)
        metrics = self._learn_megabatch(
            model,
            task,
            data,
            opts,
            previous,
            has_previous=bool(self._stream) or not self._model_exact,
            progress=progress,
            teacher=teacher,
        )
        retain = self._retained(task, data, opts)
        progress(1.0, f"learned mega-batch {task!r}")  # the last chance to cancel: commit below

        self._model = model
        if teacher is not None:
            self._sides.replace(self._sides.without(task))
        self._stream = [*self._stream, MegaBatch(task, opts, before, exact, before_version)]
        self._pending_before = None
        self._pending_before_version = _UNSERVED
        if missing:  # trained without some live data: replaying this step would not reproduce it
            self._model_exact = False
        self._commit()
        metrics["replayed_megabatches"] = float(len(previous))
        metrics["learn_seconds"] = time.perf_counter() - started
        return Report(metrics=metrics, retain=retain)

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Forget mega-batch ``task``.

        * ``exact`` (default): roll back to the model taken before ``task`` was first learned (or to
          the latest earlier snapshot free of approximate-unlearning traces) and replay the learning of
          the later live mega-batches in their original order with their original options and seeds.
          The result equals, bit for bit under deterministic settings, a strategy that never learned
          ``task``. Needs ``replay=full``: the later mega-batches' full data comes from ``replay``; with
          ``buffer:N`` or ``none`` the server does not have it and a ``ValueError`` is raised.
        * ``approximate``: SNIP saliency of the forget data, re-initialize the ``unlearn_fraction``
          most salient weights, relearn ``relearn_epochs`` epochs on the retained data. Needs the
          forgotten mega-batch's own data as ``replay[task]`` -- the server's retained data of it,
          passed before it is purged.

        Args:
            task: a live mega-batch.
            method: ``exact``, ``approximate`` or ``""`` (the default, ``exact``).
            progress: called as the work advances; may raise to cancel (nothing is changed then).
            replay: retained data of the other live mega-batches (and, for ``approximate``, of ``task``).

        Returns:
            Metrics ``unlearn_seconds`` and ``replayed_megabatches``; ``approximate`` adds
            ``importance_seconds``, ``reinitialized_fraction`` and ``relearn_samples``.

        Raises:
            ValueError: for an unknown method, or when the method's data requirements are not met.
            UnknownTaskError: if ``task`` is not a live mega-batch.
        """
        method = method or self.unlearn_methods[0]
        if method not in self.unlearn_methods:
            raise ValueError(
                f"unlearn method must be one of {', '.join(self.unlearn_methods)} for lure, got {method!r}"
            )
        index = next((i for i, m in enumerate(self._stream) if m.name == task), None)
        if index is None:
            raise UnknownTaskError(f"mega-batch {task!r} is not a live mega-batch of this lure model")
        if method == "exact":
            return self._unlearn_exact(index, progress, replay)
        return self._unlearn_approximate(index, progress, replay)

    def sample_forgetting(self) -> str | None:
        """None when :meth:`forget_samples` can run (``replay=full``); otherwise why not and what works."""
        replay = self.config.replay
        if replay.mode == "full":
            return None
        return (
            f"records forgetting with lure needs replay=full (configured replay={replay}): replaying the "
            "mega-batches without the forgotten samples needs their full training data, which the server "
            "keeps only with replay=full; unlearn the whole mega-batch instead (method 'approximate')"
        )

    def forget_samples(
        self, kept: Mapping[str, TaskData], progress: Progress, replay: Mapping[str, TaskData]
    ) -> Report:
        """Forget some training samples of the live mega-batches named in ``kept``, exactly.

        Rolls back to the latest clean snapshot at or before the first affected mega-batch (the
        earliest in stream order among ``kept``'s keys) and replays the learning of every later live
        mega-batch in its original order, with its original options and seeds: affected ones from
        ``kept[name]``, the others from ``replay[name]``. As in learning, each replayed mega-batch
        also trains on the data of every live mega-batch before it, so ``replay`` must hold every
        live mega-batch not in ``kept``. The result equals, bit for bit under deterministic settings,
        a strategy with the same configuration that learned the live stream with each affected
        mega-batch learned from ``kept[name]`` in the first place (like exact unlearning, the replay
        starts from a clean snapshot, so traces of earlier approximate unlearning go too). One
        committed operation: on any exception (``progress`` raising to cancel, say) nothing changes;
        on success the version is bumped once.

        Args:
            kept: live mega-batch → its remaining training samples, in stream order (non-empty).
            progress: called as the work advances; may raise to cancel.
            replay: retained data of the other live mega-batches (entries for ``kept``'s names are
                ignored).

        Returns:
            Metrics ``unlearn_seconds`` and ``replayed_megabatches``.

        Raises:
            ValueError: with replay other than ``full``; when ``kept`` is empty, names a mega-batch
                that is not live, or holds no (or invalid) samples for one; when the retained data of
                another live mega-batch is missing from ``replay``.
        """
        reason = self.sample_forgetting()
        if reason is not None:
            raise ValueError(reason)
        if not kept:
            raise ValueError("forget_samples needs at least one live mega-batch in kept")
        stream = self._stream
        position = {m.name: i for i, m in enumerate(stream)}
        unknown = [name for name in kept if name not in position]
        if unknown:
            raise ValueError(
                f"not live mega-batches of this lure model: {', '.join(map(repr, unknown))}; "
                f"live: {', '.join(map(repr, position)) or '(none)'}"
            )
        for name, data in kept.items():
            if len(data) == 0:
                raise ValueError(
                    f"no training sample of mega-batch {name!r} would remain; unlearn the whole mega-batch instead"
                )
            try:
                check_learn_inputs(
                    data, stream[position[name]].options, self.config.input_shape, self.config.num_classes
                )
            except ValueError as error:
                raise ValueError(f"kept data of mega-batch {name!r}: {error}") from None
        first = min(position[name] for name in kept)
        affected = sorted(kept, key=position.__getitem__)
        return self._replay_from(
            first,
            {**replay, **kept},
            drop=None,
            progress=progress,
            what=f"forgetting samples of {', '.join(map(repr, affected))}",
            done=f"forgot samples of {len(affected)} mega-batch(es) exactly",
        )

    def rollback_predictor(self, tasks: Collection[str]) -> LurePredictor | RoutedPredictor | None:
        """A serving snapshot free of ``tasks``: the main model's rollback point, with the other side networks.

        Temporary mega-batches among ``tasks`` are simply left out of the routing (the main model never
        held them); permanent ones are served from :meth:`_rollback_main`. Thread-safe as that one.
        """
        sides = self._sides.live
        wanted = set(tasks)
        others = {name: side for name, side in sides.items() if name not in wanted}
        permanent = wanted - set(sides)
        if permanent:
            base = self._rollback_main(permanent)
        elif wanted & set(sides):
            base = LurePredictor(
                self._model,
                self.version,
                input_shape=self.config.input_shape,
                num_classes=self.config.num_classes,
                device=self._device,
            )
        else:
            return None
        if base is None or not others:
            return base
        return RoutedPredictor(base, base.module, others, self.config.num_classes, self._device)

    def _rollback_main(self, tasks: Collection[str]) -> LurePredictor | None:
        """A serving snapshot of a model that never saw any of ``tasks``, or None.

        The model is the latest clean snapshot (``exact``, free of approximate-unlearning traces) at
        or before the first of ``tasks`` in the live stream that was once the served model; its
        ``version`` is the version it was served at (``MegaBatch.before_version``). Snapshots no
        served version names -- intermediate models of an earlier replay, or snapshots loaded from a
        state saved before versions were recorded -- are skipped, so the answer may be an older
        model than the rollback point of :meth:`forget_samples`; None when there is none, or when
        none of ``tasks`` is live.

        Safe on RPC threads while the worker trains: it reads the stream list and the model once
        (the worker replaces both, never modifies them) and the snapshots are never modified; it
        draws nothing random (the network is a deep copy of the current one, loaded with the
        snapshot), so it cannot disturb the worker's seeded RNG state.
        """
        stream = self._stream
        model = self._model
        wanted = set(tasks)
        first = next((i for i, m in enumerate(stream) if m.name in wanted), None)
        if first is None:
            return None
        for megabatch in reversed(stream[: first + 1]):
            if megabatch.exact and megabatch.before is not None and megabatch.before_version != _UNSERVED:
                return LurePredictor(
                    model,
                    megabatch.before_version,
                    state=megabatch.before,
                    input_shape=self.config.input_shape,
                    num_classes=self.config.num_classes,
                    device=self._device,
                )
        return None

    def predictor(self) -> LurePredictor | RoutedPredictor:
        """The immutable serving snapshot of the current version (an eval-mode deep copy).

        With live side networks (temporary mega-batches), the snapshot routes between them and the
        main model (see :class:`~server.engine.temporary.RoutedModule`).
        """
        if self._served is None or self._served.version != self.version:
            base = self._main_predictor()
            live = self._sides.live
            self._served = (
                RoutedPredictor(base, base.module, live, self.config.num_classes, self._device) if live else base
            )
        return self._served

    def _main_predictor(self) -> LurePredictor:
        """The snapshot of the main model alone."""
        if self._published is None or self._published.version != self.version:
            self._published = LurePredictor(
                self._model,
                self.version,
                input_shape=self.config.input_shape,
                num_classes=self.config.num_classes,
                device=self._device,
            )
        return self._published

    def parameter_count(self) -> int:
        """Trainable parameters of the network and the side networks (snapshots are not counted)."""
        return sum(p.numel() for p in self._model.parameters() if p.requires_grad) + self._sides.parameter_count()

    # ------------------------------------------------------------ temporary learning

    def learn_temporary(self, task: str, data: TaskData, options: LearnOptions, progress: Progress) -> Report:
        """Train a side network on mega-batch ``task`` only; the main model and the stream are not touched.

        A fresh network initialized from (seed, ``task``, options), trained with the mega-batch's
        SGD recipe on all of ``data``. Returns ``train_loss``, ``train_accuracy``, ``learn_seconds``
        and ``retain=data`` (kept until the mega-batch is committed or forgotten, whatever the replay mode).

        Raises:
            ValueError: ``task`` is live or already temporary, or bad data or options.
        """
        if any(m.name == task for m in self._stream) or task in self._sides:
            raise ValueError(f"mega-batch {task!r} is already learned")
        opts = self._resolve(options)
        check_learn_inputs(data, opts, self.config.input_shape, self.config.num_classes)
        started = time.perf_counter()
        seed = derive_seed(self._megabatch_seed(task, opts), "side-network")
        network = self._sides.fresh(seed)
        settings = self._settings(opts.epochs, opts.batch_size, opts.learning_rate)
        with seeded_rng(derive_seed(seed, "global-rng")):
            loss = train(network, data, settings, device=self._device, rng=seeded_generator(seed, "train"),
                         progress=progress)  # fmt: skip
        classes = tuple(sorted(set(data.labels.tolist())))
        mask = class_mask(classes, self.config.num_classes, self._device)
        logits = side_logits(network.eval(), data.inputs, mask, self._device).cpu()
        # Commit: only the side networks change.
        self._sides.replace(self._sides.with_added(SideNetwork(task, network, classes, opts)))
        self._commit()
        return Report(
            metrics={
                "train_loss": loss,
                "train_accuracy": accuracy(logits, data.labels),
                "samples": float(len(data)),
                "learn_seconds": time.perf_counter() - started,
            },
            retain=data,
        )

    def forget_temporary(self, task: str, progress: Progress) -> Report:
        """Delete mega-batch ``task``'s side network (exact forgetting); returns ``unlearn_seconds``."""
        return self._sides.delete(task, progress, self._commit)

    def commit_temporary(self, task: str, data: TaskData, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Learn mega-batch ``task`` into the stream from ``data``, matching its side network; delete it."""
        side = self._sides.get(task)
        report = self._learn(task, data, side.options, progress, replay, side.network)
        report.metrics["distill_weight"] = DISTILL_WEIGHT
        return report

    def temporary_tasks(self) -> tuple[str, ...]:
        """Mega-batches that live as side networks now, sorted."""
        return tuple(sorted(self._sides.live))

    @property
    def megabatches(self) -> tuple[str, ...]:
        """Names of the live mega-batches, in learning order."""
        return tuple(m.name for m in self._stream)

    @property
    def model(self) -> nn.Module:
        """The training network (for inspection; do not modify it)."""
        return self._model

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a restart.

        Weights, the live stream (names, options, the model before each mega-batch, exactness flags
        and the versions the snapshots were served at), the pending snapshot, the version and the
        seed. All tensors are CPU tensors not shared with the live model; the value is made of dicts,
        lists, strings, numbers, booleans, ``None`` and tensors (loadable with ``weights_only=True``).
        There is no RNG state or optimizer state to save: every random draw is derived from (seed,
        mega-batch name, options), and every mega-batch starts a new SGD optimizer and schedule.
        """
        return {
            "format": _STATE_FORMAT,
            "architecture": self.config.architecture(),
            "seed": self.config.seed,
            "replay": str(self.config.replay),
            "version": self.version,
            "model": module_state_cpu(self._model),
            "model_exact": self._model_exact,
            "pending_before": self._pending_before,
            "pending_before_version": self._pending_before_version,
            "stream": [
                {
                    "name": m.name,
                    "options": {
                        "epochs": m.options.epochs,
                        "batch_size": m.options.batch_size,
                        "learning_rate": m.options.learning_rate,
                        "seed": m.options.seed,
                    },
                    "before": m.before,
                    "exact": m.exact,
                    "before_version": m.before_version,
                }
                for m in self._stream
            ],
            "side_networks": self._sides.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; on error nothing is changed.

        The saved seed replaces the configured one, so replays after a restart draw what the original
        steps drew.

        Raises:
            ValueError: if the state is not a lure state or was saved by a different architecture.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a lure state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        configured = self.config.architecture()
        saved = state["architecture"]
        if saved != configured:
            differences = ", ".join(
                f"{key}: saved {saved.get(key)!r}, configured {value!r}"
                for key, value in configured.items()
                if saved.get(key) != value
            )
            raise ValueError(f"lure state was saved with a different model configuration ({differences})")
        model = copy.deepcopy(self._model)
        model.load_state_dict(state["model"])
        stream = [
            MegaBatch(
                name=str(entry["name"]),
                options=LearnOptions(**entry["options"]),
                before=_cpu_copy(entry["before"]),
                exact=bool(entry["exact"]),
                # Absent from states saved before it existed: unknown, so never served as a rollback.
                before_version=int(entry.get("before_version", _UNSERVED)),
            )
            for entry in state["stream"]
        ]
        if len({m.name for m in stream}) != len(stream):
            raise ValueError("lure state is inconsistent: a mega-batch appears twice in the stream")
        sides = self._sides.loaded(state.get("side_networks", []))  # absent from states saved before it existed

        self.config = replace(self.config, seed=int(state["seed"]))
        self._model = model
        self._stream = stream
        self._model_exact = bool(state["model_exact"])
        self._pending_before = _cpu_copy(state["pending_before"])
        self._pending_before_version = int(state.get("pending_before_version", _UNSERVED))
        self.version = int(state["version"])
        self._sides.replace(sides)
        self._published = None
        self._served = None

    # ------------------------------------------------------------------ learning

    def _resolve(self, options: LearnOptions) -> LearnOptions:
        """Replace zeros by the builder's defaults."""
        return LearnOptions(
            epochs=options.epochs or self.config.epochs,
            batch_size=options.batch_size or self.config.batch_size,
            learning_rate=options.learning_rate or self.config.lr,
            seed=options.seed,
        )

    def _megabatch_seed(self, name: str, options: LearnOptions) -> int:
        """The root seed of learning ``name`` with ``options``: independent of the rest of the stream."""
        return derive_seed(
            self.config.seed,
            "lure-megabatch",
            name,
            options.epochs,
            options.batch_size,
            repr(float(options.learning_rate)),
            options.seed,
        )

    def _fresh_network(self, seed: int) -> nn.Module:
        """The backbone built again with its own initializer, on the CPU."""
        cfg = self.config
        with seeded_rng(seed):
            return build_backbone(
                cfg.backbone, cfg.input_shape, cfg.num_classes, cifar_stem=cfg.cifar_stem, width=cfg.width
            )

    def _settings(self, epochs: int, batch_size: int, lr: float) -> TrainSettings:
        cfg = self.config
        return TrainSettings(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            milestones=step_milestones(epochs, cfg.lr_milestones),
            gamma=cfg.lr_gamma,
            crop_padding=crop_padding(cfg.input_shape) if cfg.augments else 0,
        )

    def _learn_megabatch(
        self,
        model: nn.Module,
        name: str,
        data: TaskData,
        options: LearnOptions,
        previous: list[TaskData],
        *,
        has_previous: bool,
        progress: Progress,
        teacher: nn.Module | None = None,
    ) -> dict[str, float]:
        """Reset (when ``has_previous``) and train ``model`` in place on one mega-batch; evaluate it.

        Everything random is drawn from :meth:`_megabatch_seed`, so the same inputs give the same
        model, whenever this runs. With ``teacher`` (a commit) the loss adds logit matching to it on
        the mega-batch's own training samples.
        """
        cfg = self.config
        seed = self._megabatch_seed(name, options)
        train_part, val_part = split_train_val(data, cfg.val_fraction, seeded_generator(seed, "split"))
        metrics: dict[str, float] = {"importance_seconds": 0.0, "reset_seconds": 0.0, "reinitialized_fraction": 0.0}
        start = 0.0
        if has_previous and cfg.reset != "warm-start":
            progress(0.0, f"{cfg.reset} reset before mega-batch {name!r}")
            metrics.update(self._reset(model, train_part, seed, options.batch_size))
            start = _RESET_SHARE
        train_set = concat([train_part, *previous])
        settings = self._settings(options.epochs, options.batch_size, options.learning_rate)
        distillation = None
        if teacher is not None:
            task_classes = torch.tensor(sorted(set(train_part.labels.tolist())), dtype=torch.long)
            mask = class_mask(task_classes.tolist(), cfg.num_classes, self._device)
            logits = side_logits(teacher, train_part.inputs, mask, self._device).cpu()  # [n_task, C]
            teacher_logits = torch.zeros(len(train_set), cfg.num_classes)
            teacher_logits[: len(train_part)] = logits.masked_fill(~mask.cpu(), 0.0)
            rows = torch.zeros(len(train_set), dtype=torch.bool)
            rows[: len(train_part)] = True
            distillation = Distillation(teacher_logits, rows, task_classes, DISTILL_WEIGHT)

        def on_step(fraction: float, message: str) -> None:
            progress(start + (_TRAIN_END - start) * fraction, message)

        started = time.perf_counter()
        with seeded_rng(derive_seed(seed, "global-rng")):  # dropout, should a backbone have any
            loss = train(
                model,
                train_set,
                settings,
                device=self._device,
                rng=seeded_generator(seed, "train"),
                progress=on_step,
                distillation=distillation,
            )
        metrics["train_seconds"] = time.perf_counter() - started
        progress(_TRAIN_END, "evaluating")
        classes = cfg.num_classes
        train_logits = infer(model, train_part.inputs, num_classes=classes, device=self._device)
        val_logits = infer(model, val_part.inputs, num_classes=classes, device=self._device)
        train_acc = accuracy(train_logits, train_part.labels)
        val_acc = accuracy(val_logits, val_part.labels)
        metrics.update(
            train_loss=loss,
            train_accuracy=train_acc,
            val_accuracy=val_acc,
            generalization_gap=train_acc - val_acc,
            ece=expected_calibration_error(torch.softmax(val_logits, dim=1), val_part.labels),
            train_samples=float(len(train_set)),
        )
        return {key: value for key, value in metrics.items() if not math.isnan(value)}

    def _reset(self, model: nn.Module, train_part: TaskData, seed: int, batch_size: int) -> dict[str, float]:
        """Apply the configured reset to ``model`` in place; return its timings and size."""
        cfg = self.config
        started = time.perf_counter()
        fresh = self._fresh_network(derive_seed(seed, "fresh-init"))
        subset = sample_fraction(train_part, cfg.importance_fraction, seeded_generator(seed, "importance-subset"))
        with seeded_rng(derive_seed(seed, "importance-rng")):
            outcome = apply_reset(
                cfg.reset,
                model,
                fresh,
                subset,
                importance=cfg.importance,
                keep_fraction=cfg.keep_fraction,
                keep_scope=cfg.keep_scope,
                shrink=cfg.shrink,
                perturb=cfg.perturb,
                batch_size=batch_size,
                device=self._device,
                rng=seeded_generator(seed, "random-importance"),
            )
        return {
            "importance_seconds": outcome.importance_seconds,
            "reset_seconds": time.perf_counter() - started,
            "reinitialized_fraction": outcome.reinitialized / outcome.total,
        }

    def _retained(self, name: str, data: TaskData, options: LearnOptions) -> TaskData | None:
        replay: ReplaySpec = self.config.replay
        if replay.mode == "full":
            return data
        if replay.mode == "buffer":
            rng = seeded_generator(self._megabatch_seed(name, options), "reservoir")
            return reservoir_sample(data, replay.buffer_size, rng)
        return None

    def _keeps_snapshot(self, position: int) -> bool:
        """Whether the model before the mega-batch at ``position`` of the live stream is kept."""
        return self.config.replay.mode == "full" and position % self.config.snapshot_every == 0

    def _commit(self) -> None:
        self.version += 1
        self._published = None
        self._served = None

    # ------------------------------------------------------------------ unlearning

    def _unlearn_exact(self, index: int, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        task = self._stream[index].name
        if self.config.replay.mode != "full":
            raise ValueError(
                f"exact unlearning needs replay=full (configured replay={self.config.replay}): replaying the later "
                "mega-batches needs their full data, which the server keeps only with replay=full; "
                "use method 'approximate'"
            )
        return self._replay_from(
            index,
            replay,
            drop=task,
            progress=progress,
            what=f"exact unlearning of {task!r}",
            done=f"unlearned mega-batch {task!r} exactly",
        )

    def _replay_from(
        self,
        index: int,
        sources: Mapping[str, TaskData],
        *,
        drop: str | None,
        progress: Progress,
        what: str,
        done: str,
    ) -> Report:
        """Roll back to the latest clean snapshot at or before ``index`` and replay the rest; commit.

        The one replay routine of exact unlearning and records forgetting. Every live mega-batch but
        ``drop`` is learned again from ``sources[name]`` (its training data: the retained data, or
        what remains of it after records forgetting), in the original order with its original
        options, hence seeds; the earlier ones are replayed as ``previous`` data. Works on a copy and
        commits at the end (version bumped once), so an exception leaves the strategy as it was.

        Args:
            index: position in the live stream of the first mega-batch whose data changes (or that
                is dropped).
            sources: the training data of every live mega-batch but ``drop``.
            drop: a mega-batch to leave out of the rebuilt stream (exact unlearning), or None.
            progress: called as the work advances; may raise to cancel.
            what: the operation, for error messages ("exact unlearning of 'mb1'").
            done: the final progress message.

        Raises:
            ValueError: when no clean snapshot precedes ``index`` or some live data is missing.
        """
        stream = self._stream
        clean = [i for i in range(index + 1) if stream[i].exact and stream[i].before is not None]
        if not clean:  # cannot happen with replay=full from the start; a checkpoint of another mode might
            raise ValueError(f"{what} is impossible: no clean snapshot was kept before {stream[index].name!r}")
        start = clean[-1]
        origin = stream[start]
        assert origin.before is not None
        missing = [m.name for m in stream if m.name != drop and m.name not in sources]
        if missing:
            raise ValueError(
                f"{what} needs the retained data of every other live mega-batch as replay; "
                f"missing: {', '.join(repr(name) for name in missing)}"
            )
        started = time.perf_counter()
        model = copy.deepcopy(self._model)
        model.load_state_dict(origin.before)
        rebuilt = list(stream[:start])
        to_replay = [m for m in stream[start:] if m.name != drop]
        progress(0.0, f"rolled back to before {origin.name!r}; replaying {len(to_replay)} mega-batches")
        for k, megabatch in enumerate(to_replay):
            snapshot: dict[str, torch.Tensor] | None = None
            snapshot_version = _UNSERVED
            if self._keeps_snapshot(len(rebuilt)):
                if k == 0:  # still the rollback point: the same (immutable) snapshot, served at its version
                    snapshot, snapshot_version = origin.before, origin.before_version
                else:  # an intermediate model of this replay, never served
                    snapshot = module_state_cpu(model)
            self._learn_megabatch(
                model,
                megabatch.name,
                sources[megabatch.name],
                megabatch.options,
                [sources[m.name] for m in rebuilt],
                has_previous=bool(rebuilt),
                progress=scaled_progress(progress, k, len(to_replay), f"replaying {megabatch.name!r}"),
            )
            rebuilt.append(MegaBatch(megabatch.name, megabatch.options, snapshot, True, snapshot_version))
        progress(1.0, done)

        self._model = model
        self._stream = rebuilt
        self._model_exact = True
        self._pending_before = None
        self._pending_before_version = _UNSERVED
        self._commit()
        return Report(
            metrics={
                "unlearn_seconds": time.perf_counter() - started,
                "replayed_megabatches": float(len(to_replay)),
            }
        )

    def _unlearn_approximate(self, index: int, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        cfg = self.config
        task = self._stream[index].name
        forget = replay.get(task)
        if forget is None or len(forget) == 0:
            raise ValueError(
                f"approximate unlearning of mega-batch {task!r} needs its own data: pass the server's retained "
                f"data of {task!r} as replay[{task!r}] (before it is purged)"
            )
        started = time.perf_counter()
        seed = derive_seed(cfg.seed, "lure-approximate", task)
        model = copy.deepcopy(self._model)
        progress(0.0, f"scoring the weights most salient for {task!r}")
        with seeded_rng(derive_seed(seed, "importance-rng")):
            scores = importance_scores(
                model, "snip", forget, batch_size=cfg.batch_size, device=self._device, rng=seeded_generator(seed, "rng")
            )
        salient = top_fraction_masks(scores, cfg.unlearn_fraction, cfg.keep_scope)
        importance_seconds = time.perf_counter() - started
        count = reinit_where(model, self._fresh_network(derive_seed(seed, "fresh-init")), salient)
        retained = [replay[m.name] for m in self._stream if m.name != task and m.name in replay]
        relearn = concat(retained) if retained else None
        if relearn is not None and cfg.relearn_epochs > 0:
            settings = self._settings(cfg.relearn_epochs, cfg.batch_size, cfg.lr)
            with seeded_rng(derive_seed(seed, "global-rng")):
                train(
                    model,
                    relearn,
                    settings,
                    device=self._device,
                    rng=seeded_generator(seed, "relearn"),
                    progress=scaled_progress(progress, 0, 1, "relearning on the retained data"),
                )

        # Bookkeeping for later exact unlearning: the snapshot taken before `task` is the exact
        # "before" of its successor; the snapshots after that one carry its traces.
        stream = list(self._stream)
        removed = stream.pop(index)
        pending = None
        pending_version = _UNSERVED
        if index < len(stream):
            stream[index] = replace(
                stream[index], before=removed.before, exact=removed.exact, before_version=removed.before_version
            )
            for i in range(index + 1, len(stream)):
                stream[i] = replace(stream[i], exact=False)
        elif removed.exact:
            pending, pending_version = removed.before, removed.before_version

        progress(1.0, f"unlearned mega-batch {task!r} approximately")

        self._model = model
        self._stream = stream
        self._model_exact = False
        self._pending_before = pending
        self._pending_before_version = pending_version
        self._commit()
        return Report(
            metrics={
                "unlearn_seconds": time.perf_counter() - started,
                "importance_seconds": importance_seconds,
                "reinitialized_fraction": count / sum(p.numel() for p in model.parameters()),
                "relearn_samples": float(len(relearn) if relearn is not None and cfg.relearn_epochs > 0 else 0),
                "replayed_megabatches": 0.0,
            }
        )


def _cpu_copy(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if state is None:
        return None
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
