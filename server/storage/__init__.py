"""Storage layer: SQLAlchemy 2.0 models, repositories and database setup.

Repositories take a :class:`sqlalchemy.orm.Session` and never commit: the caller owns the
transaction, so one job transition, its evaluation rows and its audit events commit together::

    engine = make_engine(url)
    check_schema(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        job = JobRepository(session).add(Job(kind=JobKind.LEARN, task="digits-0", state=JobState.QUEUED))
        AuditLog().append(session, principal="alice", action="learn.queued", task=job.task, job_id=job.id)

Imports only SQLAlchemy, Alembic and the standard library.
"""

from protos.audit_chain import GENESIS_HASH, canonical_json, chain_hash, encode_details, format_timestamp
from server.storage.audit import (
    AUDIT_HEAD_ID,
    AuditLog,
    AuditSigner,
    AuditVerification,
    on_audit_commit,
    on_audit_head_commit,
)
from server.storage.column_types import StrEnumType, UTCDateTime, utc_now
from server.storage.data_files import DataFileRepository, normalize_data_path
from server.storage.db import (
    SchemaError,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    migrations_dir,
    upgrade,
)
from server.storage.enums import DataFileKind, JobKind, JobState, TaskState
from server.storage.evaluations import EvaluationRepository, EvaluationRow
from server.storage.jobs import JobRepository
from server.storage.models import (
    NAMING_CONVENTION,
    AuditEvent,
    AuditHead,
    Base,
    Blob,
    BlobChunk,
    DataFile,
    Evaluation,
    Job,
    Lease,
    Sample,
    Task,
)
from server.storage.samples import SampleRepository
from server.storage.tasks import TaskRepository
from server.storage.urls import mask_url, normalize_url

__all__ = [
    "AUDIT_HEAD_ID",
    "GENESIS_HASH",
    "NAMING_CONVENTION",
    "AuditEvent",
    "AuditHead",
    "AuditLog",
    "AuditSigner",
    "AuditVerification",
    "Base",
    "Blob",
    "BlobChunk",
    "DataFile",
    "DataFileKind",
    "DataFileRepository",
    "Evaluation",
    "EvaluationRepository",
    "EvaluationRow",
    "Job",
    "JobKind",
    "JobRepository",
    "JobState",
    "Lease",
    "Sample",
    "SampleRepository",
    "SchemaError",
    "StrEnumType",
    "Task",
    "TaskRepository",
    "TaskState",
    "UTCDateTime",
    "alembic_config",
    "canonical_json",
    "chain_hash",
    "check_schema",
    "current_revision",
    "encode_details",
    "format_timestamp",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "mask_url",
    "migrations_dir",
    "normalize_data_path",
    "normalize_url",
    "on_audit_commit",
    "on_audit_head_commit",
    "upgrade",
    "utc_now",
]
