"""Helpers of the operations tests: external tools, PromQL metric names, the exposition format."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT

DEPLOY = ROOT / "deploy"

#: PromQL words that look like metric names but are not: operators, modifiers and aggregation clauses.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "atop"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z_$]+")
_TEMPLATE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER = re.compile(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?[a-zA-Z]*")


def require_tool(name: str, why: str) -> str:
    """The path of executable ``name`` (on PATH or in this interpreter's bin/), or skip saying how to get it."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed ({why})")
    return path


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (its vector selectors), without a full PromQL parser.

    Strings, label matchers, range and subquery brackets, grouping clauses (``by (le)``), offsets
    and Grafana template variables are removed first; what is left that is neither a function call
    (an identifier followed by ``(``), a keyword nor a number is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _TEMPLATE.sub("1", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS or name.lower() in ("inf", "nan"):
            continue
        names.add(name)
    return names


def exported_series_names(exposition: str) -> set[str]:
    """Every series name a Prometheus server scraping ``exposition`` stores.

    These are the *sample* names: a counter ``x`` is stored as ``x_total`` (and ``x_created``), a
    histogram ``h`` only as ``h_bucket``, ``h_count``, ``h_sum`` (and ``h_created``), an info ``i``
    as ``i_info``; the bare family names of counters and histograms are not queryable.
    """
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def read(path: Path) -> str:
    """A file's text."""
    return path.read_text(encoding="utf-8")
