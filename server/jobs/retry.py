"""Retrying database work of a running job: a database blip delays a job, it never fails it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)
R = TypeVar("R")

#: First and largest pause between attempts, seconds.
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0


class JobInterruptedError(Exception):
    """The server is stopping and the grace period ran out; the job will run again after restart."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is the database being unreachable or busy (worth retrying), not a bug."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_database(
    work: Callable[[], R], *, stopping: Callable[[], bool], wake: threading.Event | None = None, what: str = ""
) -> R:
    """Run ``work`` until it does not raise a transient database error, backing off between tries.

    Args:
        work: one whole transaction (it must be safe to run again after a rollback).
        stopping: True once the server stops and may not wait longer.
        wake: an event whose setting cuts a pause short (shutdown).
        what: what ``work`` does, for the log.

    Raises:
        JobInterruptedError: the database is still away when the server must stop.
    """
    pause = FIRST_BACKOFF
    while True:
        try:
            return work()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if stopping():
                raise JobInterruptedError(f"database unavailable during shutdown ({what})") from exc
            log.warning("database unavailable during %s (%s); retrying in %.1f s", what or "a job", exc, pause)
            (wake or threading.Event()).wait(pause)
            pause = min(pause * 2, MAX_BACKOFF)
