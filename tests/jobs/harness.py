"""A real job context without a worker thread: the tests drive each phase of a job themselves.

Everything is real: the strategy (built by the registry), the database (the ``session_factory``
fixture, SQLite or PostgreSQL), the data directory, the audit trail and the metrics registry. Only
the loop of :class:`server.jobs.Worker` is replaced by the few calls below, in the order it makes them
(claim, compute, checkpoint, finish), so a test can stop between two phases and look.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from server.engine.protocol import LearnOptions, Strategy, no_progress
from server.engine.registry import build_strategy
from server.jobs import (
    JobEvents,
    JobService,
    LearnStream,
    LearnSubmission,
    QueueLimits,
    ServingState,
    UnlearnSubmission,
    WorkerSettings,
)
from server.jobs.context import JobContext, JobRun
from server.jobs.finish import finish
from server.jobs.kinds import handler_for
from server.storage import Job, JobRepository
from server.telemetry import Telemetry
from tests.support import digits

#: Principal of every request the harness makes.
PRINCIPAL = "tester"


def small_strategy(name: str) -> Callable[[], Strategy]:
    """A factory of strategy ``name`` on a narrow mlp for the digits.

    These tests check the handlers' plumbing (rows, files, states, audit), not what a model learns,
    so a width-32 mlp that trains in well under a second is enough; no claim here depends on the
    width, and the claims at the server's default width live in ``tests/integration``.
    """

    def build() -> Strategy:
        return build_strategy(
            name,
            backbone="mlp",
            input_shape=(1, 8, 8),
            num_classes=10,
            device=torch.device("cpu"),
            seed=0,
            options={"width": 32},
        )

    return build


@dataclass
class Harness:
    """A job context and the job service in front of the same database and data directory."""

    ctx: JobContext
    jobs: JobService
    data_dir: Path

    def options(self, epochs: int = 2, learning_rate: float = 0.0) -> LearnOptions:
        """Learn options as the servicer stores them: a 20% probe set, zeros resolved by the strategy."""
        requested = LearnOptions(epochs=epochs, learning_rate=learning_rate, holdout_fraction=0.2)
        return requested.resolved(self.ctx.strategy.learn_defaults)

    def submit_learn(self, task: str, classes: list[int], epochs: int = 2, learning_rate: float = 0.0) -> Job:
        """Stream the digits of ``classes`` through a :class:`LearnStream`; return the QUEUED job."""
        x, y = digits(classes)
        submission = LearnSubmission(task=task, idempotency_key="", options=self.options(epochs, learning_rate))
        with LearnStream(self.jobs, submission) as stream:
            stream.append(x, y, [])
            return stream.submit(PRINCIPAL, ended_early=lambda: False)

    def submit_unlearn(self, task: str) -> Job:
        """An Unlearn request for ``task`` with the strategy's default method."""
        return self.jobs.submit_unlearn(UnlearnSubmission(task, "test", "", ""), PRINCIPAL)

    def claim(self, job_id: str | None = None) -> Job:
        """QUEUED → RUNNING: ``job_id``, or the job the worker would run next."""
        with self.ctx.transaction() as session:
            repository = JobRepository(session)
            job = repository.next_runnable() if job_id is None else repository.get_for_update(job_id)
            assert job is not None, "nothing to claim"
            self.ctx.lifecycle.claim(session, job)
        return job

    def compute(self, job: Job) -> JobRun:
        """Run the compute phase of a claimed job and checkpoint a changed model, as the worker does."""
        run = JobRun(job, no_progress)
        metrics = handler_for(job).compute(self.ctx, run)
        run.changed_model, run.metrics = metrics is not None, metrics or {}
        if run.changed_model:
            self.ctx.checkpoint(job, run.metrics)
        return run

    def finish(self, run: JobRun) -> None:
        """The commit phase."""
        finish(self.ctx, run, handler_for(run.job))

    def run(self, job_id: str | None = None) -> JobRun:
        """Claim, compute and finish one job."""
        run = self.compute(self.claim(job_id))
        self.finish(run)
        return run

    def learn(self, task: str, classes: list[int]) -> JobRun:
        """Submit a learn and run it to its end."""
        return self.run(self.submit_learn(task, classes).id)

    def session(self) -> Session:
        """A session for reading (use as a context manager)."""
        return self.ctx.sessions()


def make_harness(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    *,
    strategy: str = "finetune",
    forget_probe_ops: int = 10,
    max_task_series: int = 100,
) -> Harness:
    """A ready job service and job context on ``sessions`` and ``tmp_path / "data"``."""
    data_dir = tmp_path / "data"
    events, serving = JobEvents(), ServingState()
    settings = WorkerSettings(
        data_dir=data_dir, seed=0, max_probe_samples=1000, forget_probe_ops=forget_probe_ops, forget_max_attempts=1
    )
    telemetry = Telemetry(CollectorRegistry(), max_task_series=max_task_series)
    ctx = JobContext(small_strategy(strategy), sessions, events, serving, telemetry, settings)
    jobs = JobService(sessions, data_dir, events, serving, QueueLimits(max_queued_jobs=100, max_tasks=100))
    jobs.mark_ready()
    return Harness(ctx, jobs, data_dir)
