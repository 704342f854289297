"""The sample index: which task holds which sample (by keyed digest), for records-level forgetting."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from server.storage.models import Sample

#: Digests per ``IN (...)`` query (SQLite allows 32766 bound parameters; PostgreSQL 65535).
_CHUNK = 5000


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class SampleRepository:
    """Queries and changes of the ``samples`` table inside the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add_stream(self, task: str, job_id: str, digests: Sequence[str]) -> None:
        """Index every sample of a Learn stream (digests unique within it)."""
        rows = [{"task": task, "job_id": job_id, "digest": d} for d in digests]
        for start in range(0, len(rows), _CHUNK):
            self.session.execute(insert(Sample), rows[start : start + _CHUNK])

    def find(self, digests: Collection[str], task: str | None = None) -> list[Sample]:
        """The rows of these digests (of ``task`` only, when given)."""
        found: list[Sample] = []
        for part in _chunks(sorted(digests)):
            query = select(Sample).where(Sample.digest.in_(part))
            if task is not None:
                query = query.where(Sample.task == task)
            found += self.session.scalars(query.order_by(Sample.id)).all()
        return found

    def claim(self, ids: Sequence[int], job_id: str) -> None:
        """Mark rows as being forgotten by records unlearn ``job_id``."""
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            self.session.execute(update(Sample).where(Sample.id.in_(part)).values(forget_job_id=job_id))

    def claimed(self, job_id: str) -> list[Sample]:
        """Rows claimed by records unlearn ``job_id``."""
        return list(self.session.scalars(select(Sample).where(Sample.forget_job_id == job_id).order_by(Sample.id)))

    def release(self, job_id: str) -> None:
        """Unclaim the rows of a records unlearn that ended without forgetting them."""
        self.session.execute(update(Sample).where(Sample.forget_job_id == job_id).values(forget_job_id=None))

    def forget_claimed(self, job_id: str) -> int:
        """Delete the rows a records unlearn has forgotten; return how many."""
        result = self.session.execute(delete(Sample).where(Sample.forget_job_id == job_id))
        return int(getattr(result, "rowcount", 0) or 0)

    def drop_job(self, job_id: str) -> None:
        """Delete the rows a Learn stream added (its job ended without its data reaching the model)."""
        self.session.execute(delete(Sample).where(Sample.job_id == job_id))

    def drop_task(self, task: str) -> None:
        """Delete every row of a task (it was unlearned as a whole)."""
        self.session.execute(delete(Sample).where(Sample.task == task))
