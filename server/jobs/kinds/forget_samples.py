"""UNLEARN of records: forget a person's samples wherever they were learned (DESIGN.md section 9).

For every task holding claimed samples, the task's stream is rebuilt from its files (retained
training part and probe set, ordered by stream position), the samples are removed, and what is
left is split again exactly as a Learn of that shorter stream would split it. New probe, member
and retained files are written (recorded first), the strategy forgets (``forget_samples``: the
model becomes what it would be had each task been learned from its remaining samples), and the
commit purges the old files, listing each with its old and new SHA-256 and the rows removed.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sqlalchemy.orm import Session

from server.engine import metrics as m
from server.jobs import sample_files
from server.jobs.context import JobContext, JobRun
from server.jobs.evaluation import logits_for
from server.jobs.snapshot import Evaluated
from server.storage import (
    DataFile,
    DataFileKind,
    DataFileRepository,
    Job,
    JobRepository,
    SampleRepository,
    TaskRepository,
    TaskState,
)


class ForgetSamplesHandler:
    """Runs UNLEARN jobs that name sample ids (``options["sample_ids"]``)."""

    #: Forgetting, once started, finishes.
    cancellable = False

    def __init__(self) -> None:
        #: The running job's rewritten tasks (removed samples in memory only), from compute to measure.
        self._rewrites: dict[str, list[sample_files.Rewrite]] = {}
        #: Samples in each old and new file of the job being committed, counted in measure (no
        #: transaction open), kept until the next job (a retried commit needs them again).
        self._rows: dict[str, int] = {}

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float]:
        """Rewrite the affected tasks' files without the samples; have the strategy forget them."""
        job = run.job
        plans = ctx.read(lambda session: sample_files.plans(session, job), "reading the samples to forget")
        learned = [p for p in plans if not p.queued]
        rewrites = [sample_files.rewrite_task(ctx, job, part, plan) for part, plan in enumerate(learned)]
        spools = {p.task: ctx.layout.rewritten_spool(p.learn_job, job.id, job.attempts) for p in plans if p.queued}
        ctx.retry(lambda: _record_intent(ctx, job, rewrites, spools), "recording the rewritten files")
        for plan in plans:
            if plan.queued:
                sample_files.rewrite_spool(ctx, plan, spools[plan.task])
        for rewrite in rewrites:
            sample_files.write_files(ctx, rewrite)
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if rewrites:
            replay = ctx.retained(exclude={p.task for p in plans})
            forget = getattr(ctx.strategy, "forget_samples", None)
            if forget is None:
                raise ValueError(f"strategy {ctx.strategy.name!r} cannot forget individual samples")
            report = forget({r.task: r.kept for r in rewrites}, run.progress, replay)
            metrics = {k: float(v) for k, v in report.metrics.items()}
        self._rewrites[job.id] = rewrites
        metrics.setdefault("unlearn_seconds", time.perf_counter() - started)
        metrics["samples_forgotten"] = float(sum(len(p.digests) for p in plans))
        metrics["tasks_affected"] = float(len(plans))
        return metrics

    def measure(self, ctx: JobContext, run: JobRun, evaluated: Evaluated) -> dict[str, float]:
        """Digest the new files; forget quality on the removed samples against never-seen data.

        After a crash between checkpoint and commit the removed samples are gone from memory (they
        are on no disk): the job then commits without the forget-quality numbers.
        """
        new, old = ctx.read(lambda session: _replaced_files(session, run.job), "reading the rewritten files")
        run.files = []
        for row in new:
            found = ctx.blobs.digest(row.path)
            if found is None:
                raise FileNotFoundError(f"the rewritten file {row.path} is missing from {ctx.blobs.description}")
            run.files.append(found)
        self._rows = {row.path: sample_files.count_rows(ctx, row.path) for row in (*new, *old)}
        rewrites = self._rewrites.pop(run.job.id, [])
        return _forget_quality(ctx, evaluated, rewrites) if rewrites else {}

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """Complete the new rows, purge the old files (audited with both digests), drop the index rows."""
        files, tasks = DataFileRepository(session), TaskRepository(session)
        for record in run.files:
            row = files.get(record.path)
            if row is not None:
                row.bytes, row.sha256 = record.bytes, record.sha256
        new_files, doomed = _replaced_files(session, job)
        new = {(row.task, row.kind): row for row in new_files}
        forgotten: dict[str, int] = job.options.get("tasks", {})
        rewritten = []
        for old in doomed:
            replacement = new.get((old.task, old.kind))
            before, after = self._rows[old.path], (self._rows[replacement.path] if replacement else 0)
            rewritten.append(
                {
                    "path": old.path,
                    "kind": old.kind.value,
                    "sha256_before": old.sha256,
                    "new_path": replacement.path if replacement else "",
                    "sha256_after": replacement.sha256 if replacement else "",
                    "rows_before": before,
                    "rows_after": after,
                    "removed_rows": before - after,
                }
            )
        for name in sorted(forgotten):
            task = tasks.get_for_update(name)
            if task is not None:
                task.samples = max(0, task.samples - int(forgotten[name]))
                if name in evaluated.accuracies:
                    task.accuracy = evaluated.accuracies[name]
        for row in files.live(job_id=job.id, kind=DataFileKind.SPOOL):  # now the queued Learn's spool
            learn = ctx.layout.rewritten_spool_owner(row.path)
            row.job_id = learn
            queued = JobRepository(session).get(learn)
            if queued is not None:
                queued.samples = max(0, queued.samples - int(forgotten.get(row.task, 0)))
        removed = SampleRepository(session).forget_claimed(job.id)
        learned = [t.name for t in tasks.list(state=TaskState.LEARNED) if t.name not in forgotten]
        run.metrics["spill"] = m.spill(evaluated.previous, evaluated.accuracies, "", learned)
        ctx.lifecycle.audit_log.append(
            session,
            principal=job.principal,
            action="samples.forgotten",
            task=job.task,
            job_id=job.id,
            details={
                "samples": removed,
                "tasks": forgotten,
                "request": job.options.get("request", ""),
                "files": rewritten,
            },
        )
        return ctx.lifecycle.purge(session, doomed, job, "samples forgotten: rewritten without them")


def _replaced_files(session: Session, job: Job) -> tuple[list[DataFile], list[DataFile]]:
    """(the files the job wrote, the live files of its tasks they replace)."""
    files = DataFileRepository(session)
    new = [row for row in files.live(job_id=job.id) if row.kind in sample_files.REPLACED]
    old = [
        row
        for name in sorted(job.options.get("tasks", {}))
        for row in files.live(task=name)
        if row.job_id != job.id and row.kind in sample_files.REPLACED
    ]
    return new, old


def _record_intent(ctx: JobContext, job: Job, rewrites: list[sample_files.Rewrite], spools: dict[str, str]) -> None:
    """One row per new file before it is written (see the learn handler)."""
    new = [(r.task, kind, path) for r in rewrites for kind, path in r.paths.items()]
    new += [(task, DataFileKind.SPOOL, path) for task, path in spools.items()]
    with ctx.transaction() as session:
        files = DataFileRepository(session)
        for task, kind, path in new:
            if files.get(path) is None:
                files.add(DataFile(kind=kind, task=task, job_id=job.id, path=path, bytes=0, sha256=""))


def _forget_quality(ctx: JobContext, evaluated: Evaluated, rewrites: list[sample_files.Rewrite]) -> dict[str, float]:
    """Accuracy on the removed (trained-on) samples against never-seen data of the same tasks, and MIA."""
    correct = seen = ref_correct = ref_seen = 0
    mias: list[float] = []
    for r in rewrites:
        if not len(r.removed.labels) or not len(r.probe.labels):
            continue
        name = r.task if ctx.strategy.task_incremental else None
        removed = logits_for(evaluated.predictor, name, r.removed.inputs, allow_unlearned=False)
        probe = logits_for(evaluated.predictor, name, r.probe.inputs, allow_unlearned=False)
        correct += int((removed.argmax(dim=1).numpy() == r.removed.labels).sum())
        ref_correct += int((probe.argmax(dim=1).numpy() == r.probe.labels).sum())
        seen, ref_seen = seen + len(r.removed.labels), ref_seen + len(r.probe.labels)
        attack = m.mia_with_null(
            m.per_sample_loss(removed, torch.from_numpy(r.removed.labels)),
            m.per_sample_loss(probe, torch.from_numpy(r.probe.labels)),
            seed=ctx.settings.seed,
        )
        if attack.known:
            mias.append(attack.score)
    found: dict[str, float] = {}
    if seen:
        low, high = m.wilson_interval(correct, seen)
        reference = 100.0 * ref_correct / ref_seen
        found.update(
            forgotten_accuracy=100.0 * correct / seen,
            forgotten_accuracy_low=low,
            forgotten_accuracy_high=high,
            forgotten_reference_accuracy=reference,
            forgotten_gap=100.0 * correct / seen - reference,
            # One-sided: the model still knows them only if it answers them better than never-seen
            # data of their tasks, beyond sampling noise and the tolerance (worse is no sign of memory).
            forget_verified=1.0 if low <= reference + ctx.settings.forget_tolerance else 0.0,
        )
    if mias:
        found["forgotten_mia"] = float(np.mean(mias))
    return found
