"""Strategy ``finetune``: the naive continual-learning baseline (a lower bound, on purpose).

One backbone trunk is shared by all tasks and trained sequentially with no protection against
forgetting; every task has its own output head (a copy of the backbone's initial head, created
when the task is first learned). BatchNorm statistics are shared across tasks, which is one of
the reasons this baseline forgets. Unlearning deletes the task's head.

With ``capacity = "on"`` the trunk grows (seed on dynamic model size, :mod:`server.engine.finetune_growth`):
by ``grow_percent`` before every new task after the first and when the loss stays above ``grow_loss``;
growth changes no prediction.

With ``retain_training_data`` it also forgets single training samples exactly
(:meth:`FinetuneStrategy.forget_samples`): it keeps the trunk taken before each live task was
learned, rolls back to the one before the first affected task and learns the later tasks again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

from server.engine.agscl.growth import LossTrigger, extend_adam
from server.engine.backbones import build_backbone, detach_head
from server.engine.finetune_growth import FinetuneCapacity, TrunkGrowth
from server.engine.networks import standalone, with_mask
from server.engine.protocol import (
    LearnOptions,
    Progress,
    Report,
    TaskData,
    UnknownTaskError,
    UnlearnedTaskError,
)
from server.engine.temporary import (
    DISTILL_WEIGHT,
    SideNetwork,
    SideNetworks,
    TaskSidePredictor,
    distillation_loss,
    fit_side_network,
)
from server.engine.training import (
    check_learn_inputs,
    check_predict_inputs,
    class_mask,
    count_minibatches,
    cpu_float32,
    derive_seed,
    linear_from_state,
    linear_init_params,
    mask_logits,
    mask_unseen,
    minibatches,
    module_state_cpu,
    scaled_progress,
    seeded_generator,
    seeded_rng,
    to_device,
    unseen_classes,
)

_STATE_FORMAT = "lethe.finetune/1"


@dataclass(frozen=True)
class _Learned:
    """How a live task was learned, for replaying it (kept with ``retain_training_data`` only).

    Attributes:
        options: its learn options, as given.
        trunk_before: CPU ``state_dict`` of the trunk just before it was learned; never modified.
    """

    options: LearnOptions
    trunk_before: dict[str, torch.Tensor]


def _head_key(task: str) -> str:
    """A valid ``nn.ModuleDict`` key for any task name (names may contain '.', or be empty)."""
    return "t_" + task.encode("utf-8").hex()


class FinetunePredictor:
    """An immutable serving snapshot of a :class:`FinetuneStrategy`.

    Holds eval-mode deep copies of the trunk and of the live tasks' heads; nothing in it is ever
    modified after construction, so :meth:`predict` may run on many threads at once.
    """

    def __init__(
        self,
        *,
        version: int,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        classes: Mapping[str, tuple[int, ...]],
        unlearned: frozenset[str],
        input_shape: tuple[int, ...],
        num_classes: int,
        feature_dim: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.version = version
        self._trunk = trunk
        self._heads = MappingProxyType(dict(heads))
        self._masks = MappingProxyType({task: class_mask(c, num_classes, device) for task, c in classes.items()})
        self._unseen = MappingProxyType({task: unseen_classes(mask) for task, mask in self._masks.items()})
        self._unlearned = unlearned
        self._input_shape = input_shape
        self._num_classes = num_classes
        self._feature_dim = feature_dim
        self._seed = seed
        self._device = device

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Return logits ``[n, num_classes]`` (CPU float32) of ``task`` for ``inputs`` ``[n, *input_shape]``.

        Logits of classes the task never saw are ``-inf``. With ``allow_unlearned`` an UNLEARNED
        task is evaluated through a freshly initialized head on the current trunk: its head was
        deleted, so this is what the model knows about the task without it. That head is drawn
        from a generator seeded by the strategy seed and the task name, so the answer is
        deterministic (and identical across restarts) for a given model version.

        Raises:
            ValueError: if ``task`` is ``None`` (this strategy is task-incremental) or the inputs
                have the wrong shape or dtype.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        if task is None:
            raise ValueError("strategy 'finetune' is task-incremental: predict needs a task name")
        x = check_predict_inputs(inputs, self._input_shape)
        head = self._heads.get(task)
        if head is None:
            if task not in self._unlearned:
                raise UnknownTaskError(f"task {task!r} was never learned")
            if not allow_unlearned:
                raise UnlearnedTaskError(f"task {task!r} was unlearned")
        with torch.no_grad():
            features = self._trunk(to_device(x, self._device))  # [n, feature_dim]
            if head is not None:
                logits = head(features)
            else:
                weight, bias = linear_init_params(
                    self._feature_dim, self._num_classes, seeded_generator(self._seed, "unlearned-head", task)
                )
                logits = F.linear(features, weight.to(self._device), bias.to(self._device))
            logits = mask_unseen(logits, self._unseen[task])
        return cpu_float32(logits)

    def network(self, task: str | None) -> nn.Module:
        """The network :meth:`predict` serves for ``task``: the trunk with the task's head put back.

        A CPU float32 eval-mode backbone (the head under the backbone's ``head_name``, so its state
        dict reads like a fresh backbone's), wrapped in ``MaskedLogits`` when the task has not seen
        every class.

        Raises:
            ValueError: if ``task`` is ``None``.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned.
        """
        if task is None:
            raise ValueError("strategy 'finetune' is task-incremental: a network needs a task name")
        head = self._heads.get(task)
        if head is None:
            if task in self._unlearned:
                raise UnlearnedTaskError(f"task {task!r} was unlearned")
            raise UnknownTaskError(f"task {task!r} was never learned")
        network = standalone(self._trunk)  # a private copy: nn.Identity under head_name, put the head back
        setattr(network, str(self._trunk.head_name), standalone(head))
        return with_mask(network, self._masks[task])


class FinetuneStrategy:
    """Naive sequential fine-tuning of a shared trunk with one head per task.

    Built by :func:`build_finetune`. The worker thread is the only caller of every method except
    the predictors it hands out.

    With ``retain_training_data``, every learn returns its data as ``Report.retain`` (for the server to
    keep) and the strategy keeps, per live task, a CPU copy of the trunk taken just before the task
    was learned, with the task's options and place in the learning order, in :meth:`state_dict` too:
    memory and checkpoint size grow by one trunk (``parameter_count()`` less the heads, plus buffers,
    times the element size) per live task. That makes :meth:`forget_samples` possible. A live task
    cannot then be learned again (its training data must be replayable as one call's data).

    There is no ``rollback_predictor``: this strategy is task-incremental, so while samples of some
    tasks are being forgotten the server refuses to predict those tasks (DESIGN.md section 9).

    Temporary learning (:class:`~server.engine.protocol.TemporaryLearning`): a TEMPORARY task gets
    a side network, a fresh backbone (trunk and head) trained on its data only; Predict answers the
    task from it. Committing learns the task into the trunk and a new head as a permanent learn
    does, plus logit matching to the side network, then deletes the side network.
    """

    name: str = "finetune"
    task_incremental: bool = True
    needs_replay: bool = False
    learn_defaults: LearnOptions = LearnOptions(epochs=20, batch_size=32, learning_rate=1e-3, holdout_fraction=0.1)
    unlearn_methods: tuple[str, ...] = ("delete-head",)

    def __init__(
        self,
        *,
        backbone: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
        seed: int,
        cifar_stem: bool = True,
        width: int = 0,
        retain_training_data: bool = False,
        growth: FinetuneCapacity | None = None,
    ) -> None:
        self.version = 0
        self.retain_training_data = bool(retain_training_data)
        growth = growth or FinetuneCapacity()
        errors = growth.errors(backbone, self.retain_training_data)
        if errors:
            raise ValueError("invalid finetune configuration: " + "; ".join(errors))
        self._config: dict[str, Any] = {
            "backbone": backbone,
            "input_shape": tuple(int(d) for d in input_shape),
            "num_classes": int(num_classes),
            "cifar_stem": bool(cifar_stem),
            "width": int(width),
            **growth.as_dict(),
        }
        self._input_shape: tuple[int, ...] = self._config["input_shape"]
        self._num_classes = int(num_classes)
        self._device = torch.device(device)
        self._seed = int(seed)
        with seeded_rng(derive_seed(self._seed, "init")):
            model = build_backbone(backbone, self._input_shape, num_classes, cifar_stem=cifar_stem, width=width)
        head = detach_head(model)
        self._feature_dim = head.in_features
        self._trunk: nn.Module = model.to(self._device)
        self._head_template: nn.Linear = head.to(self._device)
        self._growth = TrunkGrowth(growth, self._trunk, backbone)
        self._grown_units = 0
        self._heads = nn.ModuleDict()  # _head_key(task) -> nn.Linear, live tasks only
        self._classes: dict[str, tuple[int, ...]] = {}  # every task ever learned -> its seen classes
        self._unlearned: set[str] = set()
        #: Live tasks learned with retain_training_data, in learning order (insertion order).
        self._learned: dict[str, _Learned] = {}
        self._sides = SideNetworks(self._fresh_backbone, self._num_classes, self._device)
        #: Temporary tasks whose side network was deleted (the main model never held them).
        self._forgotten_temporary: set[str] = set()

    def _fresh_backbone(self, seed: int) -> nn.Module:
        """The configured backbone, head included, initialized from ``seed`` (a side network), on the CPU."""
        cfg = self._config
        with seeded_rng(seed):
            return build_backbone(
                cfg["backbone"], self._input_shape, self._num_classes, cifar_stem=cfg["cifar_stem"], width=cfg["width"]
            )

    def _live(self) -> list[str]:
        """Tasks with a head, in the order they were first learned."""
        return [task for task in self._classes if task not in self._unlearned]

    def learn(
        self,
        task: str,
        data: TaskData,
        options: LearnOptions,
        progress: Progress,
        replay: Mapping[str, TaskData],
    ) -> Report:
        """Train the trunk and ``task``'s head on ``data`` with Adam and cross-entropy.

        A new task (or a previously unlearned one) gets a fresh copy of the initial head; a live
        task continues with its head and the union of its old and new classes. Training runs on
        copies that replace the model only when every epoch has finished, so an exception (for
        example from ``progress``, to cancel) leaves the strategy exactly as it was.

        Args:
            task: task name.
            data: CPU samples; inputs ``[n, *input_shape]``, labels ``[n]``.
            options: epochs, batch size, learning rate and seed; shuffling is seeded by the
                strategy seed, ``options.seed`` and the task name.
            progress: called after every batch.
            replay: ignored (this strategy does not replay).

        Returns:
            Metrics ``train_loss`` and ``train_accuracy`` (last epoch, percent),
            ``learn_seconds`` and ``samples``; with ``retain_training_data``, ``retain`` is ``data``
            itself (the server keeps it as the task's training data).

        Raises:
            ValueError: for bad data or options, if ``task`` is a temporary task, or, with
                ``retain_training_data``, if ``task`` is live.
        """
        if task in self._sides:
            raise ValueError(f"task {task!r} is a temporary task: commit it or unlearn it")
        return self._learn(task, data, options, progress, None)

    def _learn(
        self, task: str, data: TaskData, options: LearnOptions, progress: Progress, teacher: torch.Tensor | None
    ) -> Report:
        """:meth:`learn`, with ``teacher`` logits ``[n, num_classes]`` to match (a commit) or None."""
        check_learn_inputs(data, options, self._input_shape, self._num_classes)
        started = time.perf_counter()
        key = _head_key(task)
        live = key in self._heads
        if live and self.retain_training_data:
            raise ValueError(
                f"task {task!r} is already learned; with retain_training_data a task is learned in one call "
                "(so that its training data can be replayed): unlearn it first, or learn under a new name"
            )
        classes = tuple(sorted(set(data.labels.tolist()) | set(self._classes[task] if live else ())))
        trunk = copy.deepcopy(self._trunk)
        # Growth replaces heads with grown copies; the strategy's own modules are never modified.
        heads = {name: _as_linear(self._heads[_head_key(name)]) for name in self._live() if name != task}
        template = self._head_template
        grown = 0
        # The seed: grow by k % before every new task (the first one starts at the configured width).
        extra = self._growth.extra(trunk) if self._growth.options.on and not live and heads else {}
        if any(extra.values()):
            heads, template = self._growth.grow(
                trunk, heads, template, extra, derive_seed(self._seed, self.version, "grow")
            )
            grown += sum(extra.values())
        head: nn.Module = copy.deepcopy(self._heads[key] if live else template)
        growths = 0

        def grow_on_loss(current: nn.Module, epoch: int) -> nn.Module | None:
            nonlocal heads, template, grown, growths
            more = self._growth.extra(trunk)
            if not any(more.values()):
                return None
            assert isinstance(current, nn.Linear)
            seed = derive_seed(self._seed, self.version, "grow", "loss", epoch)
            grown_heads, template = self._growth.grow(trunk, {**heads, task: current}, template, more, seed)
            current = grown_heads.pop(task)
            heads = grown_heads
            grown += sum(more.values())
            growths += 1
            return current

        grower = grow_on_loss if self._growth.options.on else None
        metrics, head = self._fit(task, trunk, head, data, options, classes, progress, teacher, grower)

        # Commit: nothing above touched the strategy's own state.
        if teacher is not None:
            self._sides.replace(self._sides.without(task))
        if self.retain_training_data:
            self._learned[task] = _Learned(options, module_state_cpu(self._trunk))
        self._trunk = trunk
        self._heads = nn.ModuleDict({_head_key(name): module for name, module in heads.items()})
        self._heads[key] = head
        self._head_template = template
        self._grown_units += grown
        self._classes[task] = classes
        self._unlearned.discard(task)
        self._forgotten_temporary.discard(task)
        self.version += 1
        if self._growth.options.on:
            metrics.update(
                grown_units=float(grown), loss_growths=float(growths), parameters=float(self.parameter_count())
            )
        metrics["learn_seconds"] = time.perf_counter() - started
        return Report(metrics=metrics, retain=data if self.retain_training_data else None)

    def _fit(
        self,
        task: str,
        trunk: nn.Module,
        head: nn.Module,
        data: TaskData,
        options: LearnOptions,
        classes: tuple[int, ...],
        progress: Progress,
        teacher: torch.Tensor | None = None,
        grower: Callable[[nn.Module, int], nn.Module | None] | None = None,
    ) -> tuple[dict[str, float], nn.Module]:
        """Train ``trunk`` and ``head`` on ``data``; return the metrics and the head (a new one after a growth).

        Metrics: ``train_loss``, ``train_accuracy``, ``samples``.

        With ``grower`` (capacity on), when the epoch's mean loss has stayed above ``grow_loss`` for
        ``grow_patience`` epochs, ``grower(head, epoch)`` grows the trunk in place and returns the grown
        head (None at the maximum width); Adam's state is extended to the new weights.

        Shuffling is drawn from (seed, ``options.seed``, ``task``), not from the model version, so
        learning a task again after a rollback draws what learning it the first time drew. With
        ``teacher`` (logits ``[n, num_classes]`` of a side network on ``data``, on the device) the loss
        adds ``DISTILL_WEIGHT`` times the logit matching of :func:`distillation_loss`.
        """
        indices_of_classes = torch.tensor(classes, dtype=torch.long, device=self._device)
        mask = class_mask(classes, self._num_classes, self._device)
        generator = seeded_generator(self._seed, options.seed, task, "learn")
        optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=options.learning_rate)
        trunk.train()
        head.train()

        n = len(data)
        batches_per_epoch = count_minibatches(n, options.batch_size)
        total_steps = options.epochs * batches_per_epoch
        step = 0
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.long, device=self._device)
        options_ = self._growth.options
        trigger = LossTrigger(options_.grow_loss if grower is not None else 0.0, options_.grow_patience)
        for epoch in range(options.epochs):
            loss_sum.zero_()
            correct.zero_()
            for batch, indices in enumerate(minibatches(n, options.batch_size, generator)):
                x = data.inputs[indices].to(self._device, torch.float32)  # [b, *input_shape]
                y = data.labels[indices].to(self._device)  # [b]
                logits = mask_logits(head(trunk(x)), mask)  # [b, num_classes]
                loss = F.cross_entropy(logits, y)
                if teacher is not None:
                    loss = loss + DISTILL_WEIGHT * distillation_loss(
                        logits, teacher[indices.to(self._device)], indices_of_classes
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    loss_sum += loss.detach() * y.numel()
                    correct += (logits.argmax(dim=1) == y).sum()
                step += 1
                progress(
                    step / total_steps, f"epoch {epoch + 1}/{options.epochs}, batch {batch + 1}/{batches_per_epoch}"
                )
            if grower is not None and trigger.update(float(loss_sum) / n, epochs_left=options.epochs - epoch - 1):
                before = [*trunk.parameters(), *head.parameters()]
                grown = grower(head, epoch)
                if grown is not None:
                    head = grown.train()
                    optimizer = extend_adam(optimizer, before, [*trunk.parameters(), *head.parameters()])
        metrics = {
            "train_loss": float(loss_sum) / n,
            "train_accuracy": 100.0 * float(correct) / n,
            "samples": float(n),
        }
        return metrics, head

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Forget ``task`` by deleting its head; the trunk is left as it is.

        Args:
            task: a live task.
            method: ``"delete-head"`` or ``""`` (the default, the same).
            progress: reports 0 and 1.
            replay: ignored.

        Returns:
            Metric ``unlearn_seconds``.

        Raises:
            ValueError: for an unknown method.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if it is already unlearned.
        """
        if method not in ("", *self.unlearn_methods):
            raise ValueError(
                f"unknown unlearn method {method!r} for strategy 'finetune'; allowed: {', '.join(self.unlearn_methods)}"
            )
        if task in self._unlearned:
            raise UnlearnedTaskError(f"task {task!r} is already unlearned")
        key = _head_key(task)
        if key not in self._heads:
            raise UnknownTaskError(f"task {task!r} was never learned")
        started = time.perf_counter()
        progress(0.0, "deleting head")
        del self._heads[key]
        self._learned.pop(task, None)
        self._unlearned.add(task)
        self.version += 1
        progress(1.0, "head deleted")
        return Report(metrics={"unlearn_seconds": time.perf_counter() - started})

    # ------------------------------------------------------------ temporary learning

    def learn_temporary(self, task: str, data: TaskData, options: LearnOptions, progress: Progress) -> Report:
        """Train a side network for ``task``: a fresh backbone on ``data`` only (the main model is not touched).

        Initialized from (seed, ``task``, ``options.seed``), trained with Adam and masked cross-entropy
        like a permanent learn. Returns its metrics, ``learn_seconds`` and ``retain=data``.

        Raises:
            ValueError: ``task`` is live or already temporary, or bad data or options.
        """
        check_learn_inputs(data, options, self._input_shape, self._num_classes)
        if _head_key(task) in self._heads or task in self._sides:
            raise ValueError(f"task {task!r} is already learned")
        started = time.perf_counter()
        classes = tuple(sorted(set(data.labels.tolist())))
        network = self._sides.fresh(derive_seed(self._seed, "side-network", task, options.seed))
        generator = seeded_generator(self._seed, options.seed, task, "side-network")
        mask = class_mask(classes, self._num_classes, self._device)
        metrics = fit_side_network(network, data, options, mask, generator, progress, self._device)
        # Commit: only the side networks change.
        self._sides.replace(self._sides.with_added(SideNetwork(task, network, classes, options)))
        self._forgotten_temporary.discard(task)
        self.version += 1
        metrics["learn_seconds"] = time.perf_counter() - started
        return Report(metrics=metrics, retain=data)

    def forget_temporary(self, task: str, progress: Progress) -> Report:
        """Delete ``task``'s side network (exact forgetting); returns ``unlearn_seconds``."""

        def committed() -> None:
            self._forgotten_temporary.add(task)
            self.version += 1

        return self._sides.delete(task, progress, committed)

    def commit_temporary(self, task: str, data: TaskData, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Learn ``task`` into the trunk and a new head from ``data``, matching its side network's logits; delete it."""
        side = self._sides.get(task)
        teacher = self._sides.logits(task, data.inputs)  # [n, num_classes], -inf outside its classes
        report = self._learn(task, data, side.options, progress, teacher)
        report.metrics["distill_weight"] = DISTILL_WEIGHT
        return report

    def temporary_tasks(self) -> tuple[str, ...]:
        """Tasks that live as side networks now, sorted."""
        return tuple(sorted(self._sides.live))

    def sample_forgetting(self) -> str | None:
        """None with ``retain_training_data``; otherwise why :meth:`forget_samples` cannot run."""
        if self.retain_training_data:
            return None
        return (
            "records forgetting with finetune needs training.retain_training_data = true (the training data "
            "and the trunk before each task are kept to learn the tasks again without the samples); "
            "with this configuration, unlearn the whole task instead"
        )

    def forget_samples(
        self, kept: Mapping[str, TaskData], progress: Progress, replay: Mapping[str, TaskData]
    ) -> Report:
        """Forget some training samples of the live tasks named in ``kept``, exactly.

        Rolls the trunk back to the copy taken before the first affected task (the earliest in
        learning order among ``kept``'s keys) and learns every later live task again, in learning
        order, with its original options (hence shuffles): affected tasks from ``kept[task]``, the
        others from ``replay[task]``; each gets a fresh head, as at its first learn, and the classes
        of its data. Heads of earlier tasks are not touched. One committed operation: on any
        exception (``progress`` raising to cancel, say) nothing changes; on success the version is
        bumped once.

        What holds afterwards: the trunk and the live heads equal, bit for bit under deterministic
        settings, what the same request history would have produced with each affected task learned
        from ``kept[task]``, except for tasks unlearned whole (head deleted) that had been learned
        after the first affected task: their data is gone, so they are not learned again and their
        influence on the trunk goes too, as if they had never been learned. Tasks unlearned whole
        that had been learned before it keep their influence (it is in the rollback copy). So with no
        whole-task unlearning after the first affected task, the model equals a fresh strategy of
        the same configuration that learned the reduced stream.

        Args:
            kept: live task → its remaining training samples, in stream order (non-empty).
            progress: called as the work advances; may raise to cancel.
            replay: the retained training data of the other live tasks (at least those learned after
                the first affected task; entries for ``kept``'s names are ignored).

        Returns:
            Metrics ``unlearn_seconds`` and ``replayed_tasks``.

        Raises:
            ValueError: without ``retain_training_data``; when ``kept`` is empty, names a task that
                is not live, or holds no (or invalid) samples for one; when a live task has no
                rollback copy (it was learned without ``retain_training_data``); when the data of a
                later live task is missing from ``replay``.
        """
        reason = self.sample_forgetting()
        if reason is not None:
            raise ValueError(reason)
        if not kept:
            raise ValueError("forget_samples needs at least one live task in kept")
        live = [task for task in self._classes if task not in self._unlearned]
        unknown = [task for task in kept if task not in live]
        if unknown:
            raise ValueError(f"not live tasks of this finetune model: {', '.join(map(repr, unknown))}")
        unrecorded = [task for task in live if task not in self._learned]
        if unrecorded:
            raise ValueError(
                f"live task(s) {', '.join(map(repr, unrecorded))} were learned without retain_training_data: "
                "there is no trunk to roll back to and no record of how to learn them again; "
                "unlearn the whole task instead"
            )
        for task, data in kept.items():
            if len(data) == 0:
                raise ValueError(f"no training sample of task {task!r} would remain; unlearn the whole task instead")
            try:
                check_learn_inputs(data, self._learned[task].options, self._input_shape, self._num_classes)
            except ValueError as error:
                raise ValueError(f"kept data of task {task!r}: {error}") from None
        order = list(self._learned)
        first = min(order.index(task) for task in kept)
        later = order[first:]
        missing = [task for task in later if task not in kept and task not in replay]
        if missing:
            raise ValueError(
                "forgetting samples needs the retained data of every live task learned after the first affected "
                f"one as replay; missing: {', '.join(map(repr, missing))}"
            )

        started = time.perf_counter()
        trunk = copy.deepcopy(self._trunk)
        trunk.load_state_dict(self._learned[order[first]].trunk_before)
        heads: dict[str, nn.Module] = {}
        classes: dict[str, tuple[int, ...]] = {}
        learned: dict[str, _Learned] = {}
        progress(0.0, f"rolled the trunk back to before {order[first]!r}; learning {len(later)} task(s) again")
        for k, task in enumerate(later):
            record = self._learned[task]
            data = kept[task] if task in kept else replay[task]
            before = record.trunk_before if k == 0 else module_state_cpu(trunk)
            head: nn.Module = copy.deepcopy(self._head_template)
            classes[task] = tuple(sorted(set(data.labels.tolist())))
            _, head = self._fit(
                task,
                trunk,
                head,
                data,
                record.options,
                classes[task],
                scaled_progress(progress, k, len(later), f"learning {task!r} again"),
            )
            heads[task] = head
            learned[task] = _Learned(record.options, before)
        progress(1.0, f"forgot samples of {len(kept)} task(s)")

        # Commit: nothing above touched the strategy's own state.
        self._trunk = trunk
        for task, head in heads.items():
            self._heads[_head_key(task)] = head
        self._classes.update(classes)
        self._learned = {task: learned.get(task, record) for task, record in self._learned.items()}
        self.version += 1
        return Report(metrics={"unlearn_seconds": time.perf_counter() - started, "replayed_tasks": float(len(later))})

    def predictor(self) -> FinetunePredictor | TaskSidePredictor:
        """Return an immutable snapshot (eval-mode deep copies) for concurrent prediction.

        With temporary tasks (or forgotten ones) the snapshot answers those from their side networks.
        """
        base = self._main_predictor()
        if not self._sides.live and not self._forgotten_temporary:
            return base
        return TaskSidePredictor(
            base, self._sides.live, frozenset(self._forgotten_temporary), self._num_classes, self._device
        )

    def _main_predictor(self) -> FinetunePredictor:
        trunk = copy.deepcopy(self._trunk).eval().requires_grad_(False)
        heads = {
            task: copy.deepcopy(self._heads[_head_key(task)]).eval().requires_grad_(False)
            for task in self._classes
            if task not in self._unlearned
        }
        return FinetunePredictor(
            version=self.version,
            trunk=trunk,
            heads=heads,
            classes=dict(self._classes),
            unlearned=frozenset(self._unlearned),
            input_shape=self._input_shape,
            num_classes=self._num_classes,
            feature_dim=self._head_template.in_features,
            seed=self._seed,
            device=self._device,
        )

    def parameter_count(self) -> int:
        """Trainable parameters of the trunk and of every live head."""
        modules: list[nn.Module] = [self._trunk, self._heads]
        main = sum(p.numel() for module in modules for p in module.parameters() if p.requires_grad)
        return main + self._sides.parameter_count()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, task registry, version and seed.

        All tensors are CPU copies sharing no storage with the live model, and the whole value is
        made of dicts, lists, strings, numbers and tensors (loadable with ``weights_only=True``).
        No optimizer state: every learn starts a fresh Adam; shuffling is derived from
        (seed, options.seed, task). With ``retain_training_data``, ``learned`` lists the live tasks in
        learning order with their options and the trunk before each (one trunk per live task).
        """
        return {
            "format": _STATE_FORMAT,
            "config": {**self._config, "input_shape": list(self._input_shape)},
            "seed": self._seed,
            "version": self.version,
            "widths": self._growth.widths(self._trunk),
            "grown_units": self._grown_units,
            "trunk": module_state_cpu(self._trunk),
            "head_template": module_state_cpu(self._head_template),
            "heads": {
                task: module_state_cpu(self._heads[_head_key(task)])
                for task in self._classes
                if task not in self._unlearned
            },
            "classes": {task: list(classes) for task, classes in self._classes.items()},
            "unlearned": sorted(self._unlearned),
            "learned": [
                {"task": task, "options": record.options.as_dict(), "trunk_before": record.trunk_before}
                for task, record in self._learned.items()
            ],
            "side_networks": self._sides.state_dict(),
            "forgotten_temporary": sorted(self._forgotten_temporary),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; on error nothing is changed.

        ``retain_training_data`` is not part of the configuration checked: a state saved without it
        loads into a strategy with it (the tasks it holds cannot have samples forgotten, see
        :meth:`forget_samples`), and one saved with it loads into a strategy without it, which drops
        the trunk copies.

        Raises:
            ValueError: if the state is not a finetune state or was saved by a model of a
                different configuration (backbone, input shape, classes, stem, width).
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a finetune state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        # Options added after a state was saved are taken as configured (the state predates them).
        saved = {**self._config, **state["config"], "input_shape": tuple(state["config"]["input_shape"])}
        if saved != self._config:
            differences = ", ".join(
                f"{key}: saved {saved.get(key)!r}, configured {value!r}"
                for key, value in self._config.items()
                if saved.get(key) != value
            )
            raise ValueError(f"finetune state was saved with a different model configuration ({differences})")
        trunk = copy.deepcopy(self._trunk)
        self._growth.reshape(trunk, [int(w) for w in state.get("widths", self._growth.widths(trunk))])
        trunk.load_state_dict(state["trunk"])
        template = linear_from_state(state["head_template"], self._device)
        heads = nn.ModuleDict()
        for task, head_state in state["heads"].items():
            heads[_head_key(task)] = linear_from_state(head_state, self._device)
        classes = {task: tuple(int(c) for c in values) for task, values in state["classes"].items()}
        unlearned = set(state["unlearned"])
        live = set(classes) - unlearned
        if live != set(state["heads"]) or not unlearned <= set(classes):
            raise ValueError("finetune state is inconsistent: heads, classes and unlearned tasks do not match")
        learned: dict[str, _Learned] = {}
        # "learned" is absent from states saved before it existed; without retain_training_data the
        # trunk copies are dropped.
        for entry in state.get("learned", []) if self.retain_training_data else []:
            task = str(entry["task"])
            if task not in live or task in learned:
                raise ValueError(f"finetune state is inconsistent: learning record of {task!r}")
            before = copy.deepcopy(trunk)
            before.load_state_dict(entry["trunk_before"])  # checks the keys and shapes
            learned[task] = _Learned(LearnOptions.from_dict(entry["options"]), module_state_cpu(before))
        sides = self._sides.loaded(state.get("side_networks", []))  # absent from states saved before it existed
        if set(sides) & live:
            raise ValueError("finetune state is inconsistent: a task is both live and temporary")

        self._sides.replace(sides)
        self._forgotten_temporary = set(state.get("forgotten_temporary", []))
        self._trunk = trunk
        self._head_template = template
        self._heads = heads
        self._classes = classes
        self._unlearned = unlearned
        self._learned = learned
        self._seed = int(state["seed"])
        self._grown_units = int(state.get("grown_units", 0))
        self.version = int(state["version"])


def _as_linear(module: nn.Module) -> nn.Linear:
    assert isinstance(module, nn.Linear)
    return module


def build_finetune(
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    cifar_stem: bool = True,
    width: int = 0,
    retain_training_data: bool = False,
    capacity: str = "off",
    grow_percent: float = 25.0,
    grow_loss: float = 0.5,
    grow_patience: int = 10,
    max_width_factor: float = 8.0,
) -> FinetuneStrategy:
    """Build the ``finetune`` strategy.

    Args:
        backbone: a name from ``backbones.BACKBONES``.
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes over all tasks.
        device: where the model lives and trains; data arrives on the CPU.
        seed: seeds the initialization, the shuffling and the heads used for unlearned tasks.
        cifar_stem: ResNets only; see ``backbones.build_backbone``.
        width: ``mlp`` hidden width or ``cnn`` base channels; 0 = the backbone's default.
        retain_training_data: keep each task's training data (``Report.retain``) and the trunk before
            it, so that single samples can be forgotten exactly (records-level forgetting); costs one
            CPU copy of the trunk per live task, in memory and in checkpoints.
        capacity: ``off`` (fixed width) or ``on`` (``mlp`` and ``cnn``; not with ``retain_training_data``): every
            hidden layer grows by ``grow_percent`` before each new task and when the loss stays above
            ``grow_loss``; a growth changes no prediction (seed on dynamic model size).
        grow_percent: k, the percentage every hidden layer grows by.
        grow_loss: τ; with capacity on, the hidden layers also grow during a learn when the epoch's mean training
            loss stays above τ for ``grow_patience`` epochs in a row; 0 = never on the loss.
        grow_patience: epochs in a row the training loss must stay above ``grow_loss`` before a growth.
        max_width_factor: hidden layers never grow beyond this multiple of the configured width.

    Returns:
        A fresh strategy at version 0.

    Raises:
        ValueError: for an invalid option (all problems at once, each naming its option).
    """
    return FinetuneStrategy(
        backbone=backbone,
        input_shape=input_shape,
        num_classes=num_classes,
        device=device,
        seed=seed,
        cifar_stem=cifar_stem,
        width=width,
        retain_training_data=retain_training_data,
        growth=FinetuneCapacity(
            capacity=str(capacity),
            grow_percent=grow_percent,
            grow_loss=grow_loss,
            grow_patience=grow_patience,
            max_width_factor=max_width_factor,
        ),
    )
