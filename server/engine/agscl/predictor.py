"""The immutable serving snapshot of an :class:`~server.engine.agscl.strategy.AgsclStrategy`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from server.engine.networks import standalone, with_mask
from server.engine.protocol import UnknownTaskError, UnlearnedTaskError
from server.engine.training import check_predict_inputs, class_mask, cpu_float32, mask_unseen, to_device, unseen_classes


class AgsclPredictor:
    """A snapshot of the trunk, the live heads and each task's BatchNorm statistics.

    Every tensor in it is a private copy that nothing modifies, so :meth:`predict` may run on many
    threads at once. A backbone with BatchNorm gets one module per task that shares the snapshot's
    parameters and holds the task's own running statistics (built from ``skeleton``, a ``meta``
    copy of the trunk's structure) (no module is ever re-parametrized
    during a call, which would not be thread-safe).

    An unlearned task has no head. With ``allow_unlearned`` it answers with the head its
    ``amnesia`` unlearning trained (when there is one), otherwise with equal logits for all its
    classes: the model keeps no parameter of the task, so it has nothing to say about it.
    """

    def __init__(
        self,
        *,
        version: int,
        trunk: nn.Module,
        heads: Mapping[str, nn.Linear],
        audit_heads: Mapping[str, nn.Linear],
        stats: Mapping[str, Mapping[str, torch.Tensor]],
        classes: Mapping[str, tuple[int, ...]],
        unlearned: frozenset[str],
        input_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
        skeleton: nn.Module | None = None,
    ) -> None:
        self.version = version
        self._trunk = trunk
        self._heads = MappingProxyType(dict(heads))
        self._audit_heads = MappingProxyType(dict(audit_heads))
        self._masks = MappingProxyType({task: class_mask(c, num_classes, device) for task, c in classes.items()})
        self._unseen = MappingProxyType({task: unseen_classes(mask) for task, mask in self._masks.items()})
        self._unlearned = unlearned
        self._input_shape = input_shape
        self._num_classes = num_classes
        self._device = device
        self._networks: dict[str, nn.Module] = {}
        if skeleton is not None:
            parameters = dict(trunk.named_parameters())
            for task, buffers in stats.items():
                network = copy.deepcopy(skeleton)
                network.load_state_dict({**parameters, **buffers}, assign=True)
                self._networks[task] = network.eval().requires_grad_(False)

    def _features(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return self._networks.get(task, self._trunk)(x)

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Return logits ``[n, num_classes]`` (CPU float32) of ``task`` for ``inputs`` ``[n, *input_shape]``.

        Logits of classes the task never saw are ``-inf``.

        Raises:
            ValueError: if ``task`` is ``None`` (this strategy is task-incremental) or the inputs
                have the wrong shape or dtype.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        if task is None:
            raise ValueError("strategy 'agscl' is task-incremental: predict needs a task name")
        x = to_device(check_predict_inputs(inputs, self._input_shape), self._device)
        head = self._heads.get(task)
        if head is None:
            if task not in self._unlearned:
                raise UnknownTaskError(f"task {task!r} was never learned")
            if not allow_unlearned:
                raise UnlearnedTaskError(f"task {task!r} was unlearned")
            head = self._audit_heads.get(task)
        with torch.no_grad():
            if head is None:
                logits = torch.zeros(x.shape[0], self._num_classes, device=self._device)
            else:
                logits = head(self._features(task, x))
            logits = mask_unseen(logits, self._unseen[task])
        return cpu_float32(logits)

    def network(self, task: str | None) -> nn.Module:
        """The network :meth:`predict` serves for ``task``: the trunk (with the task's statistics) and its head.

        Raises:
            ValueError: if ``task`` is ``None``.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned.
        """
        if task is None:
            raise ValueError("strategy 'agscl' is task-incremental: a network needs a task name")
        head = self._heads.get(task)
        if head is None:
            if task in self._unlearned:
                raise UnlearnedTaskError(f"task {task!r} was unlearned")
            raise UnknownTaskError(f"task {task!r} was never learned")
        source = self._networks.get(task, self._trunk)
        network = standalone(source)
        setattr(network, str(self._trunk.head_name), standalone(head))
        return with_mask(network, self._masks[task])
