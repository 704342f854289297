"""The files of a records unlearn: which tasks lose which samples, and their files rewritten without them.

For every task holding claimed samples (:func:`plans`), a learned task's stream is rebuilt from its
files (retained training part and probe set, ordered by stream position), the samples are removed,
and what is left is split again exactly as a Learn of that shorter stream would split it
(:func:`rewrite_task`); a queued Learn's spool is rewritten without them (:func:`rewrite_spool`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from sqlalchemy.orm import Session

from server.data import SpoolWriter, read_spool
from server.engine.protocol import LearnOptions, TaskData
from server.jobs.context import JobContext
from server.jobs.evaluation import ProbeSet
from server.jobs.kinds.learn import sample_arrays, split
from server.storage import DataFile, DataFileKind, DataFileRepository, Job, JobRepository, JobState, SampleRepository

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


def plans(session: Session, job: Job) -> list[TaskPlan]:
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


def rewrite_spool(ctx: JobContext, plan: TaskPlan, path: str) -> None:
    """A queued Learn's spool without the samples; the rest keeps its digests (server-made ones too)."""
    with ctx.blobs.open(plan.files[DataFileKind.SPOOL].path) as spool:
        inputs, labels, ids = read_spool(spool)
    digests = ids or ctx.sample_key.server_made(plan.learn_job, len(labels))
    keep = np.array([d not in plan.digests for d in digests], dtype=bool)
    with SpoolWriter(ctx.blobs, path) as writer:
        writer.append(inputs[keep], labels[keep], [d for d, k in zip(digests, keep, strict=True) if k])
        writer.commit()


def rewrite_task(ctx: JobContext, job: Job, part: int, plan: TaskPlan) -> Rewrite:
    """The task's stream without the plan's samples, split again as a Learn of it would split it."""
    for kind in (DataFileKind.RETAINED, DataFileKind.PROBE):
        if kind not in plan.files:
            raise ValueError(f"task {plan.task!r} has no {kind.value} file: its samples cannot be forgotten exactly")
    parts = [ctx.blobs.load_arrays(plan.files[k].path) for k in (DataFileKind.RETAINED, DataFileKind.PROBE)]
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


def write_files(ctx: JobContext, rewrite: Rewrite) -> None:
    """Write a task's new files (their rows are already recorded) and drop the arrays from memory."""
    for kind, path in rewrite.paths.items():
        ctx.retry(partial(ctx.blobs.save_arrays, path, **rewrite.arrays[kind]), "writing the rewritten files")
    rewrite.arrays = {}


def count_rows(ctx: JobContext, path: str) -> int:
    """Samples in a task-data file."""
    if not ctx.blobs.exists(path):
        return 0
    with ctx.blobs.open(path) as f:
        if path.endswith(".spool"):
            return int(read_spool(f)[1].shape[0])
        with np.load(f, allow_pickle=False) as data:
            return int(data["labels"].shape[0])
