"""Reproduction of UnCLE (Tables 1-2, 9, 10 and Figure 3 of the paper) on digits, through the gRPC API.

``python -m benchmarks.repro_uncle [--quick] [--seeds 0,1,2] [--epochs N] [--set key=value ...]``

Two benchmarks, each a request sequence of the paper's Table 4 (sequence 1):

* **permuted digits**: 10 tasks, each scikit-learn's 8x8 digits (all 10 classes) under a fixed pixel
  permutation (seed = task index); ``L1 L0 U1 L5 L8 L9 L7 U0 L2 L3 L4 U8 U3 U5 L6``.
* **split digits**: 5 tasks of two classes, ``{0,1}, {2,3}, ...``; ``L0 L1 U0 L2 L3 L4 U1``.

Every configuration (strategy, unlearning method, options) runs in its own fresh server process
(own data directory and SQLite database), one after the other. Each Learn streams the task's whole
dataset with ``holdout_fraction = 0.2``: the server trains on 80% and keeps the other 20% as the
task's probe set, on which it evaluates every task after every job; the accuracy matrix, spill,
relapse, MIA and UNI all come from the server's own evaluations (``ListEvaluations``, job metrics,
``GetTask``). Nothing is computed on the client except averages.

Results go to ``docs/reproduction-uncle.md`` (its ``repro-uncle`` section; the other sections are
kept), plots to ``docs/img/uncle-*.png`` and the raw numbers to
``var/repro-uncle/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import ROOT, machine_line, write_section
from benchmarks.servers import scratch_lethe_server
from client import LetheClient, pb
from client.datasets import Dataset, load_digits

DOC = ROOT / "docs" / "reproduction-uncle.md"
IMG = ROOT / "docs" / "img"
RAW = ROOT / "var" / "repro-uncle" / "results.json"
#: The sections of ``DOC`` this module (``repro-uncle``, ``repro-uncle-TAG`` with ``--tag``) and
#: ``benchmarks.bench_uncle`` (``uncle``) write (:func:`benchmarks.report.write_section`).
SECTION = "repro-uncle"
BENCH_SECTION = "uncle"
TITLE = "# UnCLE reproduction"

#: Fraction of each streamed task the server keeps as its probe set.
HOLDOUT = 0.2

#: The paper's Table 4, sequence 1.
PERMUTED_SEQUENCE = "L1 L0 U1 L5 L8 L9 L7 U0 L2 L3 L4 U8 U3 U5 L6"
SPLIT_SEQUENCE = "L0 L1 U0 L2 L3 L4 U1"

#: The paper's numbers for UnCLE (Tables 1, 2, 9, 10): Permuted-MNIST and 5-Tasks, sequence 1.
PAPER: dict[str, dict[str, float]] = {
    "permuted": {"ra": 96.87, "fa": 10.00, "spill": 0.044, "relapse": 8.703, "mia": 50.00, "unlearn_s": 13.16},
    "split": {"ra": 94.12, "fa": 10.04, "spill": 0.023, "relapse": 0.539, "mia": 50.01, "unlearn_s": 33.28},
}


@dataclass(frozen=True)
class Variant:
    """One configuration of the comparison.

    Attributes:
        key: short identifier (file names, JSON).
        label: how the tables name it.
        strategy: server strategy.
        method: unlearn method sent with every Unlearn ("" = the strategy's default).
        options: ``model.options.*`` overrides.
    """

    key: str
    label: str
    strategy: str
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("uncle", "uncle (noise-align, projected, relapse guard)", "uncle"),
    Variant("uncle-no-guard", "uncle without relapse guard", "uncle", options={"relapse_guard": False}),
    Variant(
        "uncle-output-layer",
        "uncle, projected burn-in also on the output layer",
        "uncle",
        options={"projected_output_layer": True},
    ),
    Variant("uncle-penalty", "uncle, the paper's penalty burn-in", "uncle", options={"unlearn_update": "penalty"}),
    Variant("discard-embedding", "uncle, discard-embedding", "uncle", "discard-embedding"),
    Variant("norm-reduce", "uncle, norm-reduce", "uncle", "norm-reduce"),
    Variant("fixed-noise", "uncle, fixed-noise", "uncle", "fixed-noise"),
    Variant("none", "uncle, none (learn only)", "uncle", "none"),
    Variant("finetune", "finetune (delete head)", "finetune"),
)


@dataclass(frozen=True)
class Benchmark:
    """A task family and its request sequence."""

    key: str
    title: str
    sequence: tuple[str, ...]
    chance: float

    def task_data(self, index: int) -> Dataset:
        """The whole dataset of task ``index`` (the server splits off the probe set)."""
        digits = load_digits()
        if self.key == "permuted":
            return digits.permute_pixels(index)
        return digits.select([2 * index, 2 * index + 1])


BENCHMARKS: dict[str, Benchmark] = {
    "permuted": Benchmark(
        "permuted", "Permuted digits (10 tasks x 10 classes)", tuple(PERMUTED_SEQUENCE.split()), 10.0
    ),
    "split": Benchmark("split", "Split digits (5 tasks x 2 classes)", tuple(SPLIT_SEQUENCE.split()), 50.0),
}


@dataclass
class RunResult:
    """Everything one (benchmark, variant, seed) run measured.

    Attributes:
        benchmark, variant, seed, epochs: what ran.
        operations: the sequence, e.g. ``["L1", "L0", "U1", ...]``.
        accuracies: one dict per operation, task name -> probe accuracy (%) after it.
        learned, unlearned: task names in each state at the end.
        ra, fa: mean final accuracy of the learned / unlearned tasks.
        spills: spill of every unlearn (server metric).
        relapses: final relapse of every unlearned task (``GetTask``).
        mia, uni: per unlearn.
        unlearn_seconds, learn_seconds: per operation (strategy compute time).
        forget_accuracy_task: accuracy of each forgotten task right after its unlearn.
        wall_seconds: the whole run, server start to stop.
        verification: per unlearn, the server's forgetting check (the job metrics in ``VERIFY``).
    """

    benchmark: str
    variant: str
    seed: int
    epochs: int
    operations: list[str]
    accuracies: list[dict[str, float]]
    learned: list[str]
    unlearned: list[str]
    ra: float
    fa: float
    spills: list[float]
    relapses: list[float]
    mia: list[float]
    uni: list[float]
    unlearn_seconds: list[float]
    learn_seconds: list[float]
    forget_accuracy_task: list[float]
    wall_seconds: float
    verification: list[dict[str, float]] = field(default_factory=list)


#: Job metrics of the server's forgetting check (DESIGN.md section 9) kept per unlearn.
VERIFY: tuple[str, ...] = (
    "forget_verified",
    "forget_balanced_accuracy",
    "forget_balanced_accuracy_members",
    "forget_reference",
    "forget_gap",
    "forget_attempts",
    "forget_accuracy_low",
    "forget_accuracy_high",
    "mia_p_value",
    "mia_known",
)


def task_name(index: int) -> str:
    """Server task name of task ``index``."""
    return f"t{index}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


@contextlib.contextmanager
def fresh_server(settings: dict[str, Any]) -> Iterator[LetheClient]:
    """A ``lethe serve`` subprocess with its own empty data directory; yields a connected client."""
    overrides = {
        # Keep forgotten tasks' probe sets for the whole sequence so relapse is measured to the end.
        "training.forget_probe_ops": 1000,
        **settings,
    }
    with scratch_lethe_server(overrides, prefix="repro-uncle-") as server:
        yield server.client


def run_sequence(
    benchmark: Benchmark,
    variant: Variant,
    seed: int,
    epochs: int,
    extra_options: dict[str, Any],
    *,
    width: int = 0,
    threads: int = 0,
) -> RunResult:
    """Run ``benchmark``'s sequence on a fresh server configured by ``variant``; collect its metrics."""
    settings: dict[str, Any] = {
        "model.strategy": variant.strategy,
        "model.backbone": "mlp",
        "model.width": width,
        "model.torch_threads": threads,
        "model.seed": seed,
        "training.epochs": epochs,
        "training.batch_size": 32,
        "training.holdout_fraction": HOLDOUT,
    }
    options = {**variant.options, **(extra_options if variant.strategy == "uncle" else {})}
    for key, value in options.items():
        settings[f"model.options.{key}"] = value
    started = time.perf_counter()
    learn_s: list[float] = []
    unlearn_s: list[float] = []
    spills: list[float] = []
    mia: list[float] = []
    uni: list[float] = []
    forget_task: list[float] = []
    verification: list[dict[str, float]] = []
    with fresh_server(settings) as client:
        for op in benchmark.sequence:
            index = int(op[1:])
            name = task_name(index)
            if op[0] == "L":
                data = benchmark.task_data(index)
                job = client.wait(client.learn(name, data.inputs, data.labels, holdout_fraction=HOLDOUT).id)
                learn_s.append(job.metrics.get("learn_seconds", math.nan))
            else:
                job = client.wait(client.unlearn(name, reason="reproduction", method=variant.method).id)
                m = job.metrics
                unlearn_s.append(m.get("unlearn_seconds", math.nan))
                spills.append(m.get("spill", math.nan))
                mia.append(m.get("mia", math.nan))
                uni.append(m.get("uni", math.nan))
                forget_task.append(m.get("forget_accuracy_task", math.nan))
                verification.append({key: float(m.get(key, math.nan)) for key in VERIFY})
        rows = client.evaluations()
        tasks = {t.name: t for t in client.tasks()}
    accuracies = [{k: float(v) for k, v in row.accuracies.items()} for row in rows]
    final = accuracies[-1] if accuracies else {}
    learned = [n for n, t in tasks.items() if t.state == pb.LEARNED]
    unlearned = [n for n, t in tasks.items() if t.state == pb.UNLEARNED]
    return RunResult(
        benchmark=benchmark.key,
        variant=variant.key,
        seed=seed,
        epochs=epochs,
        operations=list(benchmark.sequence),
        accuracies=accuracies,
        learned=sorted(learned),
        unlearned=sorted(unlearned),
        ra=_mean([final.get(n, math.nan) for n in learned]),
        fa=_mean([final.get(n, math.nan) for n in unlearned]),
        spills=spills,
        relapses=[float(tasks[n].relapse) for n in sorted(unlearned)],
        mia=mia,
        uni=uni,
        unlearn_seconds=unlearn_s,
        learn_seconds=learn_s,
        forget_accuracy_task=forget_task,
        wall_seconds=time.perf_counter() - started,
        verification=verification,
    )


# ---------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """Mean and standard deviation over seeds (NaN when nothing was measured)."""

    mean: float
    std: float
    count: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Mean ± sample standard deviation of the finite ``values``."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan)
        return cls(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0, len(finite))

    def format(self, digits: int = 1) -> str:
        """``"m ± s"`` (just ``m`` for one value) or an em dash."""
        if not math.isfinite(self.mean):
            return "—"
        if self.count == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


METRICS: tuple[tuple[str, str], ...] = (
    ("ra", "RA %"),
    ("fa", "FA %"),
    ("spill", "mean spill (pp)"),
    ("relapse", "mean relapse (pp)"),
    ("mia", "MIA %"),
    ("uni", "UNI"),
    ("unlearn_s", "unlearn s"),
    ("learn_s", "learn s / task"),
)


def per_seed(run: RunResult) -> dict[str, float]:
    """The summary numbers of one run."""
    return {
        "ra": run.ra,
        "fa": run.fa,
        "spill": _mean(run.spills),
        "relapse": _mean(run.relapses),
        "mia": _mean(run.mia),
        "uni": _mean(run.uni),
        "unlearn_s": _mean(run.unlearn_seconds),
        "learn_s": _mean(run.learn_seconds),
        "time_ratio": _mean(run.unlearn_seconds) / _mean(run.learn_seconds),
        **verified_of(run),
    }


def verified_of(run: RunResult) -> dict[str, float]:
    """Means over the run's unlearns of the server's forgetting check (NaN without it)."""
    checks = run.verification

    def mean(key: str) -> float:
        return _mean([c.get(key, math.nan) for c in checks])

    return {
        "verified": 100 * mean("forget_verified"),
        "forget_ba": mean("forget_balanced_accuracy"),
        "forget_ba_members": mean("forget_balanced_accuracy_members"),
        "forget_reference": mean("forget_reference"),
        "forget_attempts": mean("forget_attempts"),
        "mia_p": _mean([c.get("mia_p_value", math.nan) for c in checks if c.get("mia_known") == 1.0]),
    }


#: The verification table: key of ``per_seed`` and its column title.
VERIFY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("verified", "unlearns verified %"),
    ("forget_ba", "forget bal. acc. probe %"),
    ("forget_ba_members", "forget bal. acc. members %"),
    ("forget_reference", "reference %"),
    ("forget_attempts", "attempts"),
    ("mia_p", "MIA p-value"),
)


def aggregate(runs: Sequence[RunResult]) -> dict[str, Stat]:
    """Mean ± std over the seeds of one (benchmark, variant)."""
    rows = [per_seed(r) for r in runs]
    return {key: Stat.of([row[key] for row in rows]) for key in rows[0]}


@dataclass(frozen=True)
class Target:
    """One of the brief's targets for permuted digits."""

    metric: str
    text: str

    def check(self, stats: dict[str, Stat]) -> tuple[bool | None, str]:
        """PASS/MISS (None if unmeasured) and how far off, from the mean over seeds."""
        value = stats[self.metric].mean
        if not math.isfinite(value):
            return None, "not measured"
        if self.metric == "ra":
            return value >= 95, f"{value - 95:+.2f} pp vs 95"
        if self.metric == "fa":
            return abs(value - 10) <= 2, f"off by {abs(value - 10):.1f} pp"
        if self.metric == "spill":
            return value <= 0.5, f"{value:.2f} pp vs 0.5"
        if self.metric == "relapse":
            return value <= 2, f"{value:.2f} pp vs 2"
        if self.metric == "mia":
            return abs(value - 50) <= 5, f"off by {abs(value - 50):.1f}"
        if self.metric == "time_ratio":
            return value <= 0.10, f"{100 * value:.1f}% of a learn"
        raise AssertionError(self.metric)


TARGETS: tuple[Target, ...] = (
    Target("ra", "RA ≥ 95"),
    Target("fa", "FA within 2 pp of chance (10%)"),
    Target("spill", "mean spill ≤ 0.5 pp"),
    Target("relapse", "mean relapse ≤ 2 pp"),
    Target("mia", "MIA 50 ± 5"),
    Target("time_ratio", "unlearn time ≤ 10% of a task's learn time"),
)


# ---------------------------------------------------------------------- plots


def plot_sequence(runs: Sequence[RunResult], title: str, path: Path) -> None:
    """Figure 3 style: every task's probe accuracy after every operation, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs) + 1.0, 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, run in zip(axes[0], runs, strict=True):
        ops = run.operations
        x = np.arange(1, len(ops) + 1)
        names = sorted({int(op[1:]) for op in ops})
        for index in names:
            name = task_name(index)
            ys = [row.get(name, math.nan) for row in run.accuracies]
            ax.plot(x, ys, marker="o", markersize=3, color=cmap(index % 10), label=f"task {index}")
        for position, op in enumerate(ops, start=1):
            if op[0] == "U":
                ax.axvspan(position - 0.4, position + 0.4, color="0.85", zorder=0)
        ax.axhline(BENCHMARKS[run.benchmark].chance, color="0.4", linestyle=":", linewidth=1)
        ax.set_xticks(x, [op.replace("L", "L#").replace("U", "U#") for op in ops], rotation=60, fontsize=8)
        ax.set_title(f"{run.variant} (seed {run.seed})")
        ax.set_xlabel("operation (grey: unlearn; dotted: chance)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probe accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(
    results: dict[str, dict[str, list[RunResult]]],
    labels: dict[str, str],
    args: argparse.Namespace,
    elapsed: float,
    plots: dict[str, str],
) -> str:
    """The markdown block of the reproduction."""
    seeds = ",".join(str(s) for s in args.seeds)
    command = "python -m benchmarks.repro_uncle" + (" --quick" if args.quick else f" --seeds {seeds}")
    if args.epochs_given:
        command += f" --epochs {args.epochs}"
    if args.width != 100:
        command += f" --width {args.width}"
    if args.benchmarks != list(BENCHMARKS):
        command += f" --benchmarks {','.join(args.benchmarks)}"
    if args.variants != [v.key for v in VARIANTS] and not args.quick:
        command += f" --variants {','.join(args.variants)}"
    if args.tag:
        command += f" --tag {args.tag}"
    for item in args.set:
        command += f" --set {item}"
    out = [
        f"_Generated by `{command}` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"in {elapsed / 60:.1f} min of runs; {machine_line()}, shared with other jobs._",
        "",
        f"Settings: backbone `mlp` (2 hidden layers of {args.width or 256}), {args.epochs} epochs per Learn, "
        f"batch 32, the server's default learning rate (Adam 1e-3 for uncle), torch threads {args.threads}, "
        f"seeds {seeds} (`model.seed`), holdout fraction {HOLDOUT} (the server's probe set of each "
        "task is 20% of the streamed digits, never trained on), `training.forget_probe_ops = 1000` (relapse is "
        "measured to the end of the sequence)."
        + (f" Extra uncle options: `{', '.join(args.set)}`." if args.set else " uncle options: the server defaults."),
        "",
    ]
    for bench_key, by_variant in results.items():
        benchmark = BENCHMARKS[bench_key]
        paper = PAPER[bench_key]
        out += [
            f"### {benchmark.title}",
            "",
            f"Sequence: `{' '.join(benchmark.sequence)}`; chance = {benchmark.chance:.0f}%.",
            "",
        ]
        header = ["configuration", *[title for _, title in METRICS]]
        rows = []
        stats_of: dict[str, dict[str, Stat]] = {}
        for variant_key, runs in by_variant.items():
            stats = aggregate(runs)
            stats_of[variant_key] = stats
            digits = {"spill": 2, "relapse": 2, "unlearn_s": 2, "learn_s": 2, "uni": 1}
            rows.append([labels[variant_key], *[stats[key].format(digits.get(key, 1)) for key, _ in METRICS]])
        paper_name = "Permuted-MNIST" if bench_key == "permuted" else "5-Tasks"
        rows.append(
            [
                f"*paper, UnCLE on {paper_name}*",
                f"*{paper['ra']}*",
                f"*{paper['fa']}*",
                f"*{paper['spill']}*",
                f"*{paper['relapse']}*",
                f"*{paper['mia']}*",
                "—",
                f"*{paper['unlearn_s']} (V100)*",
                "—",
            ]
        )
        out += [_table(header, rows), ""]
        if bench_key == "permuted":
            out += ["Targets (mean over seeds):", ""]
            trow = []
            for variant_key, stats in stats_of.items():
                cells = [labels[variant_key]]
                for target in TARGETS:
                    ok, how = target.check(stats)
                    cells.append("—" if ok is None else f"{'PASS' if ok else 'MISS'} ({how})")
                trow.append(cells)
            out += [_table(["configuration", *[t.text for t in TARGETS]], trow), ""]
        else:
            out += [
                "Split digits tasks have two classes: chance, and the ideal FA, is 50%. The paper's 5-Tasks "
                "(five 10-class datasets) has chance 10%, so its FA is not comparable.",
                "",
            ]
        vrows = []
        for variant_key, runs in by_variant.items():
            checks = [c for r in runs for c in r.verification if math.isfinite(c.get("forget_verified", math.nan))]
            if not checks:
                continue
            stats = stats_of[variant_key]
            count = f"{sum(c['forget_verified'] == 1.0 for c in checks)}/{len(checks)}"
            cells = [stats[key].format(2 if key in ("forget_attempts", "mia_p") else 1) for key, _ in VERIFY_COLUMNS]
            vrows.append([labels[variant_key], f"{count} ({cells[0]})", *cells[1:]])
        if vrows:
            out += [
                "Verified forgetting (the server's check of every unlearn, DESIGN.md section 9; mean over a "
                "run's unlearns, then mean ± std over seeds; balanced accuracy of the forgotten task on its "
                "probe set and on its kept member sample against the reference; attempts = 1 + the extra "
                "burn-ins the server ran until verified; MIA p-value under the permutation null, where known):",
                "",
                _table(["configuration", *[title for _, title in VERIFY_COLUMNS]], vrows),
                "",
            ]
        if bench_key in plots:
            out += [f"![{benchmark.title}: accuracy of every task across the sequence]({plots[bench_key]})", ""]
        out += [
            "Per seed (RA / FA / mean spill / mean relapse / unlearn s ÷ learn s / verified % / attempts / MIA p):",
            "",
        ]
        detail = []
        for variant_key, runs in by_variant.items():
            cells = []
            for run in runs:
                s = per_seed(run)
                checked = (
                    f" / {s['verified']:.0f} / {s['forget_attempts']:.2f} / {s['mia_p']:.2f}"
                    if math.isfinite(s["verified"])
                    else ""
                )
                cells.append(
                    f"s{run.seed}: {s['ra']:.1f} / {s['fa']:.1f} / {s['spill']:.2f} / {s['relapse']:.2f} / "
                    f"{100 * s['time_ratio']:.0f}%{checked}"
                )
            detail.append([labels[variant_key], "; ".join(cells)])
        out += [_table(["configuration", "per seed"], detail), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repro_uncle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs, uncle and finetune only")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per Learn (default 5; --quick 2)")
    parser.add_argument("--benchmarks", default="permuted,split", help="permuted,split")
    parser.add_argument("--width", type=int, default=100, help="mlp hidden width (default 100; 0 = server default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --raw, run only the others")
    parser.add_argument("--render-only", action="store_true", help="write the report from --raw without running")
    parser.add_argument(
        "--variants", default=",".join(v.key for v in VARIANTS), help="comma-separated configurations to run"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra uncle option (model.options.KEY), applied to every uncle configuration; repeatable",
    )
    parser.add_argument("--tag", default="", help="suffix of configuration names in the report (with --set)")
    parser.add_argument("--no-doc", action="store_true", help="print the report instead of writing docs/")
    parser.add_argument("--raw", type=Path, default=RAW, help="where to write the raw JSON results")
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.epochs_given = args.epochs is not None
    if args.quick:
        args.seeds = "0"
        if "--variants" not in (argv or sys.argv):
            args.variants = "uncle,finetune"
    args.epochs = args.epochs if args.epochs is not None else (2 if args.quick else 5)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS] + [
        v for v in args.variants if v not in {x.key for x in VARIANTS}
    ]
    if unknown:
        parser.error(f"unknown benchmark or configuration: {', '.join(unknown)}")
    return args


def _option(item: str) -> tuple[str, Any]:
    key, _, text = item.partition("=")
    value: Any
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip(), value


def _save(path: Path, args: argparse.Namespace, runs: Sequence[RunResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("raw", "resume", "render_only")}
    path.write_text(json.dumps({"args": settings, "runs": [asdict(r) for r in runs]}, indent=1, default=str))


def _load(path: Path) -> list[RunResult]:
    if not path.exists():
        return []
    return [RunResult(**run) for run in json.loads(path.read_text())["runs"]]


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction; write the report, plots and raw results. Returns 0."""
    args = parse_args(argv)
    extra = dict(_option(item) for item in args.set)
    variants = [v for v in VARIANTS if v.key in args.variants]
    labels = {v.key: v.label + (f" [{args.tag}]" if args.tag and v.strategy == "uncle" else "") for v in variants}
    started = time.perf_counter()
    runs = _load(args.raw) if (args.resume or args.render_only) else []
    done = {(r.benchmark, r.variant, r.seed) for r in runs}
    if not args.render_only:
        # Seed-major order: an interrupted run still has every configuration at the first seeds.
        for seed in args.seeds:
            for bench_key in args.benchmarks:
                for variant in variants:
                    if (bench_key, variant.key, seed) in done:
                        continue
                    run = run_sequence(
                        BENCHMARKS[bench_key], variant, seed, args.epochs, extra, width=args.width, threads=args.threads
                    )
                    s = per_seed(run)
                    print(
                        f"[{time.perf_counter() - started:6.0f}s] {bench_key:8s} {variant.key:18s} seed {seed}: "
                        f"RA {s['ra']:.1f} FA {s['fa']:.1f} spill {s['spill']:.2f} relapse {s['relapse']:.2f} "
                        f"MIA {s['mia']:.1f} (p {s['mia_p']:.2f}) verified {s['verified']:.0f}% "
                        f"attempts {s['forget_attempts']:.2f} forget BA {s['forget_ba']:.1f}/"
                        f"{s['forget_ba_members']:.1f} vs {s['forget_reference']:.1f} "
                        f"unlearn {s['unlearn_s']:.2f}s learn {s['learn_s']:.2f}s "
                        f"({run.wall_seconds:.0f}s)",
                        flush=True,
                    )
                    runs.append(run)
                    _save(args.raw, args, runs)
    results: dict[str, dict[str, list[RunResult]]] = {}
    for bench_key in args.benchmarks:
        for variant in variants:
            chosen = [r for r in runs if r.benchmark == bench_key and r.variant == variant.key and r.seed in args.seeds]
            if chosen:
                results.setdefault(bench_key, {})[variant.key] = sorted(chosen, key=lambda r: r.seed)
    elapsed = sum(r.wall_seconds for by in results.values() for rs in by.values() for r in rs)
    plots: dict[str, str] = {}
    if not args.no_doc:
        for bench_key, by_variant in results.items():
            shown = [by_variant[k][0] for k in ("uncle", "finetune") if k in by_variant]
            if shown:
                suffix = f"-{args.tag}" if args.tag else ""
                name = f"uncle-{'permuted' if bench_key == 'permuted' else 'split'}-digits{suffix}.png"
                plot_sequence(shown, BENCHMARKS[bench_key].title, IMG / name)
                plots[bench_key] = f"img/{name}"
    text = render(results, labels, args, elapsed, plots)
    if args.no_doc:
        print(text)
    else:
        write_section(DOC, f"{SECTION}-{args.tag}" if args.tag else SECTION, text, title=TITLE)
        print(f"wrote {DOC.relative_to(ROOT)} and {', '.join(plots.values())}; raw results in {args.raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
