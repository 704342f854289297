"""Structured logging: one JSON object per line (or plain text), with job, task and principal when known.

Context reaches a line in two ways: ``extra={"task": ...}`` on the call, or :func:`log_context`
around a unit of work (the worker wraps each job in one, the servicer each RPC), which
:class:`ContextFilter` copies onto every record logged inside it, from any module.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType

#: Record attributes copied into every line that has them.
CONTEXT_FIELDS = ("job_id", "task", "principal", "model_version")

_NO_CONTEXT: Mapping[str, object] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "lethe_log_context", default=_NO_CONTEXT
)


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Attach ``fields`` (``job_id``, ``task``, ``principal``, ``model_version``) to every line logged inside.

    Nested contexts add to the outer one; fields that are None are left out.
    """
    previous = _context.get()
    _context.set(MappingProxyType({**previous, **{k: v for k, v in fields.items() if v is not None}}))
    try:
        yield
    finally:
        # set(previous) rather than reset(token): a streaming RPC's generator may be closed from
        # another thread's context, where a token from this one would be refused.
        _context.set(previous)


def current_log_context() -> Mapping[str, object]:
    """The fields :func:`log_context` has attached on this thread."""
    return _context.get()


class ContextFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto each record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """Formats records as compact JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Route the root logger to stderr in ``fmt`` ("json" or "text") at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic announces every plugin at INFO on each start-up; its warnings still get through.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
