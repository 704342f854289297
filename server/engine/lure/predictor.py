"""The immutable serving snapshot of a LURE model."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from server.engine.networks import standalone


class LurePredictor:
    """An eval-mode deep copy of the network at one model version.

    The copy is never trained or modified, and an eval-mode forward pass under ``inference_mode``
    mutates nothing, so any number of threads may call :meth:`predict` at once.

    Attributes:
        version: the strategy version this snapshot was taken at.
    """

    def __init__(
        self,
        model: nn.Module,
        version: int,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
        batch_size: int = 1024,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Snapshot ``model`` (deep copy, eval mode, gradients off).

        With ``state``, the copy is loaded with it: a snapshot of other weights of the same network
        (``load_state_dict`` copies them, so ``state`` is not shared).
        """
        frozen = copy.deepcopy(model).eval()
        if state is not None:
            frozen.load_state_dict(state)
        for param in frozen.parameters():
            param.requires_grad_(False)
        self._model = frozen
        self.version = version
        self._input_shape = tuple(input_shape)
        self._num_classes = num_classes
        self._device = device
        self._batch_size = batch_size

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Class-incremental logits ``[n, num_classes]`` (float32, CPU) over every class.

        Args:
            task: must be ``None``: LURE has one output space for all mega-batches.
            inputs: float32 ``[n, *input_shape]``.
            allow_unlearned: accepted for the protocol; meaningless without a task.

        Raises:
            ValueError: ``task`` is not ``None``, or ``inputs`` has the wrong shape.
        """
        if task is not None:
            raise ValueError(f"task must be empty for the class-incremental lure strategy, got {task!r}")
        if tuple(inputs.shape[1:]) != self._input_shape:
            raise ValueError(
                f"inputs must have shape [n, {', '.join(map(str, self._input_shape))}], got {list(inputs.shape)}"
            )
        # No train()/eval() toggling here: the copy is in eval mode for good, and flipping modes would
        # be a (harmless but racy) write from many threads.
        if len(inputs) == 0:
            return torch.empty(0, self._num_classes)
        with torch.inference_mode():
            chunks = [
                self._model(inputs[s : s + self._batch_size].to(self._device, torch.float32)).float().cpu()
                for s in range(0, len(inputs), self._batch_size)
            ]
        return torch.cat(chunks)

    @property
    def module(self) -> nn.Module:
        """The frozen network itself (eval mode, never modified; do not modify it)."""
        return self._model

    def network(self, task: str | None) -> nn.Module:
        """The network :meth:`predict` serves: a private CPU float32 eval-mode copy (no logit is masked).

        Raises:
            ValueError: ``task`` is not ``None``.
        """
        if task is not None:
            raise ValueError(f"task must be empty for the class-incremental lure strategy, got {task!r}")
        return standalone(self._model)
