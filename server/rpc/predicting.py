"""Predictions for both protocols (``lethe.v1`` Predict and the Open Inference Protocol's ModelInfer).

A request is checked on the event loop against the in-memory task states (cheap, no SQL), then its
rows go to the :class:`~server.rpc.batching.Batcher`, which runs forward passes on the executor (on
the event loop when they are known to be cheap). The task's state is checked again right before each
forward pass, against the model that runs it: an Unlearn accepted while a request waited is honoured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.protocol import Predictor, UnknownTaskError, UnlearnedTaskError
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from server.jobs import ServingState
from server.rpc.auth import Principal
from server.rpc.batching import Batcher
from server.rpc.validation import SampleLimits, task_name
from server.storage import TaskState

#: Bytes a response needs per row besides its logits: the class (varint, at most 10 bytes) and framing.
_ROW_OVERHEAD = 16
#: Bytes of a response besides its rows (model version, shape, field tags).
_RESPONSE_OVERHEAD = 1024


@dataclass(frozen=True)
class Prediction:
    """Logits ``[n, C]`` (float32) of one request and the model version that computed them."""

    logits: np.ndarray
    version: int

    @property
    def classes(self) -> np.ndarray:
        """The predicted class of each row (int64 ``[n]``)."""
        return self.logits.argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class Target:
    """What a request may be answered from: ``task`` (None for class-incremental models), checked."""

    task: str | None
    allow_unlearned: bool = False
    #: Set when an admin evaluates an unlearned task: who, for the audit trail.
    audited_principal: str | None = None


def max_response_rows(max_predict_samples: int, num_classes: int, max_message_bytes: int) -> int:
    """Most rows one request may carry so that its response fits in one message.

    A request that passes validation must never fail on the size of its answer (DESIGN.md §9).
    """
    per_row = num_classes * 4 + _ROW_OVERHEAD
    return max(1, min(max_predict_samples, (max_message_bytes - _RESPONSE_OVERHEAD) // per_row))


class PredictService:
    """Checks prediction targets and computes logits through the batcher.

    Args:
        serving: the published snapshot and task states.
        task_incremental: Predict needs a task name (True) or must not get one (False).
        strategy: the strategy's name, for messages.
        samples: input shape and number of classes.
        max_rows: rows one request may carry (see :func:`max_response_rows`).
        batcher: joins concurrent requests into forward passes.
        ready: whether the server is ready (readiness of ``lethe.v1.Lethe``).
    """

    def __init__(
        self,
        serving: ServingState,
        *,
        task_incremental: bool,
        strategy: str,
        samples: SampleLimits,
        max_rows: int,
        batcher: Batcher,
        ready: Callable[[], bool],
    ) -> None:
        self.serving = serving
        self.task_incremental = task_incremental
        self.strategy = strategy
        self.samples = samples
        self.max_rows = max_rows
        self.batcher = batcher
        self.ready = ready
        batcher.forward = self._forward
        batcher.version = self.version
        #: The error Predict gets while the server is not ready (a standby sets its own).
        self.not_ready: Callable[[], Exception] = lambda: UnavailableError(
            "the server is starting and its model is still loading; retry shortly",
            reason="MODEL_LOADING",
            retry_after=1.0,
        )

    def target(self, task: str, principal: Principal, *, allow_unlearned: bool = False, field: str = "task") -> Target:
        """Check that ``task`` may be answered now (raises the domain error a client should see)."""
        if not self.ready():  # before task states are loaded: say so, not "no such task"
            raise self.not_ready()
        if not self.task_incremental:
            if task:
                raise InvalidArgumentError(
                    field, f"must be empty: strategy {self.strategy!r} is class-incremental (one output space)"
                )
            if allow_unlearned:
                raise InvalidArgumentError("allow_unlearned", "applies only to task-incremental strategies")
            self.answering_model(None)
            return Target(None)
        name = task_name(task, field)
        state = self.serving.task_state(name)
        if state is None:
            raise NotFoundError(f"task {name!r} does not exist", reason="TASK_NOT_FOUND")
        if state == TaskState.LEARNING:
            raise FailedPreconditionError(
                f"task {name!r} is still being learned; wait for its learn job", reason="TASK_LEARNING"
            )
        if state in (TaskState.UNLEARNING, TaskState.UNLEARNED):
            if not allow_unlearned:
                raise FailedPreconditionError(
                    f"task {name!r} is {state.value}; predictions are refused (an admin may audit it with "
                    "allow_unlearned)",
                    reason="TASK_UNLEARNED",
                )
            if not principal.has("admin"):
                raise PermissionDeniedError(
                    "allow_unlearned needs the 'admin' scope", reason="SCOPE_MISSING", metadata={"scope": "admin"}
                )
            return Target(name, allow_unlearned=True, audited_principal=principal.name)
        self.answering_model(name)
        return Target(name)

    def servable_tasks(self) -> list[str]:
        """Tasks Predict answers for now (task-incremental models), sorted."""
        answering = self.serving.answering()
        return sorted(
            task
            for task, state in self.serving.task_states().items()
            if state in (TaskState.LEARNED, TaskState.TEMPORARY) and task not in answering.forgetting
        )

    def version(self) -> int:
        """The version of the model Predict answers from now (0 before one is loaded)."""
        predictor = self.serving.answering().predictor
        return predictor.version if predictor is not None else 0

    async def predict(self, target: Target, inputs: np.ndarray) -> Prediction:
        """Logits of ``inputs`` (float32 ``[n, *input_shape]``, validated) for a checked target."""
        logits, version = await self.batcher.submit((target.task, target.allow_unlearned), inputs)
        return Prediction(logits, version)

    # ------------------------------------------------- in a forward pass (executor or loop)
    def answering_model(self, task: str | None) -> Predictor:
        """The model Predict answers ``task`` from now (checked again: an Unlearn may have been accepted)."""
        answering = self.serving.answering()
        predictor = answering.predictor
        if predictor is None and answering.forgetting:
            jobs = ", ".join(sorted(set(answering.forgetting.values())))
            raise UnavailableError(
                f"an accepted unlearn (job {jobs}) is being applied and no model free of the data it forgets is "
                "kept; predictions resume when it ends",
                reason="UNLEARN_IN_PROGRESS",
            )
        if predictor is None:
            raise UnavailableError("the model is still loading; retry shortly", reason="MODEL_LOADING")
        if task is not None and task in answering.forgetting:
            raise UnavailableError(
                f"task {task!r}: samples of it are being forgotten (job {answering.forgetting[task]}); "
                "predictions resume when the job ends",
                reason="TASK_BEING_FORGOTTEN",
            )
        return predictor

    def _forward(self, key: tuple[str | None, bool], inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """One forward pass for one key (task, allow_unlearned): the answering model, checked again."""
        task, allow_unlearned = key
        predictor = self.answering_model(None if allow_unlearned else task)
        writable = np.require(inputs, requirements="W")  # torch wants a writable buffer; a copy if read-only
        try:
            logits = predictor.predict(task, torch.from_numpy(writable), allow_unlearned=allow_unlearned)
        except UnknownTaskError:
            raise NotFoundError(f"task {task!r} is not in the published model", reason="TASK_NOT_FOUND") from None
        except UnlearnedTaskError:
            raise FailedPreconditionError(
                f"task {task!r} is unlearned; predictions are refused", reason="TASK_UNLEARNED"
            ) from None
        return logits.numpy().astype(np.float32, copy=False), predictor.version
