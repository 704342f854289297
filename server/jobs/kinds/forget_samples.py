"""UNLEARN of records: forget a person's samples wherever they were learned (DESIGN.md section 9).

For every task holding claimed samples, the task's stream is rebuilt from its files (retained
training part and probe set, ordered by stream position), the samples are removed, and what is
left is split again exactly as a Learn of that shorter stream would split it. New probe, member
and retained files are written (recorded first), the strategy forgets (``forget_samples``: the
model becomes what it would be had each task been learned from its remaining samples), and the
commit purges the old files, listing each with its old and new SHA-256 and the rows removed.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy.orm import Session

from server.data import FileRecord, SpoolWriter, load_arrays, read_spool, save_arrays, sha256_file
from server.engine import metrics as m
from server.engine.protocol import LearnOptions, TaskData
from server.jobs.context import JobContext, JobRun
from server.jobs.evaluation import ProbeSet, forget_quality, logits_for
from server.jobs.kinds.learn import sample_arrays, split
from server.jobs.snapshot import Evaluated
from server.storage import (
    DataFile,
    DataFileKind,
    DataFileRepository,
    Job,
    JobRepository,
    JobState,
    SampleRepository,
    TaskRepository,
    TaskState,
)

#: The files of a learned task a records unlearn rewrites, in the order they are written.
REWRITTEN = (DataFileKind.RETAINED, DataFileKind.PROBE, DataFileKind.MEMBER)
#: Every kind of file a records unlearn may replace (a queued Learn's spool too).
REPLACED = (*REWRITTEN, DataFileKind.SPOOL)


@dataclass
class TaskPlan:
    """What one task loses and where its files are."""

    task: str
    digests: set[str]
    holdout: float
    files: dict[DataFileKind, DataFile]
    #: The Learn job whose stream carried the samples, and whether it is still queued (its data then
    #: sits only in its spool, which is rewritten; the model is not touched).
    learn_job: str = ""
    queued: bool = False


@dataclass
class Rewrite:
    """One task's files after the samples are removed, and the removed samples (kept in memory only)."""

    task: str
    kept: TaskData
    probe: ProbeSet
    removed: ProbeSet  # removed samples that were trained on (their probe-set peers are simply gone)
    paths: dict[DataFileKind, str]
    #: The new files' arrays until they are written.
    arrays: dict[DataFileKind, dict[str, np.ndarray]] = field(default_factory=dict)


class ForgetSamplesHandler:
    """Runs UNLEARN jobs that name sample ids (``options["sample_ids"]``)."""

    #: Forgetting, once started, finishes.
    cancellable = False

    def __init__(self) -> None:
        #: The running job's rewritten tasks (removed samples in memory only), from compute to measure.
        self._rewrites: dict[str, list[Rewrite]] = {}

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float]:
        """Rewrite the affected tasks' files without the samples; have the strategy forget them."""
        job = run.job
        plans = ctx.read(lambda session: _plans(session, job), "reading the samples to forget")
        learned = [p for p in plans if not p.queued]
        rewrites = [_rewrite(ctx, job, part, plan) for part, plan in enumerate(learned)]
        spools = {p.task: ctx.layout.rewritten_spool(p.learn_job, job.id, job.attempts) for p in plans if p.queued}
        ctx.retry(lambda: _record_intent(ctx, job, rewrites, spools), "recording the rewritten files")
        for plan in plans:
            if plan.queued:
                _rewrite_spool(ctx, plan, spools[plan.task])
        for rewrite in rewrites:
            _write(ctx, rewrite)
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if rewrites:
            replay = _replay(ctx, exclude={p.task for p in plans})
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
        rows = ctx.read(lambda s: DataFileRepository(s).live(job_id=run.job.id), "reading the rewritten files")
        run.files = []
        for row in rows:
            absolute = ctx.layout.absolute(row.path)
            run.files.append(FileRecord(row.path, absolute.stat().st_size, sha256_file(absolute)))
        rewrites = self._rewrites.pop(run.job.id, [])
        return _forget_quality(ctx, evaluated, rewrites) if rewrites else {}

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """Complete the new rows, purge the old files (audited with both digests), drop the index rows."""
        files, tasks = DataFileRepository(session), TaskRepository(session)
        for record in run.files:
            row = files.get(record.path)
            if row is not None:
                row.bytes, row.sha256 = record.bytes, record.sha256
        new_by_task: dict[str, dict[DataFileKind, DataFile]] = defaultdict(dict)
        for row in files.live(job_id=job.id):
            new_by_task[row.task][row.kind] = row
        forgotten: dict[str, int] = job.options.get("tasks", {})
        rewritten, doomed = [], []
        for name in sorted(forgotten):
            new = new_by_task.get(name, {})
            for old in files.live(task=name):
                if old.job_id == job.id or old.kind not in REPLACED:
                    continue
                doomed.append(old)
                replacement = new.get(old.kind)
                rewritten.append(
                    {
                        "path": old.path,
                        "kind": old.kind.value,
                        "sha256_before": old.sha256,
                        "new_path": replacement.path if replacement else "",
                        "sha256_after": replacement.sha256 if replacement else "",
                        "rows_before": _rows(ctx, old.path),
                        "rows_after": _rows(ctx, replacement.path) if replacement else 0,
                    }
                )
            task = tasks.get_for_update(name)
            if task is not None:
                task.samples = max(0, task.samples - int(forgotten[name]))
                if name in evaluated.accuracies:
                    task.accuracy = evaluated.accuracies[name]
        for entry in rewritten:
            entry["removed_rows"] = int(entry["rows_before"]) - int(entry["rows_after"])
        for row in files.live(job_id=job.id, kind=DataFileKind.SPOOL):  # now the queued Learn's spool
            learn = _spool_owner(row.path)
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


def _plans(session: Session, job: Job) -> list[TaskPlan]:
    """One plan per task holding a sample the job claimed, in task-name order."""
    by_task: dict[str, set[str]] = defaultdict(set)
    learn_jobs: dict[str, str] = {}
    for row in SampleRepository(session).claimed(job.id):
        by_task[row.task].add(row.digest)
        learn_jobs[row.task] = row.job_id
    files, jobs = DataFileRepository(session), JobRepository(session)
    plans = []
    for task in sorted(by_task):
        live = {f.kind: f for f in files.live(task=task) if f.kind in REPLACED}
        learn = jobs.get(learn_jobs[task])
        options = LearnOptions.from_dict(learn.options if learn is not None else {})
        queued = learn is not None and learn.state == JobState.QUEUED and DataFileKind.SPOOL in live
        plans.append(TaskPlan(task, by_task[task], options.holdout_fraction, live, learn_jobs[task], queued))
    return plans


def _rewrite_spool(ctx: JobContext, plan: TaskPlan, path: str) -> None:
    """A queued Learn's spool without the samples; the rest keeps its digests (server-made ones too)."""
    inputs, labels, ids = read_spool(ctx.layout.absolute(plan.files[DataFileKind.SPOOL].path))
    digests = ids or ctx.sample_key.server_made(plan.learn_job, len(labels))
    keep = np.array([d not in plan.digests for d in digests], dtype=bool)
    with SpoolWriter(ctx.layout.root, path) as writer:
        writer.append(inputs[keep], labels[keep], [d for d, k in zip(digests, keep, strict=True) if k])
        writer.commit()


def _spool_owner(path: str) -> str:
    """The Learn job of a spool rewritten by :meth:`DataLayout.rewritten_spool`."""
    return path.rsplit("/", 1)[-1].split("-", 1)[0]


def _rewrite(ctx: JobContext, job: Job, part: int, plan: TaskPlan) -> Rewrite:
    """The task's stream without the plan's samples, split again as a Learn of it would split it."""
    for kind in (DataFileKind.RETAINED, DataFileKind.PROBE):
        if kind not in plan.files:
            raise ValueError(f"task {plan.task!r} has no {kind.value} file: its samples cannot be forgotten exactly")
    parts = [load_arrays(ctx.layout.absolute(plan.files[k].path)) for k in (DataFileKind.RETAINED, DataFileKind.PROBE)]
    if any("positions" not in p for p in parts):
        raise ValueError(
            f"task {plan.task!r} was learned before sample ids were indexed: its files do not name their samples"
        )
    stream = {key: np.concatenate([p[key] for p in parts]) for key in ("inputs", "labels", "ids", "positions")}
    order = np.argsort(stream["positions"], kind="stable")
    trained = set(parts[0]["ids"].tolist())
    stays = np.array([d not in plan.digests for d in stream["ids"][order]], dtype=bool)
    gone = order[~stays]
    gone_trained = np.array([i for i in gone if stream["ids"][i] in trained], dtype=np.int64)
    kept = order[stays]
    inputs, labels, ids = stream["inputs"][kept], stream["labels"][kept], stream["ids"][kept]
    if len(labels) < 2:
        raise ValueError(f"task {plan.task!r} would keep {len(labels)} samples; unlearn the whole task instead")
    train, probe, member = split(
        ctx.settings.seed, plan.task, len(labels), plan.holdout, ctx.settings.max_probe_samples
    )
    return Rewrite(
        task=plan.task,
        kept=TaskData(torch.from_numpy(inputs[train]), torch.from_numpy(labels[train])),
        probe=ProbeSet(inputs[probe], labels[probe]),
        removed=ProbeSet(stream["inputs"][gone_trained], stream["labels"][gone_trained]),
        paths={kind: ctx.layout.rewritten_file(kind, job.id, job.attempts, part) for kind in REWRITTEN},
        arrays={
            DataFileKind.RETAINED: sample_arrays(inputs, labels, ids, train),
            DataFileKind.PROBE: sample_arrays(inputs, labels, ids, probe),
            DataFileKind.MEMBER: sample_arrays(inputs, labels, ids, member),
        },
    )


def _record_intent(ctx: JobContext, job: Job, rewrites: list[Rewrite], spools: dict[str, str]) -> None:
    """One row per new file before it is written (see the learn handler)."""
    new = [(r.task, kind, path) for r in rewrites for kind, path in r.paths.items()]
    new += [(task, DataFileKind.SPOOL, path) for task, path in spools.items()]
    with ctx.transaction() as session:
        files = DataFileRepository(session)
        for task, kind, path in new:
            if files.get(path) is None:
                files.add(DataFile(kind=kind, task=task, job_id=job.id, path=path, bytes=0, sha256=""))


def _write(ctx: JobContext, rewrite: Rewrite) -> None:
    for kind, path in rewrite.paths.items():
        save_arrays(ctx.layout.absolute(path), **rewrite.arrays[kind])
    rewrite.arrays = {}


def _replay(ctx: JobContext, exclude: set[str]) -> dict[str, TaskData]:
    """Retained training data of every live task but ``exclude`` (read whatever the strategy's replay mode)."""
    files = ctx.read(lambda s: DataFileRepository(s).live(kind=DataFileKind.RETAINED), "reading retained data")
    replay: dict[str, TaskData] = {}
    for f in files:
        if f.task not in exclude and f.bytes > 0:
            arrays = load_arrays(ctx.layout.absolute(f.path))
            replay[f.task] = TaskData(torch.from_numpy(arrays["inputs"]), torch.from_numpy(arrays["labels"]))
    return replay


def _rows(ctx: JobContext, path: str) -> int:
    """Samples in a task-data file."""
    absolute = ctx.layout.absolute(path)
    if not absolute.exists():
        return 0
    if path.endswith(".spool"):
        return int(read_spool(absolute)[1].shape[0])
    with np.load(absolute, allow_pickle=False) as data:
        return int(data["labels"].shape[0])


def _forget_quality(ctx: JobContext, evaluated: Evaluated, rewrites: list[Rewrite]) -> dict[str, float]:
    """Accuracy on the removed (trained-on) samples against never-seen data of the same tasks, and MIA."""
    incremental = ctx.strategy.task_incremental
    correct = seen = ref_correct = ref_seen = 0
    mias: list[float] = []
    for r in rewrites:
        name = r.task if incremental else None
        for samples, is_removed in ((r.removed, True), (r.probe, False)):
            if not len(samples.labels):
                continue
            logits = logits_for(evaluated.predictor, name, samples.inputs, allow_unlearned=False)
            hits = int((logits.argmax(dim=1).numpy() == samples.labels).sum())
            if is_removed:
                correct, seen = correct + hits, seen + len(samples.labels)
            else:
                ref_correct, ref_seen = ref_correct + hits, ref_seen + len(samples.labels)
        quality = forget_quality(
            evaluated.predictor, r.task, r.removed, r.probe, task_incremental=incremental, seed=ctx.settings.seed
        )
        if quality.get("mia_known") == 1.0 and not math.isnan(quality["mia"]):
            mias.append(quality["mia"])
    found: dict[str, float] = {}
    if seen and ref_seen:
        found["forgotten_accuracy"] = 100.0 * correct / seen
        found["forgotten_reference_accuracy"] = 100.0 * ref_correct / ref_seen
        found["forgotten_gap"] = found["forgotten_accuracy"] - found["forgotten_reference_accuracy"]
    if mias:
        found["forgotten_mia"] = float(np.mean(mias))
    return found
