"""The commit phase of a job: evaluate, then one short transaction, then publish and purge.

Everything slow (evaluating every probe set, membership inference, hashing the job's files) runs
*before* the transaction opens, so no lock is held while the model is measured and new
submissions never wait behind an evaluation. The transaction is retried while the database is
away. Nothing after the commit can change the job's outcome: a failed purge or metric update is
logged, and the start-up sweep deletes any file the database says is purged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from server.data import FileRecord
from server.engine import metrics as m
from server.jobs import checkpoint_rows
from server.jobs.context import JobContext, JobRun
from server.jobs.evaluation import evaluate, verdict
from server.jobs.kinds import JobHandler
from server.jobs.lifecycle import file_entry
from server.jobs.snapshot import Evaluated
from server.storage import (
    DataFile,
    DataFileKind,
    DataFileRepository,
    EvaluationRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    TaskRepository,
    TaskState,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    """What the transaction decided, for the steps after it."""

    to_delete: list[str]
    states: dict[str, TaskState]
    relapses: dict[str, float]
    retained_bytes: int
    metrics: dict[str, float]
    accuracies: dict[str, float]


def evaluate_model(ctx: JobContext) -> Evaluated:
    """Evaluate the current model on every probe set, and read a_{u-1} (no lock held)."""

    def query(session: Session) -> tuple[dict[str, str], dict[str, float]]:
        probes = {f.task: f.path for f in DataFileRepository(session).live(kind=DataFileKind.PROBE)}
        return probes, EvaluationRepository(session).latest_accuracies()

    paths, previous = ctx.read(query, "reading the probe sets")
    probes = {task: ctx.probes.get(path) for task, path in paths.items()}
    predictor = ctx.strategy.predictor()
    accuracies = evaluate(predictor, probes, task_incremental=ctx.strategy.task_incremental)
    return Evaluated(predictor, accuracies, previous, probes, ctx.strategy.task_incremental)


def finish(ctx: JobContext, run: JobRun, handler: JobHandler) -> None:
    """Measure, commit the job as SUCCEEDED in one transaction, then publish, prune and purge."""
    evaluated = evaluate_model(ctx)
    run.metrics.update(handler.measure(ctx, run, evaluated))
    checkpoint = checkpoint_rows.written_by(ctx, run.job.id) if run.changed_model else None
    committed = ctx.retry(lambda: _commit(ctx, run, handler, evaluated, checkpoint), "committing the job")
    if committed is None:  # a retry after a commit whose acknowledgement was lost: it is done
        ctx.serving.publish(evaluated.predictor)
        ctx.serving.release(run.job.id)
        return
    _after_commit(ctx, run, committed)


def _commit(
    ctx: JobContext, run: JobRun, handler: JobHandler, evaluated: Evaluated, checkpoint: FileRecord | None
) -> Committed | None:
    with ctx.transaction() as session:
        job = JobRepository(session).get_for_update(run.job.id)
        assert job is not None, f"job {run.job.id} vanished"
        if job.state == JobState.SUCCEEDED:
            return None
        to_delete = handler.commit(ctx, session, run, job, evaluated)
        relapses, purged = _relapse(ctx, session, job, evaluated)
        metrics = run.metrics
        metrics.update(_summary(session, job, evaluated))
        EvaluationRepository(session).add_rows(job.seq, evaluated.accuracies)
        clean = {k: v for k, v in metrics.items() if not math.isnan(v)}
        message = "succeeded"
        if job.kind == JobKind.UNLEARN and clean.get("forget_verified") == 0.0:
            # The data is purged all the same (the request is honoured); the model may still know it.
            message = f"unlearned, forgetting NOT verified: {verdict(clean)}"
        ctx.lifecycle.succeed(session, job, ctx.strategy.version, clean, message)
        details: dict[str, object] = {
            "model_version": ctx.strategy.version,
            "metrics": clean,
            "files": [file_entry(f) for f in _recorded(session, run)],
        }
        if checkpoint is not None:
            checkpoint_rows.complete(session, checkpoint)
            details["checkpoint"] = {"path": checkpoint.path, "bytes": checkpoint.bytes, "sha256": checkpoint.sha256}
        ctx.lifecycle.audit_log.append(
            session,
            principal=job.principal,
            action=f"{job.kind.value}.succeeded",
            task=job.task,
            job_id=job.id,
            details=details,
        )
        tasks = TaskRepository(session)
        states = {t.name: t.state for t in tasks.list()}
        retained = DataFileRepository(session).total_live_bytes()
        # Publish before the commit, so a client that sees SUCCEEDED can use the task at once; a
        # commit that fails for good restores and republishes the previous model. Only this job's
        # task changes here: others may be changing concurrently (an accepted Unlearn).
        ctx.serving.publish(evaluated.predictor)
        ctx.serving.release(job.id)  # an unlearn's hold ends once its model is the published one
        ctx.serving.set_task_state(job.task, states.get(job.task))
    return Committed(to_delete + purged, states, relapses, retained, clean, evaluated.accuracies)


def _recorded(session: Session, run: JobRun) -> list[DataFile]:
    files = DataFileRepository(session)
    return [row for record in run.files if (row := files.get(record.path)) is not None]


def _relapse(ctx: JobContext, session: Session, job: Job, evaluated: Evaluated) -> tuple[dict[str, float], list[str]]:
    """Relapse of every unlearned task still measured; purge probe sets kept long enough."""
    relapses: dict[str, float] = {}
    doomed: list[DataFile] = []
    accuracies = evaluated.accuracies
    probe_files = {f.task: f for f in DataFileRepository(session).live(kind=DataFileKind.PROBE)}
    for t in TaskRepository(session).list():
        if t.name in accuracies and t.state != TaskState.UNLEARNED:
            t.accuracy = accuracies[t.name]
        if t.state != TaskState.UNLEARNED or (t.name == job.task and job.kind == JobKind.UNLEARN):
            continue
        t.ops_since_unlearn += 1
        if t.name in accuracies and t.unlearned_accuracy is not None:
            t.relapse = m.relapse(t.unlearned_accuracy, accuracies[t.name])
            t.accuracy = accuracies[t.name]
            # Exported while measured; once the probe set is purged the value is frozen in SQL and
            # its series released, so forgotten tasks do not hold per-task series slots forever.
            relapses[t.name] = t.relapse
        if t.ops_since_unlearn >= ctx.settings.forget_probe_ops and t.name in probe_files:
            doomed.append(probe_files[t.name])
    purged: list[str] = []
    for f in doomed:  # one audit event per task, as each is its own decision
        purged += ctx.lifecycle.purge(session, [f], job, "forget_probe_ops reached")
    return relapses, purged


def _summary(session: Session, job: Job, evaluated: Evaluated) -> dict[str, float]:
    """RA over LEARNED tasks, FA over UNLEARNED ones (as the gauges), and the stream metrics."""
    accuracies = evaluated.accuracies
    tasks = TaskRepository(session).list()
    learned = [t.name for t in tasks if t.state == TaskState.LEARNED]
    unlearned = [t.name for t in tasks if t.state == TaskState.UNLEARNED]
    summary: dict[str, float] = {}
    for name, names in (("retain_accuracy", learned), ("forget_accuracy", unlearned)):
        values = [accuracies[n] for n in names if n in accuracies]
        if values:
            summary[name] = float(np.mean(values))
    if job.kind == JobKind.LEARN and job.task in accuracies:
        summary["task_accuracy"] = accuracies[job.task]
    sizes = {t: len(evaluated.probes[t].labels) for t in learned if t in evaluated.probes and t in accuracies}
    total = sum(sizes.values())
    if total and not evaluated.task_incremental:
        # Class-incremental: accuracy pooled over the learned mega-batches' probe sets, and CER, the
        # cumulative count of misclassified probe samples over every job applied so far.
        correct = sum(accuracies[t] / 100.0 * n for t, n in sizes.items())
        previous = EvaluationRepository(session).last_evaluated_job()
        cer = (previous.metrics.get("cer", 0.0) if previous is not None else 0.0) + (total - correct)
        summary.update({"test_accuracy": 100.0 * correct / total, "cer": round(cer, 6)})
    return summary


def _after_commit(ctx: JobContext, run: JobRun, committed: Committed) -> None:
    """Prune, purge, publish metrics: failures here are logged, never turned into a job failure."""
    steps = (
        ("pruning checkpoints", lambda: _prune(ctx, run.job.id)),
        ("deleting purged files", lambda: _delete(ctx, committed)),
    )
    for what, step in (*steps, ("updating metrics", lambda: _publish_metrics(ctx, run, committed))):
        try:
            step()
        except Exception:
            log.exception("after job %s committed: %s failed (the start-up sweep finishes it)", run.job.id, what)


def _prune(ctx: JobContext, job_id: str) -> None:
    # Older checkpoints hold what this job may have removed (an unlearned task): keep only the newest.
    checkpoint_rows.prune(ctx, job_id=job_id)


def _delete(ctx: JobContext, committed: Committed) -> None:
    for relative in committed.to_delete:
        purged = ctx.blobs.delete(relative)
        ctx.probes.drop(relative)
        if purged is not None:
            ctx.telemetry.purged_bytes.inc(purged.bytes)


def _publish_metrics(ctx: JobContext, run: JobRun, committed: Committed) -> None:
    t, job, metrics, states = ctx.telemetry, run.job, committed.metrics, committed.states
    t.job_duration.labels(job.kind.value).observe(time.monotonic() - run.started)
    t.model_version.set(ctx.strategy.version)
    t.record_accuracies(
        committed.accuracies,
        [n for n, s in states.items() if s == TaskState.LEARNED],
        [n for n, s in states.items() if s == TaskState.UNLEARNED],
    )
    t.record_relapse(committed.relapses)
    t.retained_bytes.set(committed.retained_bytes)
    if job.kind == JobKind.UNLEARN and "spill" in metrics:
        t.unlearn_spill.observe(metrics["spill"] / 100.0)
        t.last_unlearn_spill.set(metrics["spill"] / 100.0)
    if "mia" in metrics:
        t.unlearn_mia.set(metrics["mia"] / 100.0)
    if "samples_forgotten" in metrics:
        t.forgotten_samples.inc(metrics["samples_forgotten"])
    if job.kind == JobKind.UNLEARN and metrics.get("forget_verified") == 0.0:
        t.unverified_unlearns.inc()
