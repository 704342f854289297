"""Reproduction of AGS-CL on digits, through the gRPC API, with capacity and unlearning.

``python -m benchmarks.repro_agscl [--quick] [--seeds 0,1,2] [--epochs N] [--variants a,b]``

Two benchmarks (the task families of ``benchmarks.repro_uncle``):

* **permuted digits**: 10 tasks of all 10 classes under fixed pixel permutations;
* **split digits**: 5 two-class tasks ``{0,1}, {2,3}, ...``.

Two request sequences each: ``learn`` (every task once, in order: ACC after all tasks, the paper's
metric, and the model's parameters after every job, with capacity growth on and off) and
``unlearn`` (UnCLE's sequence of learns and unlearns: FA, spill, relapse, MIA, unlearning time).
Every run is a fresh ``lethe serve`` process with its own SQLite database; every number comes from
the server (``ListEvaluations``, job metrics, ``GetTask``, ``GetModel``). Results go to
``docs/reproduction-agscl.md`` (section ``repro-agscl``) and ``var/repro-agscl/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from benchmarks.report import ROOT, machine_line, write_section
from benchmarks.repro_uncle import BENCHMARKS, HOLDOUT, PERMUTED_SEQUENCE, SPLIT_SEQUENCE, Benchmark, task_name
from benchmarks.servers import scratch_lethe_server
from client import pb

DOC = ROOT / "docs" / "reproduction-agscl.md"
RAW = ROOT / "var" / "repro-agscl" / "results.json"
SECTION = "repro-agscl"
TITLE = "# AGS-CL reproduction"

#: Request sequences per benchmark: every task learned once, and UnCLE's learn/unlearn sequence.
SEQUENCES: dict[str, dict[str, str]] = {
    "permuted": {"learn": " ".join(f"L{i}" for i in range(10)), "unlearn": PERMUTED_SEQUENCE},
    "split": {"learn": " ".join(f"L{i}" for i in range(5)), "unlearn": SPLIT_SEQUENCE},
}


@dataclass(frozen=True)
class Variant:
    """One configuration: label, strategy, ``model.options`` and which sequences it runs."""

    key: str
    label: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    sequences: tuple[str, ...] = ("learn", "unlearn")


VARIANTS: tuple[Variant, ...] = (
    Variant("agscl", "agscl (capacity auto: growth and pruning)", "agscl"),
    Variant("agscl-fixed", "agscl, fixed width (capacity off)", "agscl", {"capacity": "off"}, ("learn",)),
    Variant(
        "agscl-no-dropout",
        "agscl, growth without targeted dropout (dropout_percent 0)",
        "agscl",
        {"dropout_percent": 0.0},
        ("learn",),
    ),
    Variant("finetune-grow", "finetune, capacity on (grows 25 % per task)", "finetune", {"capacity": "on"}, ("learn",)),
    Variant("finetune", "finetune (delete head)", "finetune"),
    Variant("uncle", "uncle (noise-align)", "uncle", sequences=("learn",)),  # its unlearning: reproduction-uncle.md
)


@dataclass
class Run:
    """What one (benchmark, sequence, variant, seed) run measured."""

    benchmark: str
    sequence: str
    variant: str
    seed: int
    epochs: int
    acc: float  # mean final accuracy of the learned tasks
    fa: float  # mean final accuracy of the unlearned tasks
    parameters: list[int]  # GetModel().parameters after every job
    spills: list[float]
    relapses: list[float]
    mia: list[float]
    unlearn_seconds: list[float]
    learn_seconds: list[float]
    verified: list[float]
    wall_seconds: float


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def run(benchmark: Benchmark, sequence: str, variant: Variant, seed: int, epochs: int) -> Run:
    """Run one request sequence on a fresh server; collect the server's numbers."""
    settings: dict[str, Any] = {
        "model.strategy": variant.strategy,
        "model.backbone": "mlp",
        "model.seed": seed,
        "training.epochs": epochs,
        "training.batch_size": 32,
        "training.holdout_fraction": HOLDOUT,
        "training.forget_probe_ops": 1000,
        **{f"model.options.{k}": v for k, v in variant.options.items()},
    }
    started = time.perf_counter()
    parameters: list[int] = []
    spills: list[float] = []
    mia: list[float] = []
    unlearn_s: list[float] = []
    learn_s: list[float] = []
    verified: list[float] = []
    with scratch_lethe_server(settings, prefix="repro-agscl-") as server:
        client = server.client
        for op in SEQUENCES[benchmark.key][sequence].split():
            index = int(op[1:])
            name = task_name(index)
            if op[0] == "L":
                data = benchmark.task_data(index)
                job = client.wait(client.learn(name, data.inputs, data.labels, holdout_fraction=HOLDOUT).id)
                learn_s.append(job.metrics.get("learn_seconds", math.nan))
            else:
                job = client.wait(client.unlearn(name, reason="reproduction").id)
                m = job.metrics
                spills.append(m.get("spill", math.nan))
                mia.append(m.get("mia", math.nan))
                unlearn_s.append(m.get("unlearn_seconds", math.nan))
                verified.append(m.get("forget_verified", math.nan))
            parameters.append(int(client.model().parameters))
        rows = client.evaluations()
        tasks = {t.name: t for t in client.tasks()}
    final = {k: float(v) for k, v in rows[-1].accuracies.items()} if rows else {}
    learned = [n for n, t in tasks.items() if t.state == pb.LEARNED]
    unlearned = [n for n, t in tasks.items() if t.state == pb.UNLEARNED]
    return Run(
        benchmark=benchmark.key,
        sequence=sequence,
        variant=variant.key,
        seed=seed,
        epochs=epochs,
        acc=_mean([final.get(n, math.nan) for n in learned]),
        fa=_mean([final.get(n, math.nan) for n in unlearned]),
        parameters=parameters,
        spills=spills,
        relapses=[float(tasks[n].relapse) for n in unlearned],
        mia=mia,
        unlearn_seconds=unlearn_s,
        learn_seconds=learn_s,
        verified=verified,
        wall_seconds=time.perf_counter() - started,
    )


def _stat(values: Sequence[float], digits: int = 1) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:,.{digits}f}"
    return f"{statistics.fmean(finite):,.{digits}f} ± {statistics.stdev(finite):,.{digits}f}"


def render(runs: Sequence[Run], args: argparse.Namespace) -> str:
    """The Markdown section: ACC tables, parameters over the sequence, unlearning numbers."""
    labels = {v.key: v.label for v in VARIANTS}
    out = [
        f"Generated by `python -m benchmarks.repro_agscl` on {datetime.now(UTC):%Y-%m-%d}: seeds "
        f"{args.seeds}, {args.epochs} epochs per task, batch 32, Adam 1e-3, `mlp` (256-256 to start), "
        f"{int(HOLDOUT * 100)} % of each stream held out as its probe set. {machine_line()}",
        "",
    ]
    for key, benchmark in BENCHMARKS.items():
        chosen = [r for r in runs if r.benchmark == key]
        if not chosen:
            continue
        out += [f"### {benchmark.title}", "", "ACC after all tasks (sequence `learn`: every task once, in order):", ""]
        out += ["| variant | ACC (%) | parameters at the end | learn seconds per task |", "|---|---|---|---|"]
        for variant in VARIANTS:
            group = [r for r in chosen if r.variant == variant.key and r.sequence == "learn"]
            if group:
                out.append(
                    f"| {labels[variant.key]} | {_stat([r.acc for r in group])} | "
                    f"{_stat([r.parameters[-1] for r in group], 0)} | "
                    f"{_stat([_mean(r.learn_seconds) for r in group], 2)} |"
                )
        growth = [r for r in chosen if r.sequence == "learn" and r.variant in ("agscl", "agscl-fixed")]
        if growth:
            out += ["", "Parameters after every job (seed " + str(growth[0].seed) + "):", ""]
            for r in growth:
                if r.seed == growth[0].seed:
                    out.append(f"- {labels[r.variant]}: " + ", ".join(f"{p:,}" for p in r.parameters))
        if not any(r.sequence == "unlearn" for r in chosen):
            out.append("")
            continue
        out += ["", f"Unlearning (sequence `unlearn`: `{SEQUENCES[key]['unlearn']}`):", ""]
        out += [
            "| variant | RA (%) | FA (%) | spill (points) | relapse (points) | MIA (%) | unlearn seconds | "
            "verified | parameters at the end |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            group = [r for r in chosen if r.variant == variant.key and r.sequence == "unlearn"]
            if group:
                out.append(
                    f"| {labels[variant.key]} | {_stat([r.acc for r in group])} | {_stat([r.fa for r in group])} | "
                    f"{_stat([_mean(r.spills) for r in group], 2)} | {_stat([_mean(r.relapses) for r in group], 2)} | "
                    f"{_stat([_mean(r.mia) for r in group])} | {_stat([_mean(r.unlearn_seconds) for r in group], 3)} | "
                    f"{_stat([_mean(r.verified) for r in group], 2)} | {_stat([r.parameters[-1] for r in group], 0)} |"
                )
        out.append("")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repro_agscl", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--benchmarks", default="permuted,split")
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS))
    parser.add_argument("--quick", action="store_true", help="one seed, 5 epochs")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing the docs")
    parser.add_argument("--tag", default="", help="write section repro-agscl-TAG (and its own raw file) instead")
    parser.add_argument("--render", action="store_true", help="only render the section again from the raw file")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = "0", 5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (benchmark, variant, sequence, seed); write the section and the raw numbers."""
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [v for v in VARIANTS if v.key in args.variants.split(",")]
    runs: list[Run] = []
    if args.render:
        raw = RAW.with_name(f"results-{args.tag}.json") if args.tag else RAW
        runs = [Run(**entry) for entry in json.loads(raw.read_text())]
        write_section(DOC, f"{SECTION}-{args.tag}" if args.tag else SECTION, render(runs, args), title=TITLE)
        return 0
    for key in args.benchmarks.split(","):
        for variant in chosen:
            for sequence in variant.sequences:
                for seed in seeds:
                    result = run(BENCHMARKS[key], sequence, variant, seed, args.epochs)
                    print(
                        f"{key} {sequence} {variant.key} seed {seed}: ACC {result.acc:.1f} FA {result.fa:.1f} "
                        f"spill {_mean(result.spills):.2f} parameters {result.parameters[-1]:,} "
                        f"({result.wall_seconds:.0f} s)",
                        flush=True,
                    )
                    runs.append(result)
        raw = RAW.with_name(f"results-{args.tag}.json") if args.tag else RAW
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps([asdict(r) for r in runs], indent=1))  # after every benchmark: partial results
    body = render(runs, args)
    if args.no_write:
        print(body)
    else:
        write_section(DOC, f"{SECTION}-{args.tag}" if args.tag else SECTION, body, title=TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
