"""The immutable serving snapshot of an UnCLE strategy."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from server.engine.protocol import UnknownTaskError, UnlearnedTaskError
from server.engine.training import check_predict_inputs
from server.engine.uncle.hypernetwork import ChunkedHypernetwork


@dataclass(frozen=True)
class ServedTask:
    """What a predictor needs to serve one task; never modified after construction.

    Attributes:
        embedding: the task embedding ``[embedding_dim]`` (a private copy).
        buffers: the task's own BatchNorm running statistics (private copies), name → tensor.
        mask: bool ``[num_classes]``, True at the classes the task has seen.
        unlearned: the task was unlearned.
    """

    embedding: torch.Tensor
    buffers: Mapping[str, torch.Tensor]
    mask: torch.Tensor
    unlearned: bool


@dataclass(frozen=True)
class _Generated:
    """A task's generated network at one version: its parameters, and a backbone that holds them."""

    parameters: Mapping[str, torch.Tensor]
    module: nn.Module


class UnclePredictor:
    """Predictions of one model version, safe to call from many threads at once.

    Generated parameters are cached per task: the first predict of a task at this version runs
    the hypernetwork once (under a lock, so concurrent first calls generate once) and assigns the
    result, with the task's BatchNorm statistics, to its own copy of the backbone in eval mode.
    Every later predict is one ordinary forward pass of that module, as cheap as the backbone
    with ordinary weights. In eval mode under ``no_grad`` a forward pass changes nothing in the
    module, so threads share it.

    Args:
        version: the model version this snapshot serves.
        hypernetwork: a frozen φ of this version; never modified afterwards.
        tasks: task name → :class:`ServedTask`, for every learned and unlearned task.
        skeleton: the backbone structure; copied and moved to ``meta``.
        input_shape: shape of one sample.
        device: where the hypernetwork lives and prediction runs.
    """

    def __init__(
        self,
        *,
        version: int,
        hypernetwork: ChunkedHypernetwork,
        tasks: Mapping[str, ServedTask],
        skeleton: nn.Module,
        input_shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        self.version = version
        self._hypernetwork = hypernetwork
        self._tasks = MappingProxyType(dict(tasks))
        # Logits to mask per task: None when the task has seen every class (nothing to mask).
        self._unseen = {name: None if bool(t.mask.all()) else ~t.mask for name, t in self._tasks.items()}
        self._template = copy.deepcopy(skeleton).to("meta").eval().requires_grad_(False)
        self._input_shape = input_shape
        self._device = device
        self._cache: dict[str, _Generated] = {}
        self._lock = threading.Lock()

    @property
    def tasks(self) -> tuple[str, ...]:
        """Names of the tasks this snapshot knows (learned and unlearned)."""
        return tuple(self._tasks)

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Return logits ``[n, num_classes]`` (CPU float32) of ``task`` for ``inputs`` ``[n, *input_shape]``.

        Logits of classes the task never saw are ``-inf``. With ``allow_unlearned`` an UNLEARNED
        task is evaluated with what the hypernetwork now generates for its embedding, so an
        auditor can check on their own data that the task is forgotten.

        Raises:
            ValueError: if ``task`` is ``None`` (UnCLE is task-incremental) or the inputs have the
                wrong shape or dtype.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        generated = self._generated(task, allow_unlearned)
        assert task is not None  # _generated refuses None
        x = check_predict_inputs(inputs, self._input_shape).to(self._device)
        with torch.no_grad():
            logits = generated.module(x)
        unseen = self._unseen[task]
        if unseen is not None:
            logits = logits.masked_fill(unseen, float("-inf"))
        return logits.to("cpu", torch.float32)

    def parameters_for(self, task: str, *, allow_unlearned: bool = False) -> Mapping[str, torch.Tensor]:
        """The generated backbone parameters of ``task`` at this version (cached; the same object every call).

        Raises:
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        return self._generated(task, allow_unlearned).parameters

    def _generated(self, task: str | None, allow_unlearned: bool) -> _Generated:
        served = self._served(task, allow_unlearned)
        assert task is not None
        cached = self._cache.get(task)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._cache.get(task)
            if cached is None:
                with torch.no_grad():
                    parameters = self._hypernetwork.generate(served.embedding)
                module = copy.deepcopy(self._template)
                module.load_state_dict({**parameters, **served.buffers}, assign=True)
                cached = _Generated(MappingProxyType(parameters), module)
                self._cache[task] = cached
        return cached

    def _served(self, task: str | None, allow_unlearned: bool) -> ServedTask:
        if task is None:
            raise ValueError("strategy 'uncle' is task-incremental: predict needs a task name")
        served = self._tasks.get(task)
        if served is None:
            raise UnknownTaskError(f"task {task!r} was never learned")
        if served.unlearned and not allow_unlearned:
            raise UnlearnedTaskError(f"task {task!r} was unlearned")
        return served
