"""Named fakes for the job layer: real strategies that are slow, fail or misbehave on purpose.

Each wraps a real strategy (everything it does not change is the real thing) and is handed to the
server through ``App(strategy_factory=...)``, so the worker, the SQL and the files are all real.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy.orm import Session

from server.checkpoints import CheckpointStore
from server.data import FileRecord
from server.engine.protocol import LearnOptions, Predictor, Progress, Report, Strategy, TaskData
from server.jobs.lifecycle import Lifecycle
from server.storage import Job


class _Wrapper:
    """Delegates every attribute to a real strategy."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def version(self) -> int:
        return self.inner.version


class SlowStrategy(_Wrapper):
    """Learns and unlearns only while :attr:`release` is set, reporting progress meanwhile (a job that
    runs for as long as a test needs, cancellable at any of its reports)."""

    def __init__(self, inner: Strategy, release: threading.Event, started: threading.Event | None = None) -> None:
        super().__init__(inner)
        self.release = release
        self.started = started or threading.Event()

    def learn(
        self, task: str, data: TaskData, options: LearnOptions, progress: Progress, replay: Mapping[str, TaskData]
    ) -> Report:
        self._hold(progress)
        return self.inner.learn(task, data, options, progress, replay)

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        self._hold(progress)
        return self.inner.unlearn(task, method, progress, replay)

    def forget_samples(
        self, kept: Mapping[str, TaskData], progress: Progress, replay: Mapping[str, TaskData]
    ) -> Report:
        self._hold(progress)
        return cast(Report, self.inner.forget_samples(kept, progress, replay))  # type: ignore[attr-defined]

    def _hold(self, progress: Progress) -> None:
        self.started.set()
        while not self.release.wait(0.01):
            progress(0.01, "waiting to be released")


class FailingStrategy(_Wrapper):
    """A real strategy whose model breaks on purpose at one point of the job that learns ``task``.

    ``fail_at``:
        ``"learn"`` — the learn raises after training (compute phase, before the checkpoint);
        ``"commit"`` — the learn succeeds and is checkpointed, then the commit phase's evaluation
        raises (the second ``predictor()`` call after the learn; the first is the divergence check).
    """

    def __init__(self, inner: Strategy, task: str, fail_at: str, fired: threading.Event) -> None:
        super().__init__(inner)
        self.task, self.fail_at, self.fired = task, fail_at, fired  # ``fired``: fail once, across rebuilds
        self._armed = -1

    def learn(
        self, task: str, data: TaskData, options: LearnOptions, progress: Progress, replay: Mapping[str, TaskData]
    ) -> Report:
        report = self.inner.learn(task, data, options, progress, replay)
        if task != self.task or self.fired.is_set():
            return report
        if self.fail_at == "learn":
            self.fired.set()
            raise RuntimeError(f"injected failure after learning {task!r}")
        self._armed = 2
        return report

    def predictor(self) -> Predictor:
        if self._armed > 0:
            self._armed -= 1
            if self._armed == 0:
                self.fired.set()
                raise RuntimeError(f"injected failure in the commit phase of {self.task!r}")
        return self.inner.predictor()


class GrowingStrategy(_Wrapper):
    """A real strategy whose model has :data:`GROWTH` more parameters once it has learned anything, like
    a strategy that adds capacity per task (what GetModel reports must follow it)."""

    #: Parameters added by the first learn.
    GROWTH = 1000

    def parameter_count(self) -> int:
        # Derived from the version (in every checkpoint), so a restored or restarted model agrees.
        return int(self.inner.parameter_count()) + (self.GROWTH if self.inner.version > 0 else 0)


def factory(make: Callable[[], Strategy], wrap: Callable[[Strategy], _Wrapper]) -> Callable[[], Strategy]:
    """A strategy factory that wraps every model ``make`` builds (the worker rebuilds it on restore)."""
    return lambda: cast(Strategy, wrap(make()))


class UnrecordableFailures(Lifecycle):
    """A lifecycle whose ``fail`` raises a non-database error: the end of a failed job cannot be recorded."""

    def fail(self, session: Session, job: Job, message: str) -> list[str]:
        raise RuntimeError("injected: the job's failure cannot be recorded")


class UnprunableCheckpoints(CheckpointStore):
    """A checkpoint store whose ``prune`` fails (an error after a job has committed)."""

    def prune(self, keep: str) -> list[FileRecord]:
        raise OSError("injected: cannot delete old checkpoints")
