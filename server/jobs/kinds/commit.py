"""COMMIT: merge a TEMPORARY task's side network into the main model (CLPU), then delete it.

The main strategy learns the task from its retained training data with logit matching to the side
network (``TemporaryLearning.commit_temporary``); the task becomes LEARNED with a new
``learned_version``. The spill on the other learned tasks is measured as for an unlearn (their
accuracy just before and just after). What happens to the task's retained data then depends on the
strategy, as after a permanent learn: kept as it is (it replays, or keeps training data for records
forgetting), replaced by the strategy's selection (a replay buffer), or purged.
"""

from __future__ import annotations

import torch
from sqlalchemy.orm import Session

from server.engine import metrics as m
from server.engine.protocol import TaskData
from server.jobs.context import JobContext, JobRun
from server.jobs.kinds.learn import check_finite, temporary_learner
from server.jobs.snapshot import Evaluated
from server.storage import (
    DataFile,
    DataFileKind,
    DataFileRepository,
    Job,
    TaskRepository,
    TaskState,
)


class CommitHandler:
    """Runs COMMIT jobs."""

    #: A running commit may be cancelled: the model is restored and the task stays TEMPORARY.
    cancellable = True

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float]:
        """Distill the side network into the main model; write the strategy's new selection of the data, if any."""
        job, layout = run.job, ctx.layout
        learner = temporary_learner(ctx)
        if job.task not in learner.temporary_tasks():
            raise ValueError(f"task {job.task!r} has no side network: it is not TEMPORARY in this model")
        retained = retained_file(ctx, job.task, exclude_job=job.id)
        if retained is None:
            raise ValueError(f"the training data of temporary task {job.task!r} is missing: nothing to commit from")
        arrays = ctx.blobs.load_arrays(retained.path)
        data = TaskData(torch.from_numpy(arrays["inputs"]), torch.from_numpy(arrays["labels"]))
        report = learner.commit_temporary(job.task, data, run.progress, ctx.replay(exclude=job.task))
        check_finite(ctx, job.task, arrays["inputs"])  # a diverged commit fails and is rolled back
        metrics = {k: float(v) for k, v in report.metrics.items()}
        if report.retain is None:
            metrics["retained_kept"] = 0.0  # purged at commit: the strategy keeps no data of its tasks
        elif report.retain is data:
            metrics["retained_kept"] = 1.0
        else:  # the strategy's own selection (e.g. a replay buffer) replaces the whole training data
            path = layout.job_file(DataFileKind.RETAINED, job.id, job.attempts)
            ctx.retry(lambda: _record_intent(ctx, job, path), "recording the job's files")
            selection = {"inputs": report.retain.inputs.numpy(), "labels": report.retain.labels.numpy()}
            ctx.retry(lambda: ctx.blobs.save_arrays(path, **selection), "writing the retained data")
            metrics["retained_kept"] = 0.5
        metrics.setdefault("samples", float(len(data)))
        return metrics

    def measure(self, ctx: JobContext, run: JobRun, evaluated: Evaluated) -> dict[str, float]:
        """Digest the new retained selection, if the computation wrote one."""
        run.files = []
        found = ctx.blobs.digest(ctx.layout.job_file(DataFileKind.RETAINED, run.job.id, run.job.attempts))
        if found is not None:
            run.files.append(found)
        return {}

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """TEMPORARY → LEARNED at the new version; spill on the others; the retained data as the strategy keeps it."""
        files = DataFileRepository(session)
        for record in run.files:
            row = files.get(record.path)
            if row is not None:
                row.bytes, row.sha256 = record.bytes, record.sha256
        task = TaskRepository(session).get_for_update(job.task)
        if task is None:
            return []
        metrics = run.metrics
        before = evaluated.previous.get(task.name)
        others = [t.name for t in TaskRepository(session).list(state=TaskState.LEARNED) if t.name != task.name]
        metrics["spill"] = m.spill(evaluated.previous, evaluated.accuracies, task.name, others)
        if before is not None:
            metrics["temporary_accuracy"] = before
        if task.name in evaluated.accuracies:
            metrics["task_accuracy"] = task.accuracy = evaluated.accuracies[task.name]
        ctx.lifecycle.task_committed(session, task, ctx.strategy.version)
        kept = metrics.get("retained_kept", 0.0)
        own = {record.path for record in run.files}
        doomed = [
            f for f in files.live(task=task.name, kind=DataFileKind.RETAINED) if f.path not in own and kept != 1.0
        ]
        return ctx.lifecycle.purge(session, doomed, job, "committed: the strategy keeps no (or less) training data")


def retained_file(ctx: JobContext, task: str, exclude_job: str = "") -> DataFile | None:
    """The live RETAINED file of ``task`` (a temporary task's training data) not written by ``exclude_job``."""
    rows = ctx.read(
        lambda s: DataFileRepository(s).live(task=task, kind=DataFileKind.RETAINED), "reading retained data"
    )
    rows = [row for row in rows if row.job_id != exclude_job]
    return rows[0] if rows else None


def _record_intent(ctx: JobContext, job: Job, path: str) -> None:
    with ctx.transaction() as session:
        files = DataFileRepository(session)
        if files.get(path) is None:
            files.add(DataFile(kind=DataFileKind.RETAINED, task=job.task, job_id=job.id, path=path, bytes=0, sha256=""))


__all__ = ["CommitHandler", "retained_file"]
