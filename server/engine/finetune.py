"""Strategy ``finetune``: the naive continual-learning baseline (a lower bound, on purpose).

One backbone trunk is shared by all tasks and trained sequentially with no protection against
forgetting; every task has its own output head (a copy of the backbone's initial head, created
when the task is first learned). BatchNorm statistics are shared across tasks, which is one of
the reasons this baseline forgets. Unlearning deletes the task's head.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

from server.engine.backbones import build_backbone, detach_head
from server.engine.protocol import (
    LearnOptions,
    Progress,
    Report,
    TaskData,
    UnknownTaskError,
    UnlearnedTaskError,
)
from server.engine.training import (
    check_learn_inputs,
    check_predict_inputs,
    class_mask,
    count_minibatches,
    derive_seed,
    linear_init_params,
    mask_logits,
    minibatches,
    module_state_cpu,
    seeded_generator,
    seeded_rng,
)

_STATE_FORMAT = "lethe.finetune/1"


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
            features = self._trunk(x.to(self._device))  # [n, feature_dim]
            if head is not None:
                logits = head(features)
            else:
                weight, bias = linear_init_params(
                    self._feature_dim, self._num_classes, seeded_generator(self._seed, "unlearned-head", task)
                )
                logits = F.linear(features, weight.to(self._device), bias.to(self._device))
            logits = mask_logits(logits, self._masks[task])
        return logits.to("cpu", torch.float32)


class FinetuneStrategy:
    """Naive sequential fine-tuning of a shared trunk with one head per task.

    Built by :func:`build_finetune`. The worker thread is the only caller of every method except
    the predictors it hands out.
    """

    name: str = "finetune"
    task_incremental: bool = True
    needs_replay: bool = False
    supports_temporary: bool = False
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
    ) -> None:
        self.version = 0
        self._config: dict[str, Any] = {
            "backbone": backbone,
            "input_shape": tuple(int(d) for d in input_shape),
            "num_classes": int(num_classes),
            "cifar_stem": bool(cifar_stem),
            "width": int(width),
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
        self._heads = nn.ModuleDict()  # _head_key(task) -> nn.Linear, live tasks only
        self._classes: dict[str, tuple[int, ...]] = {}  # every task ever learned -> its seen classes
        self._unlearned: set[str] = set()

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
                strategy seed, ``options.seed`` and the model version.
            progress: called after every batch.
            replay: ignored (this strategy does not replay).

        Returns:
            Metrics ``train_loss`` and ``train_accuracy`` (last epoch, percent),
            ``learn_seconds`` and ``samples``.
        """
        check_learn_inputs(data, options, self._input_shape, self._num_classes)
        started = time.perf_counter()
        key = _head_key(task)
        live = key in self._heads
        classes = tuple(sorted(set(data.labels.tolist()) | set(self._classes[task] if live else ())))
        trunk = copy.deepcopy(self._trunk)
        head: nn.Module = copy.deepcopy(self._heads[key] if live else self._head_template)
        mask = class_mask(classes, self._num_classes, self._device)
        generator = seeded_generator(self._seed, options.seed, self.version, "learn")
        optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=options.learning_rate)
        trunk.train()
        head.train()

        n = len(data)
        batches_per_epoch = count_minibatches(n, options.batch_size)
        total_steps = options.epochs * batches_per_epoch
        step = 0
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.long, device=self._device)
        for epoch in range(options.epochs):
            loss_sum.zero_()
            correct.zero_()
            for batch, indices in enumerate(minibatches(n, options.batch_size, generator)):
                x = data.inputs[indices].to(self._device, torch.float32)  # [b, *input_shape]
                y = data.labels[indices].to(self._device)  # [b]
                logits = mask_logits(head(trunk(x)), mask)  # [b, num_classes]
                loss = F.cross_entropy(logits, y)
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

        # Commit: nothing above touched the strategy's own state.
        self._trunk = trunk
        self._heads[key] = head
        self._classes[task] = classes
        self._unlearned.discard(task)
        self.version += 1
        return Report(
            metrics={
                "train_loss": float(loss_sum) / n,
                "train_accuracy": 100.0 * float(correct) / n,
                "learn_seconds": time.perf_counter() - started,
                "samples": float(n),
            }
        )

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
        self._unlearned.add(task)
        self.version += 1
        progress(1.0, "head deleted")
        return Report(metrics={"unlearn_seconds": time.perf_counter() - started})

    def predictor(self) -> FinetunePredictor:
        """Return an immutable snapshot (eval-mode deep copies) for concurrent prediction."""
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
            feature_dim=self._feature_dim,
            seed=self._seed,
            device=self._device,
        )

    def parameter_count(self) -> int:
        """Trainable parameters of the trunk and of every live head."""
        modules: list[nn.Module] = [self._trunk, self._heads]
        return sum(p.numel() for module in modules for p in module.parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, task registry, version and seed.

        All tensors are CPU copies sharing no storage with the live model, and the whole value is
        made of dicts, lists, strings, numbers and tensors (loadable with ``weights_only=True``).
        No optimizer state: every learn starts a fresh Adam; shuffling is derived from
        (seed, options.seed, version).
        """
        return {
            "format": _STATE_FORMAT,
            "config": {**self._config, "input_shape": list(self._input_shape)},
            "seed": self._seed,
            "version": self.version,
            "trunk": module_state_cpu(self._trunk),
            "head_template": module_state_cpu(self._head_template),
            "heads": {
                task: module_state_cpu(self._heads[_head_key(task)])
                for task in self._classes
                if task not in self._unlearned
            },
            "classes": {task: list(classes) for task, classes in self._classes.items()},
            "unlearned": sorted(self._unlearned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; on error nothing is changed.

        Raises:
            ValueError: if the state is not a finetune state or was saved by a model of a
                different configuration (backbone, input shape, classes, stem, width).
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a finetune state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        saved = {**state["config"], "input_shape": tuple(state["config"]["input_shape"])}
        if saved != self._config:
            differences = ", ".join(
                f"{key}: saved {saved.get(key)!r}, configured {value!r}"
                for key, value in self._config.items()
                if saved.get(key) != value
            )
            raise ValueError(f"finetune state was saved with a different model configuration ({differences})")
        trunk = copy.deepcopy(self._trunk)
        trunk.load_state_dict(state["trunk"])
        template = copy.deepcopy(self._head_template)
        template.load_state_dict(state["head_template"])
        heads = nn.ModuleDict()
        for task, head_state in state["heads"].items():
            head = copy.deepcopy(template)
            head.load_state_dict(head_state)
            heads[_head_key(task)] = head
        classes = {task: tuple(int(c) for c in values) for task, values in state["classes"].items()}
        unlearned = set(state["unlearned"])
        live = set(classes) - unlearned
        if live != set(state["heads"]) or not unlearned <= set(classes):
            raise ValueError("finetune state is inconsistent: heads, classes and unlearned tasks do not match")

        self._trunk = trunk
        self._head_template = template
        self._heads = heads
        self._classes = classes
        self._unlearned = unlearned
        self._seed = int(state["seed"])
        self.version = int(state["version"])


def build_finetune(
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    cifar_stem: bool = True,
    width: int = 0,
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

    Returns:
        A fresh strategy at version 0.
    """
    return FinetuneStrategy(
        backbone=backbone,
        input_shape=input_shape,
        num_classes=num_classes,
        device=device,
        seed=seed,
        cifar_stem=cifar_stem,
        width=width,
    )
