"""``make repro``: the reproduction runs of the strategies' papers, through the gRPC API.

``python -m benchmarks.reproduce [uncle|lure|agscl|all] [options passed on]`` runs
``benchmarks.repro_uncle``, ``benchmarks.repro_lure`` and/or ``benchmarks.repro_agscl``; each writes its
tables and plots under ``docs/`` (``docs/reproduction-uncle.md``, ``docs/reproduction-lure.md``,
``docs/reproduction-agscl.md``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUITES = {"uncle": "benchmarks.repro_uncle", "lure": "benchmarks.repro_lure", "agscl": "benchmarks.repro_agscl"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen suite(s); return the first non-zero exit code, else 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    which = args.pop(0) if args and args[0] in (*SUITES, "all") else "all"
    names = list(SUITES) if which == "all" else [which]
    status = 0
    for name in names:
        module = importlib.import_module(SUITES[name])
        print(f"== reproduction: {name}", flush=True)
        status = status or int(module.main(args))
    return status


if __name__ == "__main__":
    sys.exit(main())
