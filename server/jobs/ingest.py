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

from server.data import SpoolWriter, purge
from server.data.layout import DataLayout
from server.errors import UnavailableError
from server.jobs.service import JobService, LearnSubmission
from server.storage import Job


class LearnStream:
    """One Learn stream being spooled. Use as a context manager around the message loop."""

    def __init__(self, jobs: JobService, submission: LearnSubmission) -> None:
        self.jobs = jobs
        self.submission = submission
        self.job_id = uuid.uuid4().hex
        self._spool = SpoolWriter(jobs.data_dir, DataLayout.spool(self.job_id))
        self.classes: set[int] = set()

    @property
    def samples(self) -> int:
        """Samples appended so far."""
        return self._spool.samples

    def append(self, inputs: np.ndarray, labels: np.ndarray, sample_ids: list[str]) -> None:
        """Append one validated chunk."""
        self._spool.append(inputs, labels, sample_ids)
        self.classes.update(int(c) for c in np.unique(labels))

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
            purge(self.jobs.data_dir, record.path)
            raise UnavailableError("the Learn stream was cancelled before it ended; nothing was recorded")
        return self.jobs.submit_learn(
            self.job_id, self.submission, record, self.samples, sorted(self.classes), principal
        )

    def __enter__(self) -> LearnStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._spool.__exit__(exc_type, exc, tb)
