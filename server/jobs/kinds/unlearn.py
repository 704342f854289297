"""UNLEARN: forget a task in the model, verify it, purge every byte of its data."""

from __future__ import annotations

import logging
import math
import time

from sqlalchemy.orm import Session

from server.engine import metrics as m
from server.engine.temporary import FORGET_METHOD
from server.jobs.context import JobContext, JobRun
from server.jobs.evaluation import ForgetCheck, ProbeSet, forget_quality, verdict, verify_forgetting
from server.jobs.kinds.learn import temporary_learner
from server.jobs.snapshot import Evaluated
from server.storage import (
    DataFileKind,
    DataFileRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    TaskRepository,
    TaskState,
)

log = logging.getLogger(__name__)

Samples = tuple[ProbeSet | None, ProbeSet | None]


class UnlearnHandler:
    """Runs UNLEARN jobs."""

    #: Forgetting, once started, finishes: a half-forgotten model is worse than either end.
    cancellable = False

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float] | None:
        """Forget the task in the model; None when its data never reached the model."""
        job = run.job
        task = ctx.read(lambda s: TaskRepository(s).get(job.task), "reading the task")
        if task is None or task.learned_version is None:
            return None
        started = time.perf_counter()
        if task.temporary:
            # Exact by construction: the task lives only in its side network, which is deleted; the
            # main model is bit-identical to before the temporary learn.
            report = temporary_learner(ctx).forget_temporary(job.task, run.progress)
            return {
                **{k: float(v) for k, v in report.metrics.items()},
                "side_network_deleted": 1.0,
                "forget_verified": 1.0,
                "forget_attempts": 1.0,
            }
        # Accepted as a temporary task's, but its commit finished first: the strategy's default.
        method = "" if job.method == FORGET_METHOD else job.method
        report = ctx.strategy.unlearn(job.task, method or ctx.strategy.unlearn_methods[0], run.progress, ctx.replay())
        metrics = {k: float(v) for k, v in report.metrics.items()}
        metrics.setdefault("unlearn_seconds", time.perf_counter() - started)
        metrics.update(keep_forgetting(ctx, run))
        return metrics

    def measure(self, ctx: JobContext, run: JobRun, evaluated: Evaluated) -> dict[str, float]:
        """Membership inference and the forgetting verdict (the slow part: no transaction is open)."""
        if not run.changed_model or run.metrics.get("side_network_deleted") == 1.0:
            return {}  # nothing to measure: nothing of a deleted side network's task remains
        members, probe = samples(ctx, run.job.task)
        quality = forget_quality(
            evaluated.predictor,
            run.job.task,
            members,
            probe,
            task_incremental=ctx.strategy.task_incremental,
            seed=ctx.settings.seed,
        )
        found = {k: v for k, v in quality.items() if not math.isnan(v)}
        check = verify(ctx, run.job.task, (members, probe))
        if check is not None:
            found.update(check.metrics)
            found["forget_verified"] = 1.0 if check.verified else 0.0
        return found

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """Mark the task unlearned, record the verdict and spill, purge the task's data."""
        task = TaskRepository(session).get_for_update(job.task)
        if task is None:
            return []
        metrics, life = run.metrics, ctx.lifecycle
        to_delete: list[str] = []
        side_network = metrics.get("side_network_deleted") == 1.0
        life.task_unlearned(session, task)
        if not run.changed_model:
            # Its learn never ran (e.g. re-queued by a restart behind this unlearn): it never will.
            for learn in JobRepository(session).list(task=task.name, state=JobState.QUEUED, kind=JobKind.LEARN):
                to_delete += life.cancel(session, learn, job.principal, "cancelled by an unlearn of its task")
        else:
            if "forget_verified" in metrics:
                task.forget_verified = metrics["forget_verified"] == 1.0
                metrics.setdefault("forget_attempts", 1.0)
                if not task.forget_verified:
                    details = {"why": verdict(metrics), "metrics": metrics}
                    life.audit_log.append(
                        session, principal=job.principal, action="unlearn.unverified", task=task.name,
                        job_id=job.id, details=details,
                    )  # fmt: skip
            others = [t.name for t in TaskRepository(session).list(state=TaskState.LEARNED) if t.name != task.name]
            metrics["spill"] = m.spill(evaluated.previous, evaluated.accuracies, task.name, others)
            if task.name in evaluated.accuracies:
                metrics["forget_accuracy_task"] = evaluated.accuracies[task.name]
                task.unlearned_accuracy = task.accuracy = evaluated.accuracies[task.name]
            elif side_network:
                # No model answers the task any more: its last learned accuracy would read as current.
                task.accuracy = None
            task.unlearned_version = ctx.strategy.version
        # Relapse is measured while the probe set is kept; with forget_probe_ops = 0 it is unknown. A
        # deleted side network cannot relapse (the main model never held its task): its probe goes now.
        keep_probe = ctx.settings.forget_probe_ops > 0 and not side_network
        task.relapse = 0.0 if task.unlearned_accuracy is not None and keep_probe else None
        # Right to be forgotten: every file of the task goes now, except its probe set, kept for
        # forget_probe_ops more operations to measure relapse (0 = purge it now as well).
        doomed = [
            f
            for f in DataFileRepository(session).live(task=task.name)
            if f.kind != DataFileKind.PROBE or not keep_probe
        ]
        metrics["purged_bytes"] = float(sum(f.bytes for f in doomed))
        return to_delete + life.purge(session, doomed, job, "unlearned")


def samples(ctx: JobContext, task: str) -> Samples:
    """The (member, probe) samples of ``task`` still on disk."""

    def query(session: Session) -> tuple[str | None, str | None]:
        files = DataFileRepository(session)
        members = next(iter(files.live(task=task, kind=DataFileKind.MEMBER)), None)
        probe = next(iter(files.live(task=task, kind=DataFileKind.PROBE)), None)
        return (members.path if members else None, probe.path if probe else None)

    member_path, probe_path = ctx.read(query, "reading the forgotten task's samples")
    return (
        ctx.probes.get(member_path) if member_path else None,
        ctx.probes.get(probe_path) if probe_path else None,
    )


def verify(ctx: JobContext, task: str, found: Samples | None = None) -> ForgetCheck | None:
    """Measure the just-unlearned ``task`` against its reference with the current model."""
    members, probe = found if found is not None else samples(ctx, task)
    return verify_forgetting(
        ctx.strategy.predictor(),
        task,
        members,
        probe,
        task_incremental=ctx.strategy.task_incremental,
        tolerance=ctx.settings.forget_tolerance,
    )


def keep_forgetting(ctx: JobContext, run: JobRun) -> dict[str, float]:
    """Call the strategy's optional ``forget_more`` while the task is not verified forgotten.

    Stops at the first verified measurement, when ``forget_max_attempts`` forgetting operations
    (the unlearn included) have run, or when the strategy has nothing stronger (no ``forget_more``,
    or it returns None). Each call is a committed operation of its own.

    Returns:
        ``forget_attempts`` (the unlearn counts as 1) and, after extra attempts, ``forget_more_seconds``.
    """
    forget_more = getattr(ctx.strategy, "forget_more", None)
    attempts, started, task = 1, time.perf_counter(), run.job.task
    while forget_more is not None and attempts < ctx.settings.forget_max_attempts:
        check = verify(ctx, task)
        if check is None or check.verified:
            break
        log.warning("forgetting of %s not verified after %d attempt(s): %s", task, attempts, check.metrics)
        final = attempts + 1 == ctx.settings.forget_max_attempts
        if forget_more(task, attempts, run.progress, final=final) is None:
            break
        attempts += 1
    result = {"forget_attempts": float(attempts)}
    if attempts > 1:
        result["forget_more_seconds"] = time.perf_counter() - started
    return result
