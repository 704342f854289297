"""Temporary learning with exact forgetting (CLPU, the seed on CL and unlearning): side networks.

A TEMPORARY learn trains an *isolated side network*: a fresh instance of the configured backbone,
with its own parameters, optimizer state and BatchNorm statistics, trained on the task's data
only. The main model is not touched, bit for bit. Forgetting the task is deleting the side
network (exact and instant); committing it distills the side network into the main model
(CLPU-DER++: the main model learns the task from its retained data with an extra logit-matching
term towards the side network's logits on the same samples, see :func:`distillation_loss`), then
deletes it.

One departure from CLPU, on purpose: CLPU initializes a temporary network from a copy of the main
model. In Lethe permanent tasks can be unlearned too, so a side network initialized from the main
model would keep the influence of a permanent task after that task is forgotten. Here a side
network starts from the backbone's own initializer, seeded by the strategy seed, the task name and
its learn options: it holds nothing but its own task.

This module is strategy-agnostic: the side-network records and their state, the Adam trainer the
task-incremental strategies use, the distillation term, and the serving wrappers
(:class:`TaskSidePredictor` for task-incremental strategies, :class:`RoutedPredictor` for
class-incremental ones).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

from server.engine.networks import standalone
from server.engine.protocol import (
    LearnOptions,
    Predictor,
    Progress,
    Report,
    TaskData,
    UnknownTaskError,
    UnlearnedTaskError,
)
from server.engine.training import (
    class_mask,
    count_minibatches,
    mask_logits,
    minibatches,
    module_state_cpu,
)

#: Weight of the logit-matching (distillation) term of a commit, relative to cross-entropy
#: (DER++'s α; the paper's grid is 0.1 to 1.0 and 0.5 is its middle).
DISTILL_WEIGHT = 0.5
#: Softening temperature of the matching (Hinton et al.'s usual 2).
DISTILL_TEMPERATURE = 2.0
#: ``UnlearnRequest.method`` reported for the forgetting of a temporary task.
FORGET_METHOD = "delete-side-network"
#: Samples per forward pass when computing a side network's logits.
_INFER_BATCH = 1024


@dataclass(frozen=True)
class SideNetwork:
    """The side network of one TEMPORARY task.

    Attributes:
        task: the task name.
        network: the backbone (head included), on the strategy's device, eval mode, gradients off;
            never modified once recorded (serving snapshots share it).
        classes: the classes of the task's data, sorted.
        options: the learn options it was trained with (a commit learns with the same ones).
    """

    task: str
    network: nn.Module
    classes: tuple[int, ...]
    options: LearnOptions


class SideNetworks:
    """The live side networks of a strategy, by task; copy-on-write (a new dict per change) so snapshots share it.

    Args:
        build: returns a fresh backbone (head included) on the CPU, initialized from a given seed.
        num_classes: size of the output space.
        device: where the side networks live.
    """

    def __init__(self, build: Callable[[int], nn.Module], num_classes: int, device: torch.device) -> None:
        self._build = build
        self._num_classes = num_classes
        self._device = device
        self._live: Mapping[str, SideNetwork] = {}

    @property
    def live(self) -> Mapping[str, SideNetwork]:
        """Task → side network; replaced on every change, never modified (do not modify it)."""
        return self._live

    def __contains__(self, task: object) -> bool:
        return task in self._live

    def __len__(self) -> int:
        return len(self._live)

    def fresh(self, seed: int) -> nn.Module:
        """A new backbone on the device, in training mode, initialized from ``seed``."""
        return self._build(seed).to(self._device).train()

    def with_added(self, side: SideNetwork) -> Mapping[str, SideNetwork]:
        """The mapping with ``side`` added (for the caller to :meth:`replace` with at commit time)."""
        frozen = side.network.eval().requires_grad_(False)
        return {**self._live, side.task: SideNetwork(side.task, frozen, side.classes, side.options)}

    def without(self, task: str) -> Mapping[str, SideNetwork]:
        """The mapping without ``task``."""
        return {name: side for name, side in self._live.items() if name != task}

    def replace(self, live: Mapping[str, SideNetwork]) -> None:
        """Make ``live`` the side networks (the commit step of an operation)."""
        self._live = dict(live)

    def delete(self, task: str, progress: Progress, committed: Callable[[], None]) -> Report:
        """Forget ``task`` exactly, as one operation: drop its side network, then ``committed()`` (the
        strategy's own bookkeeping: a new version). Returns ``unlearn_seconds``.

        Raises:
            UnknownTaskError: ``task`` has no live side network (nothing changes).
        """
        started = time.perf_counter()
        self.get(task)
        progress(0.0, "deleting the side network")  # may raise to cancel: nothing changed yet
        self.replace(self.without(task))
        committed()
        progress(1.0, "side network deleted")
        return Report(metrics={"unlearn_seconds": time.perf_counter() - started})

    def get(self, task: str) -> SideNetwork:
        """The side network of ``task``.

        Raises:
            UnknownTaskError: ``task`` has no live side network.
        """
        side = self._live.get(task)
        if side is None:
            raise UnknownTaskError(f"task {task!r} is not a temporary task of this model")
        return side

    def parameter_count(self) -> int:
        """Parameters of every live side network."""
        return sum(p.numel() for side in self._live.values() for p in side.network.parameters())

    def logits(self, task: str, inputs: torch.Tensor) -> torch.Tensor:
        """``task``'s side-network logits ``[n, num_classes]`` on the device (unseen classes ``-inf``)."""
        side = self.get(task)
        mask = class_mask(side.classes, self._num_classes, self._device)
        return side_logits(side.network, inputs, mask, self._device)

    def state_dict(self) -> list[dict[str, Any]]:
        """CPU copies of every side network with its task, classes and options (``weights_only``-loadable)."""
        return [
            {
                "task": side.task,
                "classes": list(side.classes),
                "options": side.options.as_dict(),
                "state": module_state_cpu(side.network),
            }
            for side in self._live.values()
        ]

    def loaded(self, entries: list[dict[str, Any]]) -> Mapping[str, SideNetwork]:
        """The mapping :meth:`state_dict` saved, rebuilt (checks keys and shapes; changes nothing).

        Raises:
            ValueError: a task appears twice; ``RuntimeError`` from ``load_state_dict`` for a
                network of another shape.
        """
        live: dict[str, SideNetwork] = {}
        for entry in entries:
            task = str(entry["task"])
            if task in live:
                raise ValueError(f"side network of task {task!r} appears twice in the state")
            network = self._build(0).to(self._device)
            network.load_state_dict(entry["state"])
            live[task] = SideNetwork(
                task,
                network.eval().requires_grad_(False),
                tuple(int(c) for c in entry["classes"]),
                LearnOptions.from_dict(entry["options"]),
            )
        return dict(live)


def side_logits(network: nn.Module, inputs: torch.Tensor, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Masked logits ``[n, num_classes]`` of an eval-mode ``network`` on the device, without gradients."""
    with torch.no_grad():
        chunks = [
            mask_logits(network(inputs[s : s + _INFER_BATCH].to(device, torch.float32)), mask)
            for s in range(0, len(inputs), _INFER_BATCH)
        ]
    return torch.cat(chunks) if chunks else torch.empty(0, mask.numel(), device=device)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Logit matching to the side network over the task's ``classes``: softened KL divergence.

    ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` over ``classes`` with ``T =``
    :data:`DISTILL_TEMPERATURE`. DER++ matches logits with a mean squared error; here the teacher
    is a separately trained network whose logit scale is its own (a side network trained with SGD at
    lr 0.1 reaches logits of 20 and more), and the MSE's gradient, proportional to that gap, made
    the main model diverge (NaN) under the same SGD. The softened KL matches the same thing -- the
    side network's answer over the task's classes, shift included -- with gradients bounded by 1/T.

    Args:
        logits: the student's logits ``[b, num_classes]`` (masked or not).
        teacher: the side network's logits ``[b, num_classes]`` for the same samples.
        classes: int64 indices of the task's classes (the only finite teacher logits).
    """
    t = DISTILL_TEMPERATURE
    student = torch.log_softmax(logits.index_select(1, classes) / t, dim=1)
    target = torch.log_softmax(teacher.index_select(1, classes) / t, dim=1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True) * (t * t)


def fit_side_network(
    network: nn.Module,
    data: TaskData,
    options: LearnOptions,
    mask: torch.Tensor,
    generator: torch.Generator,
    progress: Progress,
    device: torch.device,
) -> dict[str, float]:
    """Train ``network`` in place with Adam and masked cross-entropy (the task-incremental recipe).

    Args:
        network: a fresh backbone on ``device`` (training mode).
        data: the task's training samples (CPU).
        options: epochs, batch size and learning rate.
        mask: bool ``[num_classes]``, True at the task's classes.
        generator: the shuffles.
        progress: called after every step; may raise to cancel.
        device: where ``network`` lives.

    Returns:
        ``train_loss`` and ``train_accuracy`` (percent) of the last epoch, and ``samples``.
    """
    optimizer = torch.optim.Adam(network.parameters(), lr=options.learning_rate)
    network.train()
    n = len(data)
    per_epoch = count_minibatches(n, options.batch_size)
    total, step = options.epochs * per_epoch, 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for epoch in range(options.epochs):
        loss_sum.zero_()
        correct.zero_()
        for batch, indices in enumerate(minibatches(n, options.batch_size, generator)):
            x = data.inputs[indices].to(device, torch.float32)  # [b, *input_shape]
            y = data.labels[indices].to(device)  # [b]
            logits = mask_logits(network(x), mask)  # [b, num_classes]
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += loss.detach() * y.numel()
                correct += (logits.argmax(dim=1) == y).sum()
            step += 1
            progress(step / total, f"side network: epoch {epoch + 1}/{options.epochs}, batch {batch + 1}/{per_epoch}")
    network.eval()
    return {"train_loss": float(loss_sum) / n, "train_accuracy": 100.0 * float(correct) / n, "samples": float(n)}


class TaskSidePredictor:
    """A task-incremental snapshot that answers TEMPORARY tasks from their side networks.

    Every other task goes to the wrapped snapshot; a task whose side network was deleted (its
    temporary learning forgotten) is refused as unlearned. Immutable: the side networks are never
    modified once recorded, and the mapping is a private frozen copy.

    Args:
        base: the strategy's own snapshot of the main model.
        sides: task → side network, live ones.
        forgotten: tasks whose side networks were deleted (never in the main model).
        num_classes: size of the output space.
        device: where the side networks live.
    """

    def __init__(
        self,
        base: Predictor,
        sides: Mapping[str, SideNetwork],
        forgotten: frozenset[str],
        num_classes: int,
        device: torch.device,
    ) -> None:
        self.base = base
        self.version = base.version
        self._sides = dict(sides)
        self._masks = {t: class_mask(s.classes, num_classes, device) for t, s in sides.items()}
        self._forgotten = forgotten
        self._device = device

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Logits ``[n, num_classes]`` (CPU float32): the side network's for a TEMPORARY task, else the base's.

        Raises:
            UnlearnedTaskError: the task was a temporary one whose side network was deleted; nothing
                of it remains in the model, so there is nothing to evaluate even with ``allow_unlearned``.
        """
        if task is not None and task in self._sides:
            x = inputs.to(torch.float32)
            if x.dim() < 2:
                raise ValueError(f"inputs must have shape [n, ...], got {list(inputs.shape)}")
            return side_logits(self._sides[task].network, x, self._masks[task], self._device).to("cpu", torch.float32)
        if task is not None and task in self._forgotten:
            raise UnknownTaskError(f"task {task!r} was learned temporarily and forgotten: its side network is deleted")
        return self.base.predict(task, inputs, allow_unlearned=allow_unlearned)

    def network(self, task: str | None) -> nn.Module:
        """The network :meth:`predict` serves for ``task`` (see ``protocol.Predictor``)."""
        if task is not None and task in self._sides:
            side = self._sides[task]
            return standalone(side.network, self._masks[task])
        if task is not None and task in self._forgotten:
            raise UnlearnedTaskError(f"task {task!r} was learned temporarily and forgotten")
        network = getattr(self.base, "network", None)
        if network is None:
            raise ValueError("this model cannot be exported")
        result: nn.Module = network(task)
        return result

    def __getattr__(self, name: str) -> Any:
        # Diagnostics of the base snapshot (e.g. a cache's statistics) stay reachable.
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class RoutedModule(nn.Module):
    """Class-incremental routing between the main model and the live side networks.

    The routing rule (documented in docs/architecture.md): each expert's confidence in a sample is
    its highest softmax probability over all outputs, counting only its own classes for a side
    network (trained, like the main model, against every output); the most confident expert answers,
    with its log-probabilities (over its task's classes for a side network, ``-inf`` elsewhere).
    With no side network the main model's logits pass through unchanged (the predictor does not
    route then). CLPU routes by task identity; a class-incremental request carries none, so the most
    confident expert stands in for it (an exactly forgettable ensemble: deleting a side network
    removes its expert and nothing else).

    Args:
        main: the main network (``[n, *input_shape]`` → ``[n, num_classes]``).
        sides: the side networks, in a fixed order.
        masks: bool ``[len(sides), num_classes]``, True at each side network's classes.
    """

    masks: torch.Tensor

    def __init__(self, main: nn.Module, sides: list[nn.Module], masks: torch.Tensor) -> None:
        super().__init__()
        self.main = main
        self.sides = nn.ModuleList(sides)
        self.register_buffer("masks", masks.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routed log-probabilities ``[n, num_classes]``."""
        main = torch.log_softmax(self.main(x).float(), dim=1)
        experts, confidence = [main], [main.max(dim=1).values]
        for k, side in enumerate(self.sides):
            logits = side(x).float()
            # Confidence over all outputs (a side network is trained against all of them), so that a
            # side network of one or two classes is not certain of everything by construction.
            confidence.append(torch.log_softmax(logits, dim=1).masked_fill(~self.masks[k], float("-inf")).amax(dim=1))
            experts.append(torch.log_softmax(logits.masked_fill(~self.masks[k], float("-inf")), dim=1))
        best = torch.stack(confidence).argmax(dim=0)  # [n]: the most confident expert per sample
        return torch.stack(experts)[best, torch.arange(x.shape[0], device=x.device)]


class RoutedPredictor:
    """A class-incremental snapshot serving the main model and the live side networks through :class:`RoutedModule`.

    Args:
        base: the strategy's snapshot of the main model (``predict(None, x)``).
        main: the main network (eval mode, never modified), for :meth:`network`.
        sides: task → side network (at least one).
        num_classes: size of the output space.
        device: where the networks live.
    """

    def __init__(
        self,
        base: Predictor,
        main: nn.Module,
        sides: Mapping[str, SideNetwork],
        num_classes: int,
        device: torch.device,
        batch_size: int = 1024,
    ) -> None:
        self.base = base
        self.version = base.version
        self._sides = dict(sides)
        names = sorted(sides)
        masks = torch.stack([class_mask(sides[t].classes, num_classes, device) for t in names])
        self._masks = masks
        self._main = main
        self._module = RoutedModule(main, [sides[t].network for t in names], masks)
        self._device = device
        self._batch_size = batch_size

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Routed logits ``[n, num_classes]`` (CPU float32); ``task`` must be None (one output space)."""
        if task is not None:
            raise ValueError(f"task must be empty for a class-incremental strategy, got {task!r}")
        self.base.predict(None, inputs[:0])  # the base's checks of the input shape
        if len(inputs) == 0:
            return torch.empty(0, self._masks.shape[1])
        with torch.inference_mode():
            chunks = [
                self._module(inputs[s : s + self._batch_size].to(self._device, torch.float32)).cpu()
                for s in range(0, len(inputs), self._batch_size)
            ]
        return torch.cat(chunks)

    def network(self, task: str | None) -> nn.Module:
        """A standalone copy of the routed module (see ``protocol.Predictor``)."""
        if task is not None:
            raise ValueError(f"task must be empty for a class-incremental strategy, got {task!r}")
        return standalone(self._module)

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode, gradient-free deep copy (for a snapshot that outlives later training)."""
    return copy.deepcopy(module).eval().requires_grad_(False)
