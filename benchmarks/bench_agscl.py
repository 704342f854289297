"""Regularizer memory of ``agscl`` (values per node) against a per-parameter method (EWC, MAS: one per weight).

``python -m benchmarks.bench_agscl [--tasks 1,10] [--step-tasks 20]``

AGS-CL's headline (paper, Analysis 1): it stores one regularization value Ω per node, where EWC, SI
or MAS store one per parameter. Lethe's ``agscl`` keeps Ω as per-task shares (so that unlearning can
drop a task's share), which is nodes × live tasks values; both counts are reported. The anchor
weights (θ̂ here, θ* for EWC) are the model's own weights at the start of a learn in both cases and
are not counted. Counts only: nothing is trained.

With ``--step-tasks N`` it also learns N permuted-digits tasks with capacity on (default
configuration, CPU) and reports the learn-step time of task N over that of task 1 (``learn_seconds``
per optimizer step, proximal steps and the importance pass included) with the widths reached.
Results go to ``docs/reproduction-agscl.md`` (sections ``agscl-memory`` and ``agscl-steps``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from benchmarks.report import ROOT, machine_line, write_section
from client.datasets import load_digits
from server.engine.agscl import build_agscl
from server.engine.protocol import LearnOptions, TaskData, no_progress
from server.engine.training import count_minibatches

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


def step_times(tasks: int, epochs: int) -> list[str]:
    """Learn ``tasks`` permuted-digits tasks (capacity on); Markdown lines on the step time of the last vs the first."""
    strategy = build_agscl(backbone="mlp", input_shape=(1, 8, 8), num_classes=10, device=torch.device("cpu"), seed=0)
    options = LearnOptions(epochs=epochs, batch_size=32, learning_rate=1e-3, seed=0)
    warm = load_digits()  # a first learn on a throwaway model pays the one-time costs outside the measurement
    build_agscl(backbone="mlp", input_shape=(1, 8, 8), num_classes=10, device=torch.device("cpu"), seed=1).learn(
        "warm-up", TaskData(torch.from_numpy(warm.inputs), torch.from_numpy(warm.labels)), options, no_progress, {}
    )
    per_step: list[float] = []
    widths: list[list[int]] = []
    parameters: list[int] = []
    for index in range(tasks):
        data = load_digits().permute_pixels(index)
        task = TaskData(torch.from_numpy(data.inputs), torch.from_numpy(data.labels))
        report = strategy.learn(f"t{index}", task, options, no_progress, {})
        per_step.append(report.metrics["learn_seconds"] / (epochs * count_minibatches(len(task), 32)))
        widths.append(strategy.hidden_widths())
        parameters.append(strategy.parameter_count())
        print(f"task {index + 1}: {per_step[-1] * 1e3:.2f} ms/step, widths {widths[-1]}", flush=True)
    return [
        f"Learn-step time with capacity growth (`python -m benchmarks.bench_agscl --step-tasks {tasks}`): "
        f"{tasks} permuted-digits tasks, {epochs} epochs each, batch 32, one thread, `mlp` starting at 256-256. "
        f"{machine_line()}",
        "",
        "| | task 1 | task " + str(tasks) + " | ratio |",
        "|---|---|---|---|",
        f"| ms per learn step | {per_step[0] * 1e3:.2f} | {per_step[-1] * 1e3:.2f} | "
        f"{per_step[-1] / per_step[0]:.1f}x |",
        f"| hidden widths | {widths[0]} | {widths[-1]} | |",
        f"| parameters | {parameters[0]:,} | {parameters[-1]:,} | {parameters[-1] / parameters[0]:.1f}x |",
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every model; write (or print) the section."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_agscl", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,10", help="numbers of live tasks to report")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--step-tasks", type=int, default=0, help="also time learn steps over this many tasks")
    parser.add_argument("--step-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
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
    steps = "\n".join(step_times(args.step_tasks, args.step_epochs)) if args.step_tasks else ""
    if args.no_write:
        print(body + "\n" + steps)
    else:
        write_section(DOC, SECTION, body, title="# AGS-CL reproduction")
        if steps:
            write_section(DOC, "agscl-steps", steps, title="# AGS-CL reproduction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
