"""The spool lifecycle of one Learn stream: open, append validated chunks, commit and queue, or discard.

The RPC layer validates each message and hands the arrays here. A stream that ends in any way but
:meth:`LearnStream.submit` leaves nothing behind: its partial file is deleted, and a committed
spool whose job could not be recorded is deleted too (the start-up sweep removes any spool a
crash left without a row).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from types import TracebackType

import numpy as np

from server.data import SpoolWriter
from server.data.layout import DataLayout
from server.errors import InvalidArgumentError, UnavailableError
from server.jobs.service import JobService, LearnSubmission
from server.storage import Job


class LearnStream:
    """One Learn stream being spooled. Use as a context manager around the message loop."""

    def __init__(self, jobs: JobService, submission: LearnSubmission) -> None:
        self.jobs = jobs
        self.submission = submission
        self.job_id = uuid.uuid4().hex
        self._spool = SpoolWriter(jobs.blobs, DataLayout.spool(self.job_id))
        self.classes: set[int] = set()
        #: Keyed digests of the client's sample ids, in stream order; None until the first chunk says
        #: whether the stream carries ids (all chunks do, or none does).
        self._digests: list[str] | None = None
        self._seen: set[str] = set()

    @property
    def samples(self) -> int:
        """Samples appended so far."""
        return self._spool.samples

    def append(self, inputs: np.ndarray, labels: np.ndarray, sample_ids: list[str], field: str = "sample_ids") -> None:
        """Append one validated chunk; its ids (none, or one per sample) are stored as keyed digests.

        Raises:
            InvalidArgumentError: (naming ``field``) the stream mixes chunks with and without ids, or
                repeats an id: ids are unique within a task.
        """
        digests = self._check_ids(sample_ids, field)
        self._spool.append(inputs, labels, digests)
        self.classes.update(int(c) for c in np.unique(labels))

    def _check_ids(self, sample_ids: list[str], field: str) -> list[str]:
        if self.samples == 0:  # the first chunk with samples decides
            self._digests = [] if sample_ids else None
        elif (self._digests is not None) != bool(sample_ids):
            had = "carried ids" if self._digests is not None else "carried none"
            raise InvalidArgumentError(
                field,
                f"a stream carries ids in every chunk or in none; the chunks before this one {had}",
                reason="SAMPLE_IDS_MIXED",
            )
        if self._digests is None:
            return []
        digests = self.jobs.sample_key.digests(sample_ids)
        for sample_id, digest in zip(sample_ids, digests, strict=True):
            if digest in self._seen:
                raise InvalidArgumentError(
                    field,
                    f"sample id {sample_id[:64]!r} appears twice; ids are unique within a task",
                    reason="SAMPLE_ID_REPEATED",
                )
            self._seen.add(digest)
        self._digests += digests
        return digests

    def submit(self, principal: str, *, ended_early: Callable[[], bool]) -> Job:
        """Make the spool durable and queue its job; discard it if the client gave up meanwhile.

        Args:
            principal: who sent the stream.
            ended_early: whether the client cancelled the call; asked after the fsync, which gives a
                cancellation racing the stream's end the time to arrive.

        Raises:
            UnavailableError: the client cancelled the stream before it ended.
        """
        record = self._spool.commit()
        if ended_early():
            self.jobs.blobs.delete(record.path)
            raise UnavailableError(
                "the Learn stream was cancelled before it ended; nothing was recorded", reason="STREAM_CANCELLED"
            )
        if self._digests is None:
            digests, made = self.jobs.sample_key.server_made(self.job_id, self.samples), True
        else:
            digests, made = self._digests, False
        return self.jobs.submit_learn(
            self.job_id,
            self.submission,
            record,
            self.samples,
            sorted(self.classes),
            principal,
            sample_digests=digests,
            server_made_ids=made,
        )

    def __enter__(self) -> LearnStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._spool.__exit__(exc_type, exc, tb)
