"""Regularizer memory of ``agscl`` (values per node) against a per-parameter method (EWC, MAS: one per weight).

``python -m benchmarks.bench_agscl [--tasks 1,10]``

AGS-CL's headline (paper, Analysis 1): it stores one regularization value Ω per node, where EWC, SI
or MAS store one per parameter. Lethe's ``agscl`` keeps Ω as per-task shares (so that unlearning can
drop a task's share), which is nodes × live tasks values; both counts are reported. The anchor
weights (θ̂ here, θ* for EWC) are the model's own weights at the start of a learn in both cases and
are not counted. Counts only: nothing is trained. Results go to ``docs/reproduction-agscl.md``
(section ``agscl-memory``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from benchmarks.report import ROOT, write_section
from server.engine.agscl import build_agscl

DOC = ROOT / "docs" / "reproduction-agscl.md"
SECTION = "agscl-memory"
#: (backbone, input shape, width) measured.
MODELS: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("mlp", (1, 28, 28), 0),
    ("cnn", (3, 32, 32), 0),
    ("resnet18", (3, 32, 32), 0),
)


def measure(backbone: str, shape: tuple[int, ...], width: int, tasks: Sequence[int]) -> list[str]:
    """Table rows for one backbone: nodes, trunk parameters and the ratios at each number of tasks."""
    strategy = build_agscl(
        backbone=backbone, input_shape=shape, num_classes=10, device=torch.device("cpu"), seed=0, width=width
    )
    nodes = int(strategy.describe()["nodes"])
    parameters = sum(p.numel() for p in strategy._trunk.parameters())
    rows = []
    for count in tasks:
        shares = nodes * count
        rows.append(
            f"| `{backbone}` {'x'.join(map(str, shape))} | {count} | {nodes:,} | {shares:,} | {parameters:,} | "
            f"{parameters / nodes:,.0f}x | {parameters / shares:,.0f}x |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every model; write (or print) the section."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_agscl", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,10", help="numbers of live tasks to report")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    tasks = [int(t) for t in args.tasks.split(",")]
    lines = [
        "Regularizer memory (`python -m benchmarks.bench_agscl`): values AGS-CL keeps per node (Ω) and per node and "
        "live task (Lethe's shares, for unlearning), against the one value per trunk parameter of EWC/MAS "
        "(the per-task heads are not regularized by either).",
        "",
        "| model | live tasks | Ω values (nodes) | share values | per-parameter values | "
        "parameters ÷ nodes | parameters ÷ shares |",
        "|---|---|---|---|---|---|---|",
    ]
    for backbone, shape, width in MODELS:
        lines += measure(backbone, shape, width, tasks)
    body = "\n".join(lines) + "\n"
    if args.no_write:
        print(body)
    else:
        write_section(DOC, SECTION, body, title="# AGS-CL reproduction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
