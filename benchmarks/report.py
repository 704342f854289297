"""What a benchmark reports and where it goes: results, markdown tables, machine facts, document sections.

Every benchmark and reproduction writes its results into a document (``docs/benchmarks.md``,
``docs/reproduction-*.md``) through :func:`write_section`: it owns one section, delimited by
``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``, and rewrites only that section; the
hand-written text around it is never touched. A section not yet in the document is appended.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.timing import Comparison

ROOT = Path(__file__).resolve().parents[1]
#: The results document of ``make bench``.
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"


@dataclass
class BenchmarkResult:
    """What one benchmark reports: comparison rows, optional extra tables, settings and notes.

    Attributes:
        name: the name used by ``--only``; also the name of its document section.
        title: a heading for the results document.
        comparisons: the rows of the main table.
        tables: extra tables as (heading, column names, rows of cells), e.g. a time breakdown.
        settings: the workload parameters, shown under the table.
        notes: sentences shown under the table (computed observations, not interpretation).
        seconds: wall time of the whole benchmark.
    """

    name: str
    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class RunOptions:
    """How a benchmark should run.

    Attributes:
        quick: a tiny configuration (smoke test): seconds instead of minutes, numbers not comparable.
        data_dir: a scratch directory for server data (spool files, databases).
        log: where progress lines go.
    """

    quick: bool
    data_dir: Path
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(comparison: Comparison) -> str:
    """The ratio cell: median percent and range."""
    r = comparison.ratio
    if r.count == 1:
        return f"{100 * r.median:.0f}%"
    return f"{100 * r.median:.0f}% ({100 * r.low:.0f}–{100 * r.high:.0f}%)"


def fmt_goal(comparison: Comparison) -> str:
    """The goal cell: ``≥ 50% met`` / ``≥ 50% **not met**`` or a dash."""
    if comparison.goal is None:
        return "—"
    return f"≥ {100 * comparison.goal:.0f}% {'met' if comparison.meets_goal else '**not met**'}"


def result_markdown(result: BenchmarkResult, machine: str, when: str, quick: bool) -> str:
    """Render one benchmark's results (table, extra tables, settings, notes) as markdown."""
    parts = [f"### {result.title}", ""]
    stamp = f"Measured {when} on {machine}, {result.seconds:.0f} s."
    if quick:
        stamp += " **`--quick` smoke configuration: these numbers are not comparable.**"
    parts += [stamp, ""]
    if result.comparisons:
        rows = []
        for c in result.comparisons:
            digits = 0 if c.lethe.median >= 100 else 1
            rows.append(
                [
                    c.case,
                    f"{c.baseline_name}: {c.baseline.format(digits)} {c.unit}",
                    f"{c.lethe.format(digits)} {c.unit}",
                    fmt_ratio(c),
                    fmt_goal(c),
                ]
            )
        parts += [markdown_table(["case", "baseline", "measured", "measured / baseline", "goal"], rows), ""]
    for heading, header, rows in result.tables:
        parts += [f"**{heading}**", "", markdown_table(header, rows), ""]
    if result.settings:
        parts += ["Settings: " + "; ".join(f"{k} = {v}" for k, v in result.settings.items()) + ".", ""]
    parts += [f"- {note}" for note in result.notes]
    return "\n".join(parts).rstrip() + "\n"


# ----------------------------------------------------------------------------- document sections


def section_markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section names are letters, digits, '.', '_' and '-', got {name!r}")
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` holding ``body`` (appended at the end when it has no such section).

    Raises:
        ValueError: when the markers of ``name`` are damaged (one without the other, or out of order).
    """
    begin, end = section_markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    start, stop = text.find(begin), text.find(end)
    if start < 0 and stop < 0:
        return text.rstrip() + "\n\n" + block + "\n"
    if start < 0 or stop < start or text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"the markers of section {name!r} are damaged: expected {begin} ... {end} once, in order")
    return text[:start] + block + text[stop + len(end) :]


def write_section(doc: Path, name: str, body: str, *, title: str = "# Benchmarks") -> None:
    """Rewrite section ``name`` of ``doc`` with ``body`` (a new document starts with ``title``)."""
    text = doc.read_text() if doc.exists() else f"{title}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(replace_section(text, name, body))


def read_section(doc: Path, name: str) -> str | None:
    """The body of section ``name`` of ``doc``, or None when it has none."""
    begin, end = section_markers(name)
    text = doc.read_text() if doc.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        return None
    return text[start + len(begin) : stop].strip("\n")


# -------------------------------------------------------------------------------- machine facts


def version_of(distribution: str) -> str:
    """The installed version of ``distribution``, or ``not installed``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or :func:`platform.processor` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, str]:
    """Facts about this machine and the software versions, collected at run time."""
    import torch

    load = "n/a"
    with contextlib.suppress(OSError, AttributeError):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "CPU": cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "load average at start (1, 5, 15 min)": load,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": version_of("grpcio"),
        "protobuf": version_of("protobuf"),
        "numpy": version_of("numpy"),
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
    }


def machine_summary(info: dict[str, str] | None = None) -> str:
    """A one-line description: CPU and core count."""
    info = info or machine_info()
    return f"{info['CPU']}, {info['cores (os.cpu_count)']} cores"


def machine_line() -> str:
    """One line about the machine and the software, for the reproduction documents."""
    info = machine_info()
    return (
        f"{info['CPU']}, {info['cores (os.cpu_count)']} cores, {info['OS']}, Python {info['Python']}, "
        f"torch {info['torch']}, {'CPU only' if info['CUDA device'].startswith('none') else info['CUDA device']}"
    )


def machine_markdown(info: dict[str, str], when: str) -> str:
    """The machine table."""
    rows = [[key, value] for key, value in info.items()]
    return f"### Machine\n\nLast run {when}.\n\n" + markdown_table(["", ""], rows) + "\n"


def now_utc() -> str:
    """The current UTC time, to the minute."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
