"""SQLAlchemy 2.0 typed models: the schema of the Lethe database.

``migrations/versions`` must create exactly these tables; ``tests/storage/test_migrations.py``
compares the migrated database with this metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protos.audit_chain import GENESIS_HASH
from server.storage.column_types import StrEnumType, UTCDateTime, utc_now
from server.storage.enums import DataFileKind, JobKind, JobState, TaskState

#: Deterministic constraint names, so later migrations can drop or alter constraints by name
#: on every backend (SQLite batch mode needs names to find them).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 128
STATE_LENGTH = 16
JOB_ID_LENGTH = 32
HASH_LENGTH = 64
SIGNATURE_LENGTH = 128


def _one_of(column: str, enum_class: type[StrEnum]) -> str:
    """SQL for a CHECK that ``column`` holds one of the enum's values."""
    values = ", ".join(f"'{member.value}'" for member in enum_class)
    return f"{column} IN ({values})"


class Base(DeclarativeBase):
    """Declarative base of every Lethe table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Task(Base):
    """A named unit of knowledge the model learns and may later forget.

    Accuracies are percentages; ``None`` means unknown (no probe set, or purged).
    """

    __tablename__ = "tasks"
    __table_args__ = (CheckConstraint(_one_of("state", TaskState), name="state"),)

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    state: Mapped[TaskState] = mapped_column(StrEnumType(TaskState, STATE_LENGTH))
    samples: Mapped[int] = mapped_column(Integer, default=0)
    classes_json: Mapped[str] = mapped_column(Text, default="[]")
    accuracy: Mapped[float | None] = mapped_column(Float)
    relapse: Mapped[float | None] = mapped_column(Float)
    unlearned_accuracy: Mapped[float | None] = mapped_column(Float)
    #: Whether the unlearn measured the task at its reference; None while not unlearned or unmeasured.
    forget_verified: Mapped[bool | None] = mapped_column(Boolean)
    learned_version: Mapped[int | None] = mapped_column(Integer)
    unlearned_version: Mapped[int | None] = mapped_column(Integer)
    ops_since_unlearn: Mapped[int] = mapped_column(Integer, default=0)
    #: Held (or to be held) by a side network: from a TEMPORARY Learn's acceptance until commit or unlearn.
    temporary: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: When the server unlearns this TEMPORARY task if it is not committed; None = never.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    learned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    unlearned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    @property
    def classes(self) -> list[int]:
        """The class labels seen in this task (parsed ``classes_json``)."""
        return [int(label) for label in json.loads(self.classes_json or "[]")]

    @classes.setter
    def classes(self, labels: list[int]) -> None:
        self.classes_json = json.dumps(sorted({int(label) for label in labels}))

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, state={self.state!s})"


class Job(Base):
    """A queued unit of work for the worker: learn, unlearn or commit one task.

    ``seq`` orders jobs and is the paging cursor (never reused: SQLite AUTOINCREMENT); ``id`` is the
    public identifier.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_kind_seq", "state", "kind", "seq"),
        CheckConstraint(_one_of("kind", JobKind), name="kind"),
        CheckConstraint(_one_of("state", JobState), name="state"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), unique=True)
    kind: Mapped[JobKind] = mapped_column(StrEnumType(JobKind, STATE_LENGTH))
    state: Mapped[JobState] = mapped_column(StrEnumType(JobState, STATE_LENGTH), default=JobState.QUEUED)
    task: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    method: Mapped[str] = mapped_column(String(64), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    principal: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    options_json: Mapped[str] = mapped_column(Text, default="{}")
    samples: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[int] = mapped_column(Integer, default=0)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def options(self) -> dict[str, Any]:
        """Job options (parsed ``options_json``)."""
        parsed: dict[str, Any] = json.loads(self.options_json or "{}")
        return parsed

    @options.setter
    def options(self, value: dict[str, Any]) -> None:
        self.options_json = json.dumps(value, sort_keys=True)

    @property
    def metrics(self) -> dict[str, float]:
        """Numeric job metrics (parsed ``metrics_json``; non-numeric entries are left out)."""
        return _numeric(json.loads(self.metrics_json or "{}"))

    @metrics.setter
    def metrics(self, value: dict[str, float]) -> None:
        self.metrics_json = json.dumps({key: float(number) for key, number in value.items()}, sort_keys=True)

    def __repr__(self) -> str:
        return f"Job(seq={self.seq!r}, id={self.id!r}, kind={self.kind!s}, state={self.state!s}, task={self.task!r})"


class Evaluation(Base):
    """One cell of the accuracy matrix: the accuracy (%) on ``task`` after job ``job_seq``."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("job_seq", "task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq"), index=True)
    task: Mapped[str] = mapped_column(String(NAME_LENGTH))
    accuracy: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit log.

    ``seq`` is assigned by :class:`server.storage.AuditLog` as the previous seq + 1 (not by the
    database), so a deleted row shows up as a gap.
    """

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    principal: Mapped[str] = mapped_column(String(NAME_LENGTH))
    action: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(NAME_LENGTH), default="", index=True)
    job_id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), default="")
    details_json: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    #: Ed25519 signature (hex) of ``hash`` by the server's audit key; "" on events from before signing.
    signature: Mapped[str] = mapped_column(String(SIGNATURE_LENGTH), default="")

    @property
    def details(self) -> dict[str, Any]:
        """Event details (parsed ``details_json``)."""
        parsed: dict[str, Any] = json.loads(self.details_json)
        return parsed

    def __repr__(self) -> str:
        return f"AuditEvent(seq={self.seq!r}, action={self.action!r}, task={self.task!r})"


class AuditHead(Base):
    """The single row (``id == 1``) naming the newest audit event.

    Appends lock this row first, which serializes them; verification compares it with the newest
    stored event, which detects deletion of the tail of the log.
    """

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(HASH_LENGTH), default=GENESIS_HASH)
    #: Ed25519 signature (hex) of the head (see :mod:`server.storage.audit`); "" before signing.
    signature: Mapped[str] = mapped_column(String(SIGNATURE_LENGTH), default="")


class DataFile(Base):
    """A file the server keeps under its data directory, accounted until (and after) it is purged."""

    __tablename__ = "data_files"
    __table_args__ = (CheckConstraint(_one_of("kind", DataFileKind), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[DataFileKind] = mapped_column(StrEnumType(DataFileKind, STATE_LENGTH))
    task: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    job_id: Mapped[str | None] = mapped_column(String(JOB_ID_LENGTH))
    path: Mapped[str] = mapped_column(String(512), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(HASH_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"DataFile(path={self.path!r}, kind={self.kind!s}, bytes={self.bytes!r})"


class Sample(Base):
    """One sample the server holds data of, indexed for records-level forgetting.

    ``digest`` is HMAC-SHA-256 of the sample id under the server's sample-id key (the id itself is
    never stored). A row lives while any file of its task may hold the sample's data; a records
    unlearn claims rows by setting ``forget_job_id`` and deletes them when it commits.
    """

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("task", "digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(NAME_LENGTH))
    #: The Learn job whose stream carried the sample.
    job_id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), index=True)
    digest: Mapped[str] = mapped_column(String(HASH_LENGTH), index=True)
    forget_job_id: Mapped[str | None] = mapped_column(String(JOB_ID_LENGTH), index=True)

    def __repr__(self) -> str:
        return f"Sample(task={self.task!r}, digest={self.digest[:12]!r})"


class Blob(Base):
    """A blob of the ``postgresql`` blob store (see :mod:`server.data.blobs.postgres`): one data file.

    ``path`` is NULL while the blob is being written (its chunks go in under the row's ``id``) and is
    set, together with ``bytes`` and ``sha256``, in the one transaction that publishes it;
    ``pending_path`` is the path it is written for (a crash leaves such rows; the start-up sweep
    deletes them).
    """

    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str | None] = mapped_column(String(512), unique=True)
    pending_path: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(HASH_LENGTH), default="")
    #: Bytes of every chunk but the last (chunk ``n`` holds bytes ``n * chunk_bytes`` onwards).
    chunk_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def __repr__(self) -> str:
        return f"Blob(path={self.path!r}, bytes={self.bytes!r})"


class BlobChunk(Base):
    """One chunk (at most ``Blob.chunk_bytes``) of a blob's bytes."""

    __tablename__ = "blob_chunks"

    blob_id: Mapped[int] = mapped_column(Integer, ForeignKey("blobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Lease(Base):
    """Who may write (PostgreSQL): one row per lease, held by the primary (see :mod:`server.lease`).

    ``epoch`` grows by one at every takeover and is the fencing token: a transaction commits only
    while the row still carries its server's epoch. ``renewed_at`` is the database's clock at the
    holder's last renewal; ``backend_pid`` is the holder's lease connection.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(256))
    backend_pid: Mapped[int | None] = mapped_column(Integer)
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"Lease(name={self.name!r}, epoch={self.epoch}, holder={self.holder!r})"


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are numbers (bools excluded), as floats."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
