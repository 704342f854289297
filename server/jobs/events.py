"""Change notification between the worker, the submitting RPCs and WatchJob streams."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LiveProgress:
    """In-memory progress of the running job (SQL is updated only now and then)."""

    fraction: float
    message: str


class JobEvents:
    """A condition variable with a global change counter plus the running job's live progress.

    Watchers remember the counter they last saw and wait until it moves; the worker waits on the
    same condition for new jobs. Cheap enough to notify on every progress report.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._counter = 0
        self._progress: dict[str, LiveProgress] = {}
        self._cancels: dict[str, str] = {}
        #: Jobs the worker is executing, until everything after their end (file deletion, metrics) is done.
        self._executing: set[str] = set()
        self._closed = False

    @property
    def counter(self) -> int:
        """The current change counter."""
        with self._cond:
            return self._counter

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (the server is stopping)."""
        return self._closed

    def notify(self) -> None:
        """Something changed: a job was queued, updated or finished."""
        with self._cond:
            self._counter += 1
            self._cond.notify_all()

    def set_progress(self, job_id: str, fraction: float, message: str) -> None:
        """Record live progress of a running job and wake watchers."""
        with self._cond:
            self._progress[job_id] = LiveProgress(fraction, message)
            self._counter += 1
            self._cond.notify_all()

    def clear_progress(self, job_id: str) -> None:
        """Forget live progress of a job that is no longer running."""
        with self._cond:
            self._progress.pop(job_id, None)

    def progress(self, job_id: str) -> LiveProgress | None:
        """Live progress of ``job_id`` if it is running."""
        with self._cond:
            return self._progress.get(job_id)

    def request_cancel(self, job_id: str, principal: str) -> None:
        """Ask the worker to cancel running job ``job_id`` at its next progress report."""
        with self._cond:
            self._cancels[job_id] = principal
            self._counter += 1
            self._cond.notify_all()

    def cancel_requested(self, job_id: str) -> str | None:
        """Who asked to cancel running job ``job_id``, or None when nobody did."""
        with self._cond:
            return self._cancels.get(job_id)

    def discard_cancel(self, job_id: str) -> None:
        """Forget a cancel request of a job that has ended."""
        with self._cond:
            self._cancels.pop(job_id, None)

    def executing(self, job_id: str) -> None:
        """The worker starts ``job_id``: readers that see it ended wait for :meth:`settled` first."""
        with self._cond:
            self._executing.add(job_id)

    def settled(self, job_id: str) -> None:
        """The worker is done with ``job_id``, including what follows its commit; wake its readers."""
        with self._cond:
            self._executing.discard(job_id)
            self._counter += 1
            self._cond.notify_all()

    def wait_settled(self, job_id: str, timeout: float) -> bool:
        """Block until the worker is done with ``job_id`` (or ``timeout`` passes); True if it is.

        A job's end is committed before its superseded files are deleted and its metrics published:
        a reader that waits here after seeing the end also sees those (a forget job that says
        SUCCEEDED has no file left holding the forgotten data).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while job_id in self._executing and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return job_id not in self._executing

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the counter differs from ``seen``, ``timeout`` passes, or close; return the counter."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._counter == seen and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._counter

    def close(self) -> None:
        """Wake every waiter for shutdown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
