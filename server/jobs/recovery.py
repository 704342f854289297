"""Start-up: load the newest checkpoint, reconcile it with SQL, and clean the data directory.

A RUNNING job named by the newest checkpoint crashed in its commit phase: it is finished from
there. Any other RUNNING job is re-queued (the files its attempt recorded are purged) and runs
again from the checkpointed model. Then every file under the task-data folders that is not a
live ``data_files`` row is deleted, and every checkpoint but the model's is pruned (audited; the
model's gets a row if it had none): after recovery the data directory holds exactly the live rows,
the model's checkpoint among them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from server.data.layout import FOLDERS
from server.jobs import checkpoint_rows
from server.jobs.context import JobContext
from server.storage import DataFileRepository, Job, JobKind, JobRepository, JobState, TaskRepository

log = logging.getLogger(__name__)


class StateMismatchError(RuntimeError):
    """The checkpoint is older than what SQL says was applied: the model would silently miss jobs."""


def recover(ctx: JobContext, finish_from_checkpoint: Callable[[Job, dict[str, float]], None]) -> None:
    """Reconcile model, SQL and disk; call ``finish_from_checkpoint`` for a job that crashed committing.

    Raises:
        StateMismatchError: SQL records a model version the checkpoint does not have.
    """
    # Task states first: finishing an interrupted job below publishes a model, and from then on
    # Predict must already know which tasks are unlearned (refused) rather than unknown.
    with ctx.sessions() as session:
        ctx.serving.load_tasks({t.name: t.state for t in TaskRepository(session).list()})
    checkpoint = ctx.checkpoints.load_latest()
    if checkpoint is not None:
        ctx.strategy.load_state_dict(checkpoint.strategy_state)
    named = checkpoint.meta.last_job_id if checkpoint is not None else None
    to_finish: Job | None = None
    to_delete: list[str] = []
    with ctx.transaction() as session:
        jobs = JobRepository(session)
        applied, have = jobs.max_model_version(), (checkpoint.meta.version if checkpoint else 0)
        running = jobs.running()
        if applied > have and not any(j.id == named for j in running):
            raise StateMismatchError(
                f"the database records model version {applied} but the newest checkpoint in "
                f"{ctx.blobs.description} is version {have}; restore the blobs (data directory) and the "
                "database from the same backup"
            )
        for job in running:
            if job.id == named:
                to_finish = job
            else:
                to_delete += ctx.lifecycle.requeue(session, job, "re-queued after a restart")
                log.warning("re-queued job %s (%s %s) interrupted by a restart", job.id, job.kind, job.task)
    for path in to_delete:
        ctx.blobs.delete(path)
    if to_finish is not None and checkpoint is not None:
        log.warning("finishing job %s from its checkpoint after a restart", to_finish.id)
        finish_from_checkpoint(to_finish, dict(checkpoint.meta.last_job_metrics))
    sweep(ctx)
    checkpoint_rows.reconcile(ctx, checkpoint)
    load_serving_state(ctx)


def sweep(ctx: JobContext) -> None:
    """Delete every task-data blob that is not a live ``data_files`` row (purged, or never recorded),
    and what interrupted writes left."""
    with ctx.sessions() as session:
        live = {f.path for f in DataFileRepository(session).live()}
    for folder in FOLDERS.values():
        for relative in ctx.blobs.remove_temporary(folder):
            log.warning("deleted %s: an interrupted write", relative)
        for relative in ctx.blobs.names(folder):
            if relative not in live:
                log.warning("deleting %s: not a live data_files row", relative)
                ctx.blobs.delete(relative)


def load_serving_state(ctx: JobContext) -> None:
    """Publish the loaded model, the task states and the gauges read from SQL."""
    with ctx.sessions() as session:
        tasks = TaskRepository(session).list()
        retained = DataFileRepository(session).total_live_bytes()
    ctx.serving.load_tasks({t.name: t.state for t in tasks})
    for job, forgotten in unfinished_unlearns(ctx):  # before the model is published: never served
        ctx.serving.hold(job, forgotten)
    ctx.serving.publish(ctx.strategy.predictor())
    ctx.telemetry.model_version.set(ctx.strategy.version)
    ctx.telemetry.retained_bytes.set(retained)
    measured = ctx.settings.forget_probe_ops
    ctx.telemetry.record_relapse(
        {t.name: t.relapse for t in tasks if t.relapse is not None and t.ops_since_unlearn < measured}
    )


def unfinished_unlearns(ctx: JobContext) -> list[tuple[str, set[str]]]:
    """(job id, tasks it forgets) of every QUEUED or RUNNING unlearn, oldest first."""

    def query(session: Session) -> list[tuple[str, set[str]]]:
        jobs = JobRepository(session)
        found = [
            j
            for state in (JobState.QUEUED, JobState.RUNNING)
            for j in jobs.list(state=state, kind=JobKind.UNLEARN, limit=1_000_000)
        ]
        return [(j.id, forgotten_tasks(j)) for j in sorted(found, key=lambda j: j.seq)]

    return ctx.read(query, "reading unfinished unlearns")


def forgotten_tasks(job: Job) -> set[str]:
    """The tasks an unlearn job forgets data of: its task, or those its sample ids were found in."""
    named = job.options.get("tasks")
    return set(named) if isinstance(named, dict) and named else {job.task}
