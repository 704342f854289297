"""Entry point of ``make bench``: run the benchmarks and rewrite the results section of docs/benchmarks.md.

Usage::

    python -m benchmarks.run [--quick] [--only NAME] [--doc PATH | --no-doc] [--json PATH] [--data-dir DIR]

Each benchmark owns one section of ``docs/benchmarks.md`` (``<!-- bench:NAME:begin -->`` ...
``<!-- bench:NAME:end -->``, see :mod:`benchmarks.report`); a run rewrites the sections of the
benchmarks it ran and the ``machine`` section, nothing else. ``--quick`` runs a tiny smoke
configuration whose numbers mean nothing, so it writes no document unless ``--doc`` names one
explicitly.

To add a benchmark: a module with ``NAME`` and ``run(options: RunOptions) -> BenchmarkResult``,
registered in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks import bench_ha, bench_peer, bench_records, bench_scale, bench_submit_latency, ingest, predict, soak
from benchmarks.report import (
    BENCHMARKS_DOC,
    ROOT,
    BenchmarkResult,
    RunOptions,
    machine_info,
    machine_markdown,
    machine_summary,
    now_utc,
    replace_section,
    result_markdown,
)

DEFAULT_DOC = BENCHMARKS_DOC
#: Scratch space for server data: on the same file system as a server's default ``./var``.
DEFAULT_DATA_DIR = ROOT / "var" / "bench"

#: Every benchmark, in the order they run.
BENCHMARKS: dict[str, Callable[[RunOptions], BenchmarkResult]] = {
    ingest.NAME: ingest.run,
    predict.NAME: predict.run,
    soak.NAME: soak.run,
    bench_scale.NAME: bench_scale.run,
    bench_submit_latency.NAME: bench_submit_latency.run,
    bench_records.NAME: bench_records.run,
    bench_peer.NAME: bench_peer.run,
    bench_ha.NAME: bench_ha.run,
}
#: Benchmarks that run only when named with ``--only``: ``peer`` installs MLServer (and torch) into an
#: environment of its own on first use; ``ha`` needs PostgreSQL.
OPT_IN = frozenset({bench_peer.NAME, bench_ha.NAME})
#: What a run without ``--only`` runs.
DEFAULT = [name for name in BENCHMARKS if name not in OPT_IN]
#: The section of the machine table.
MACHINE = "machine"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (numbers are meaningless)")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help=f"run only this benchmark (repeatable); {', '.join(sorted(OPT_IN))} run only when named",
    )
    parser.add_argument("--doc", type=Path, help="document to update (default docs/benchmarks.md; none with --quick)")
    parser.add_argument("--no-doc", action="store_true", help="print the results, write no document")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="scratch directory for server data")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, print their tables, update the document; return the exit status."""
    args = parse_args(argv)
    names = args.only or DEFAULT
    info = machine_info()
    when = now_utc()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.data_dir))
    options = RunOptions(quick=args.quick, data_dir=scratch)
    results: list[BenchmarkResult] = []
    try:
        for name in names:
            options.log(f"benchmark {name}{' (quick)' if args.quick else ''} ...")
            results.append(BENCHMARKS[name](options))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    blocks = {MACHINE: machine_markdown(info, when)}
    for result in results:
        blocks[result.name] = result_markdown(result, machine_summary(info), when, args.quick)
    for result in results:
        print(blocks[result.name])
    doc = None if args.no_doc else (args.doc or (None if args.quick else DEFAULT_DOC))
    if doc is not None:
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        for name, body in blocks.items():
            text = replace_section(text, name, body)
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(text)
        options.log(f"updated {doc}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": info, "when": when, "quick": args.quick, "results": [asdict(r) for r in results]})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
