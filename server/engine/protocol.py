"""The verb API every strategy implements (DESIGN.md section 4).

A strategy is a plain object, not a subclass: anything with these attributes and methods is a
strategy. The worker thread owns the strategy and is the only caller of ``learn``, ``unlearn`` and
``load_state_dict``; ``predictor()`` returns an immutable snapshot that RPC threads may call
concurrently while the worker keeps training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch

#: Called by a strategy as it works: ``progress(fraction_done, message)``; fraction in [0, 1].
Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A :data:`Progress` that ignores every report."""


@dataclass(frozen=True)
class TaskData:
    """Samples of one task, already validated and on the CPU.

    Attributes:
        inputs: float32 ``[n, *input_shape]``, values as the client sent them (UINT8 scaled to [0, 1]).
        labels: int64 ``[n]`` in ``[0, num_classes)``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class LearnOptions:
    """Every per-job option of a Learn; a zero field means "the strategy's default".

    The server resolves zeros once, at submission (:meth:`resolved` against the configured
    overrides, then the strategy's :attr:`Strategy.learn_defaults`), and stores the result on the
    job, so the job row says exactly what ran.

    Attributes:
        epochs: passes over the task's training samples.
        batch_size: samples per optimizer step.
        learning_rate: the optimizer's (initial) learning rate.
        holdout_fraction: share of the stream held out as the task's probe set (server-side split).
        temporary: learn into an exactly forgettable side network (LearnMode.TEMPORARY).
        seed: root of every random choice of the job.
    """

    epochs: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    holdout_fraction: float = 0.0
    temporary: bool = False
    seed: int = 0

    def resolved(self, defaults: LearnOptions) -> LearnOptions:
        """These options with every zero number replaced by the value in ``defaults``."""
        return replace(
            self,
            epochs=self.epochs or defaults.epochs,
            batch_size=self.batch_size or defaults.batch_size,
            learning_rate=self.learning_rate or defaults.learning_rate,
            holdout_fraction=self.holdout_fraction or defaults.holdout_fraction,
            seed=self.seed or defaults.seed,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored on the job row)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LearnOptions:
        """Read :meth:`as_dict` output back; unknown keys are ignored, missing ones are zero."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class Report:
    """What a learn or unlearn call tells the worker.

    Attributes:
        metrics: numbers recorded on the Job (e.g. ``train_loss``, ``unlearn_seconds``).
        retain: data the server should keep for replay on behalf of this task (replaying
            strategies only); ``None`` keeps nothing. Purged when the task is unlearned.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    retain: TaskData | None = None


class UnknownTaskError(KeyError):
    """A predictor was asked for a task it has never learned."""


class UnlearnedTaskError(KeyError):
    """A predictor was asked for an unlearned task without ``allow_unlearned``."""


@runtime_checkable
class Predictor(Protocol):
    """An immutable serving snapshot. Safe to call from many threads at once."""

    version: int

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Return logits ``[n, num_classes]`` for float32 ``inputs`` ``[n, *input_shape]``.

        Task-incremental strategies require ``task`` and raise :class:`UnknownTaskError` or
        :class:`UnlearnedTaskError`; class-incremental ones require ``task is None``.
        Logits of classes the task never saw are ``-inf`` for task-incremental strategies.
        """
        ...

    # Optional capability (not part of the protocol's required members, looked up with getattr):
    #
    #     def network(self, task: str | None) -> torch.nn.Module
    #
    # The network ``predict`` serves for ``task``, as a standalone module (export, DESIGN.md
    # section 9): CPU, float32, eval mode, gradients off, sharing no tensor with the snapshot, whose
    # ``forward(x)`` for float32 ``x`` ``[n, *input_shape]`` returns the logits ``predict(task, x)``
    # returns, ``-inf`` at the classes a task never saw included (``networks.MaskedLogits``). No
    # generator inside: a hypernetwork strategy bakes the task's generated weights into a plain
    # backbone. Same rules as ``predict`` without ``allow_unlearned``: ``ValueError`` for a missing or
    # superfluous task, :class:`UnknownTaskError`, :class:`UnlearnedTaskError`. Called from gRPC
    # threads: it reads only the snapshot's immutable state. A predictor without it cannot be exported.


@runtime_checkable
class Strategy(Protocol):
    """A continual learning and unlearning method."""

    name: str
    #: Predict needs a task name (multi-head / generated per task) when True.
    task_incremental: bool
    #: The server keeps ``Report.retain`` data and passes it back as ``replay``.
    needs_replay: bool
    #: Accepted ``UnlearnRequest.method`` values; the first one is the default.
    unlearn_methods: tuple[str, ...]
    #: Monotonic counter bumped by every successful learn or unlearn.
    version: int
    #: What a Learn gets for each option it leaves at zero (and the server does not override).
    learn_defaults: LearnOptions

    def learn(
        self,
        task: str,
        data: TaskData,
        options: LearnOptions,
        progress: Progress,
        replay: Mapping[str, TaskData],
    ) -> Report:
        """Learn ``task`` from ``data``; ``replay`` holds retained data of other live tasks."""
        ...

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Forget ``task``.

        ``replay`` holds the retained data of the live tasks, including the forgotten task's own
        (methods such as LURE's ``approximate`` need it to find what to forget); the server purges
        the forgotten task's data right after this call returns.
        """
        ...

    # Optional capability (not part of the protocol's required members, looked up with getattr):
    #
    #     def forget_more(self, task: str, attempt: int, progress: Progress, *, final: bool) -> Report | None
    #
    # Called by the worker after ``unlearn(task, ...)`` while the forgotten task does not measure at
    # its reference (DESIGN.md section 9), with ``attempt`` = 1, 2, ... (the unlearn was attempt 0 of
    # the extra ones) and ``final`` True on the last call the bound allows, where a strategy should
    # use its strongest method. It forgets ``task`` harder as one committed operation (version
    # bumped, all-or-nothing like every operation) and returns its metrics, or returns None, changing
    # nothing, when it has nothing stronger (e.g. an explicit ablation such as method ``none``).
    # A strategy without it has nothing stronger.
    #
    # Records-level forgetting (DESIGN.md section 9), optional, looked up with getattr:
    #
    #     def sample_forgetting(self) -> str | None
    #
    # None when ``forget_samples`` can run with this configuration; otherwise the reason it cannot,
    # naming what would work (the server refuses a records unlearn with FAILED_PRECONDITION and this
    # text). A strategy that supports it returns from ``learn`` ``Report(retain=data)``, the very
    # object it was given: the server keeps that as the task's training data, in order.
    #
    #     def forget_samples(self, kept: Mapping[str, TaskData], progress: Progress,
    #                        replay: Mapping[str, TaskData]) -> Report
    #
    # Forget some training samples of the live tasks named in ``kept``: afterwards the model is what
    # the strategy would hold had each such task been learned from ``kept[task]`` (its remaining
    # training samples, in stream order) instead. ``replay`` holds the retained training data of the
    # other live tasks. One committed operation (version bumped once, all-or-nothing, may be
    # cancelled by ``progress`` raising). Metrics as for ``unlearn`` (``unlearn_seconds``, ...).
    #
    #     def rollback_predictor(self, tasks: Collection[str]) -> Predictor | None
    #
    # A serving snapshot of a model that never saw any data of ``tasks`` (class-incremental
    # strategies: the model before the first of them was learned), with ``version`` the model version
    # it was live at; None when there is none. Called from RPC threads while the worker trains: it
    # must read only immutable state and must not touch global RNG state.

    def predictor(self) -> Predictor:
        """Return the current immutable serving snapshot."""
        ...

    def parameter_count(self) -> int:
        """Number of trainable parameters of the whole model (e.g. hypernetwork + embeddings)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a restart (tensors, RNG state, schedules)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@runtime_checkable
class TemporaryLearning(Protocol):
    """Optional capability: CLPU temporary learning with exact forgetting (DESIGN.md sections 4 and 9).

    A strategy that has these methods (checked with :func:`supports_temporary`) accepts
    ``LearnMode.TEMPORARY``. A temporary task lives in an isolated side network of the configured
    backbone (own parameters, optimizer state and BatchNorm statistics), never in the main model,
    which stays bit-for-bit as it was. Each method is one committed operation (version bumped,
    all-or-nothing: ``progress`` may raise to cancel and nothing changes), and :meth:`Strategy.state_dict`
    holds the live side networks. The predictor answers a temporary task from its side network
    (task-incremental strategies) or routes between the main model and the side networks
    (class-incremental ones).
    """

    def learn_temporary(self, task: str, data: TaskData, options: LearnOptions, progress: Progress) -> Report:
        """Train a new side network for ``task`` on ``data`` only.

        Returns ``Report(retain=data)``, the very object given: the server keeps the task's training
        data until the task is committed or forgotten.

        Raises:
            ValueError: ``task`` is live (in the main model or as a side network), or bad data.
        """
        ...

    def forget_temporary(self, task: str, progress: Progress) -> Report:
        """Delete ``task``'s side network: exact forgetting; the main model is not touched.

        Raises:
            UnknownTaskError: ``task`` has no side network.
        """
        ...

    def commit_temporary(self, task: str, data: TaskData, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Learn ``task`` into the main model from its training data ``data``, distilling its side network
        (CLPU-DER++: cross-entropy plus logit matching to the side network on the same samples), with the
        options it was learned with; then delete the side network. ``replay`` as for ``learn``.

        Raises:
            UnknownTaskError: ``task`` has no side network.
        """
        ...

    def temporary_tasks(self) -> tuple[str, ...]:
        """Tasks that live as side networks now, sorted."""
        ...


def supports_temporary(strategy: object) -> bool:
    """Whether ``strategy`` implements the optional :class:`TemporaryLearning` capability."""
    return isinstance(strategy, TemporaryLearning)
