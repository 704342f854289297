"""Database URL handling: driver normalization and password masking."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

#: Schemes that mean "PostgreSQL, default driver"; Lethe ships psycopg 3, not psycopg2.
_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql"})
_PASSWORD_IN_URL = re.compile(r"(?P<prefix>://[^:/@?#]*:)(?P<password>[^@/?#]*)(?P<suffix>@)")


def normalize_url(url: str | URL) -> URL:
    """Parses a database URL and selects the psycopg 3 driver for plain PostgreSQL URLs.

    ``postgres://`` (Heroku style) and ``postgresql://`` become ``postgresql+psycopg://``; every
    other URL, including one that names its driver, is returned unchanged.

    Args:
        url: A SQLAlchemy database URL.

    Returns:
        The parsed URL.

    Raises:
        sqlalchemy.exc.ArgumentError: If ``url`` is not a database URL.
    """
    parsed = make_url(url)
    if parsed.drivername in _POSTGRES_SCHEMES:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """Returns ``url`` with its password replaced by ``***``, safe for logs and error messages.

    Works on strings SQLAlchemy cannot parse too, so it can be used while reporting a bad URL.

    Args:
        url: A database URL.

    Returns:
        The URL as a string, password masked, otherwise as given (driver not rewritten).
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return _PASSWORD_IN_URL.sub(r"\g<prefix>***\g<suffix>", url)
