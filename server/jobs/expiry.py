"""Time to live of temporary tasks: unlearn a TEMPORARY task nobody committed in time.

A TEMPORARY task learned with a time to live (``LearnHeader.ttl_seconds``, or the server's
``limits.temporary_ttl_seconds``) gets ``expires_at`` when its learn ends. A timer thread looks for
expired ones every ``interval`` seconds and submits an ordinary Unlearn for each, as principal
``system:ttl`` with the reason "time to live expired" (audited as ``unlearn.requested`` like any
unlearn) and an idempotency key derived from the task, so a restart or a second look never queues
two. The unlearn deletes the side network: exact, and as fast as a client's.
"""

from __future__ import annotations

import logging
import threading

from server.errors import FailedPreconditionError, NotFoundError
from server.jobs.service import JobService, UnlearnSubmission
from server.storage import utc_now

log = logging.getLogger(__name__)

#: Principal written on the audit events of an expiry.
EXPIRY_PRINCIPAL = "system:ttl"
#: Reason written on the unlearn an expiry submits.
EXPIRY_REASON = "time to live expired (temporary task not committed)"


class TemporaryExpiry:
    """The timer that unlearns expired temporary tasks.

    Args:
        jobs: the job service (queries and unlearn submissions).
        interval: seconds between looks.
    """

    def __init__(self, jobs: JobService, interval: float = 1.0) -> None:
        self.jobs = jobs
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the timer thread."""
        self._thread = threading.Thread(target=self._run, name="lethe-ttl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread (waits for a look in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.expire_due()
            except Exception:  # the database may be away: look again later
                log.exception("could not look for expired temporary tasks; retrying")

    def expire_due(self) -> list[str]:
        """Submit an unlearn for every expired TEMPORARY task; return their names."""
        expired = self.jobs.expired_temporary(utc_now())
        for task in expired:
            submission = UnlearnSubmission(
                task=task, reason=EXPIRY_REASON, idempotency_key=f"ttl-expiry:{task}", method=""
            )
            try:
                job = self.jobs.submit_unlearn(submission, EXPIRY_PRINCIPAL)
            except (FailedPreconditionError, NotFoundError) as error:  # unlearned or committed meanwhile
                log.info("expired temporary task %s needs no unlearn: %s", task, error)
                continue
            log.info("temporary task expired; unlearn queued", extra={"task": task, "job_id": job.id})
        return expired
