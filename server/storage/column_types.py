"""Column types shared by the models: aware UTC datetimes and string-valued enums."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import DateTime, Dialect, String
from sqlalchemy.types import TypeDecorator

E = TypeVar("E", bound=StrEnum)


def utc_now() -> datetime:
    """Returns the current time as an aware UTC datetime (the default clock of the storage layer)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that only accepts aware datetimes and always returns aware UTC ones.

    SQLite has no time zone support: SQLAlchemy stores the wall-clock digits and reads them back
    naive. Values are therefore converted to UTC before they are bound and marked UTC when they are
    read, so both backends round-trip the same instant as an aware ``datetime`` in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Converts an aware datetime to UTC; a naive one is a bug (its zone is unknown), so it raises."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: storage needs timezone-aware datetimes (use UTC)")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Returns the stored instant as an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class StrEnumType(TypeDecorator[E]):
    """A ``VARCHAR`` column holding the value of a :class:`enum.StrEnum`.

    Binding validates the value (a typo raises ``ValueError`` before it reaches the database) and
    reading returns the enum member, so ``job.state is JobState.QUEUED`` works. Plain strings equal
    to a member's value are accepted too.
    """

    impl = String
    cache_ok = True

    def __init__(self, enum_class: type[E], length: int = 16, **kwargs: Any) -> None:
        """Creates the type.

        Args:
            enum_class: The enum whose values the column holds.
            length: ``VARCHAR`` length; must fit the longest value.
            **kwargs: Passed to :class:`sqlalchemy.String`.
        """
        super().__init__(length, **kwargs)
        self.enum_class = enum_class

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        """Validates ``value`` against the enum and returns its string value."""
        if value is None:
            return None
        return self.enum_class(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        """Returns the enum member for a stored value."""
        if value is None:
            return None
        return self.enum_class(value)

    @property
    def python_type(self) -> type[E]:
        """The enum class."""
        return self.enum_class
