"""Domain objects -> proto messages (the only place that knows both shapes)."""

from __future__ import annotations

import math
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from protos import lethe_pb2 as pb
from server.storage import AuditEvent, EvaluationRow, Job, Task


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp, or None for None."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def job_message(job: Job) -> pb.Job:
    """A Job row as a ``lethe.v1.Job``."""
    options = job.options
    return pb.Job(
        id=job.id,
        kind=job.kind.name,
        state=job.state.name,
        task=job.task,
        progress=job.progress,
        message=job.message,
        model_version=job.model_version,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        metrics=job.metrics,
        seq=job.seq,
        samples=job.samples,
        method=job.method,
        sample_id_prefix=str(options.get("sample_id_prefix", "")),
        sample_ids=int(options.get("sample_ids", 0)),
    )


def task_message(task: Task) -> pb.Task:
    """A Task row as a ``lethe.v1.Task``; unknown accuracy and relapse are NaN, unknown ``forget_verified`` unset."""
    return pb.Task(
        name=task.name,
        state=task.state.name,
        samples=task.samples,
        accuracy=math.nan if task.accuracy is None else task.accuracy,
        relapse=math.nan if task.relapse is None else task.relapse,
        learned_version=task.learned_version or 0,
        unlearned_version=task.unlearned_version or 0,
        created_at=timestamp(task.created_at),
        learned_at=timestamp(task.learned_at),
        unlearned_at=timestamp(task.unlearned_at),
        classes=task.classes,
        forget_verified=task.forget_verified,
        expires_at=timestamp(task.expires_at),
    )


def audit_message(event: AuditEvent) -> pb.AuditEvent:
    """An audit row as a ``lethe.v1.AuditEvent``."""
    return pb.AuditEvent(
        seq=event.seq,
        at=timestamp(event.at),
        principal=event.principal,
        action=event.action,
        task=event.task,
        job_id=event.job_id,
        details_json=event.details_json,
        prev_hash=event.prev_hash,
        hash=event.hash,
        signature=event.signature,
    )


def evaluation_message(row: EvaluationRow) -> pb.Evaluation:
    """A row of the accuracy matrix as a ``lethe.v1.Evaluation``."""
    return pb.Evaluation(
        job_id=row.job_id,
        kind=row.kind.name,
        task=row.task,
        model_version=row.model_version,
        accuracies=row.accuracies,
        metrics=row.metrics,
        job_seq=row.job_seq,
        at=timestamp(row.finished_at),
    )
