"""The single worker thread that owns the training model: the loop, and how a job ends.

Each job runs in two phases so a kill -9 at any instant loses nothing:

1. *compute* (:mod:`server.jobs.kinds`): change the model, record then write the job's files,
   then an atomic checkpoint that names the job and its metrics;
2. *commit* (:mod:`server.jobs.finish`): measure, one SQL transaction, publish, purge.

The checkpoint becomes the model's only when the commit succeeds: a job that fails after writing
it has it deleted and the previous one restored. On restart (:mod:`server.jobs.recovery`) a
RUNNING job named by the newest checkpoint is finished from phase 2; any other is re-queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from server.engine.protocol import Progress, Strategy, no_progress
from server.jobs import recovery
from server.jobs.context import JobContext, JobRun, WorkerSettings
from server.jobs.finish import finish
from server.jobs.kinds import handler_for
from server.jobs.retry import JobInterruptedError
from server.logs import log_context
from server.storage import Job, JobRepository, JobState, TaskRepository, TaskState

log = logging.getLogger(__name__)

#: Seconds between writes of a running job's progress to SQL (watchers see every change in memory).
_PROGRESS_FLUSH_SECONDS = 2.0


class JobCancelledError(Exception):
    """A cancel of the running job was requested; raised from its progress callback."""


class Worker:
    """Runs queued jobs one at a time on the strategy it owns.

    Args:
        on_fatal: called (once, from the worker thread) when the worker stops because it could not
            record how a job ended; the server then reports itself not ready.
    """

    def __init__(self, ctx: JobContext, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.ctx = ctx
        self.events = ctx.events
        self._on_fatal = on_fatal
        self._thread: threading.Thread | None = None
        self._last_flush = 0.0
        self.current_job: str | None = None
        self.fatal: BaseException | None = None

    @property
    def strategy(self) -> Strategy:
        """The model the worker owns (replaced when a failed job is rolled back)."""
        return self.ctx.strategy

    # ------------------------------------------------------------ lifecycle
    def recover(self) -> None:
        """Reconcile the model, SQL and the data directory (see :mod:`server.jobs.recovery`)."""
        recovery.recover(self.ctx, self._finish_from_checkpoint)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="lethe-worker", daemon=True)
        self._thread.start()

    def request_stop(self, grace_seconds: float) -> None:
        """Take no new job; the running one may finish within ``grace_seconds``, else it is interrupted.

        An interrupted job goes back to QUEUED with the model restored, and runs again after restart.
        """
        self.ctx.deadline = time.monotonic() + grace_seconds
        self.ctx.stopping.set()
        self.events.close()

    def join(self, timeout: float) -> None:
        """Wait for the worker thread to end (after :meth:`request_stop`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        seen, backoff = self.events.counter, 1.0
        while not self.ctx.stopping.is_set():
            try:
                job = self._claim()
            except Exception:
                # The database went away: keep the worker alive and retry.
                log.exception("could not claim a job; retrying in %.0f s", backoff)
                self.events.wait(self.events.counter, timeout=backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if job is None:
                seen = self.events.wait(seen, timeout=5.0)
                continue
            with log_context(job_id=job.id, task=job.task, principal=job.principal):
                try:
                    self._execute(job)
                except BaseException as exc:  # the job's end could not be recorded: stop, loudly
                    self.fatal = exc
                    log.critical("worker stopped: job %s could not be recorded as ended", job.id, exc_info=True)
                    if self._on_fatal is not None:
                        self._on_fatal(exc)
                    return

    def _claim(self) -> Job | None:
        with self.ctx.transaction() as session:
            job = JobRepository(session).next_runnable()
            if job is None:
                return None
            self.ctx.lifecycle.claim(session, job)
        self.ctx.telemetry.job_queue_wait.labels(job.kind.value).observe(
            max(0.0, (job.started_at - job.created_at).total_seconds()) if job.started_at else 0.0
        )
        self.events.notify()
        return job

    # -------------------------------------------------------------- running
    def _execute(self, job: Job) -> None:
        """Run one claimed job to its end; raise only when that end cannot be recorded."""
        self.current_job = job.id
        self.events.executing(job.id)
        log.info("%s job started", job.kind.value)
        run = JobRun(job, self._progress(job))
        try:
            handler = handler_for(job)
            metrics = handler.compute(self.ctx, run)
            run.changed_model, run.metrics = metrics is not None, metrics or {}
            if run.changed_model:
                self.ctx.checkpoint(job, run.metrics)
            finish(self.ctx, run, handler)
            log.info("%s job succeeded", job.kind.value, extra={"model_version": self.strategy.version})
        except JobInterruptedError:
            self._interrupted(job)
        except JobCancelledError:
            self._cancelled(job)
        except Exception as exc:
            log.exception("job %s (%s %s) failed", job.id, job.kind.value, job.task)
            self._failed(job, f"{type(exc).__name__}: {exc}", run.started)
        finally:
            self.events.clear_progress(job.id)
            self.events.discard_cancel(job.id)
            self.current_job = None
            self.events.settled(job.id)

    def _finish_from_checkpoint(self, job: Job, metrics: dict[str, float]) -> None:
        run = JobRun(job, no_progress, changed_model=True, metrics=metrics)
        try:
            finish(self.ctx, run, handler_for(job))
        except Exception as exc:
            log.exception("job %s could not be finished from its checkpoint", job.id)
            self._failed(job, f"{type(exc).__name__}: {exc}", run.started)

    def _progress(self, job: Job) -> Progress:
        try:
            cancellable = handler_for(job).cancellable
        except NotImplementedError:
            cancellable = False

        def report(fraction: float, message: str) -> None:
            if self.ctx.must_stop():
                raise JobInterruptedError(job.id)
            if cancellable and self.events.cancel_requested(job.id) is not None:
                raise JobCancelledError(job.id)
            fraction = min(max(float(fraction), 0.0), 1.0)
            self.events.set_progress(job.id, fraction, message)
            now = time.monotonic()
            if now - self._last_flush >= _PROGRESS_FLUSH_SECONDS:
                self._last_flush = now
                self._flush_progress(job.id, fraction, message)

        return report

    def _flush_progress(self, job_id: str, fraction: float, message: str) -> None:
        """Best effort: SQL progress is a convenience; a database blip must not stop training."""
        try:
            with self.ctx.transaction() as session:
                row = JobRepository(session).get(job_id)
                if row is not None:
                    row.progress, row.message = fraction, message
        except Exception as exc:
            log.warning("could not record progress of job %s (%s); training goes on", job_id, exc)

    # ---------------------------------------------------------- how it ends
    def _failed(self, job: Job, message: str, started: float) -> None:
        """FAILED in SQL (retried), the model restored to before the job, its data dropped."""
        self.ctx.restore(discard_job=job.id)
        to_delete = self._end(job, lambda session, row: self.ctx.lifecycle.fail(session, row, message), "failure")
        self.ctx.serving.release(job.id)
        self.ctx.telemetry.job_duration.labels(job.kind.value).observe(time.monotonic() - started)
        for path in to_delete:
            self.ctx.blobs.delete(path)

    def _cancelled(self, job: Job) -> None:
        """CANCELLED at a cancel's request: model restored bit for bit, spool and files purged."""
        principal = self.events.cancel_requested(job.id) or job.principal
        self.ctx.restore(discard_job=job.id)
        cancel = self.ctx.lifecycle.cancel
        to_delete = self._end(
            job, lambda session, row: cancel(session, row, principal, "cancelled on request while running"), "cancel"
        )
        self.ctx.serving.release(job.id)
        for path in to_delete:
            self.ctx.blobs.delete(path)
        log.info("job %s cancelled while running; the model is as before it", job.id)

    def _interrupted(self, job: Job) -> None:
        """Shutdown: back to QUEUED with the model restored, or left for recovery if SQL is away."""
        self.ctx.restore(discard_job=job.id)
        try:
            to_delete = self._end(
                job,
                lambda session, row: self.ctx.lifecycle.requeue(session, row, "interrupted by shutdown; runs again"),
                "re-queue",
            )
        except JobInterruptedError:
            log.warning("job %s stays RUNNING; the next start re-queues it", job.id)
            return
        for path in to_delete:
            self.ctx.blobs.delete(path)
        log.warning("job %s interrupted by shutdown and re-queued", job.id)

    def _end(self, job: Job, transition: Callable[..., list[str]], what: str) -> list[str]:
        """Apply ``transition`` to the locked job row in one retried transaction; mirror the task state."""

        def work() -> tuple[list[str], TaskState | None]:
            with self.ctx.transaction() as session:
                row = JobRepository(session).get_for_update(job.id)
                assert row is not None, f"job {job.id} vanished"
                # Not RUNNING: a retry after a commit whose acknowledgement was lost; it is recorded.
                paths = transition(session, row) if row.state == JobState.RUNNING else []
                task = TaskRepository(session).get(job.task)
                return paths, (task.state if task is not None else None)

        paths, state = self.ctx.retry(work, f"recording the {what} of job {job.id}")
        self.ctx.serving.set_task_state(job.task, state)
        return paths


__all__ = ["JobCancelledError", "Worker", "WorkerSettings"]
