"""Reproduction of LURE (Learn, Unlearn and RElearn) on the digits, through the gRPC API.

``python -m benchmarks.repro_lure [--quick] [--seeds 0,1,2,3,4] [--noisy-seeds ...] [--epochs E]``

The sklearn digits play the ALMA stream of the paper: a fixed, stratified 20% test split, and the
other 80% cut into 8 stratified mega-batches (a new random partition per seed). Every mega-batch is
one Learn of a fresh in-process server (one server per configuration, run one after the other);
after each Learn the test set is predicted with ``Predict(task=None)``. Reported, as in the paper's
Table 1:

* **test accuracy** after the last mega-batch (%);
* **CER**, the paper's Eq. (4): Σ over the mega-batches i of Σ over the held-out test samples j of
  1(f_θ^i(x_j) ≠ y_j) -- the number of misclassified test samples after each mega-batch, summed
  over the stream (a count, not a rate, as in the paper; here out of 8 × |test|);
* **generalization gap** = train accuracy − validation accuracy of each mega-batch (the server's
  learn-job metric ``generalization_gap``, percentage points), averaged over the 8 mega-batches.

Compared: resets ``lure``, ``warm-start`` (the paper's BL), ``shrink-perturb`` (S&P) and ``llf``,
each with full replay, buffered replay and no replay, over several seeds, with clean labels and
with 20% of the training labels flipped uniformly to another class (test labels clean).

Then, on one stream (lure, full replay): exact against approximate unlearning of one mega-batch
(forget accuracy before/after, MIA, cost), and the check that exact unlearning equals retraining:
the Predict logits of the exact-unlearned server against those of a fresh server that never saw the
mega-batch.

Results go to ``<out>/results.json``; the plot to ``docs/img/lure-digits.png`` and the tables into
the ``repro-lure`` section of ``docs/reproduction-lure.md`` (full runs only; ``--quick`` writes under ``var/``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import ROOT, machine_summary, write_section
from benchmarks.servers import scratch_lethe_server
from client import LetheClient, pb
from client.datasets import load_digits

DOC = ROOT / "docs" / "reproduction-lure.md"
PLOT = ROOT / "docs" / "img" / "lure-digits.png"

RESETS: tuple[str, ...] = ("lure", "warm-start", "shrink-perturb", "llf")
#: Display names as in the paper's tables.
LABELS = {"lure": "LURE", "warm-start": "BL (warm-start)", "shrink-perturb": "S&P", "llf": "LLF"}
#: Buffered replay keeps this many samples of each mega-batch (about 20% of a digits mega-batch).
BUFFER = 32
REPLAYS: tuple[str, ...] = ("full", f"buffer:{BUFFER}", "none")
MEGABATCHES = 8
TEST_FRACTION = 0.2
NOISE = 0.2
#: The mega-batch forgotten in the unlearning experiment (0-based: the third of eight).
FORGET = 2

#: Paper, Table 1 (ResNet18, |S_B| = 8, full replay): test accuracy, CER, generalization gap.
PAPER_TABLE1 = {
    "CIFAR10": {
        "warm-start": (89.47, 11760, 8.98),
        "llf": (91.43, 10103, 7.22),
        "shrink-perturb": (91.76, 10206, 7.72),
        "lure": (93.32, 9622, 6.60),
    },
    "CIFAR100": {
        "warm-start": (62.96, 39010, 31.54),
        "llf": (67.04, 34575, 21.23),
        "shrink-perturb": (64.48, 36303, 28.58),
        "lure": (69.60, 33037, 22.37),
    },
}

#: The section of ``DOC`` this module writes (``benchmarks.bench_lure`` writes ``lure``), see
#: :func:`benchmarks.report.write_section`.
SECTION = "repro-lure"
TITLE = "# Reproduction: LURE"


@dataclass(frozen=True)
class Settings:
    """The knobs of one reproduction run (the same for every configuration of the grid).

    Attributes:
        backbone: server backbone.
        width: hidden width of the mlp.
        epochs: epochs per mega-batch.
        batch_size: SGD batch size.
        learning_rate: initial learning rate (step schedule at 40% and 80% of the epochs).
        holdout_fraction: share of each Learn kept by the server as probe set (never trained on).
        torch_threads: intra-op threads of the in-process server.
    """

    backbone: str = "mlp"
    width: int = 64
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.1
    holdout_fraction: float = 0.1
    torch_threads: int = 1


@dataclass
class Stream:
    """A digits stream: mega-batches of training data and the fixed test set."""

    inputs: list[np.ndarray]
    labels: list[np.ndarray]
    test_inputs: np.ndarray
    test_labels: np.ndarray


@dataclass
class RunResult:
    """One configuration on one seed.

    Attributes:
        reset, replay, seed, noise: the configuration.
        accuracy: test accuracy (%) after each mega-batch.
        errors: misclassified test samples after each mega-batch.
        gaps: the learn jobs' generalization gaps (pp).
        importance_seconds, train_seconds: per learn job, from the job metrics.
        seconds: wall time of the whole run (server start to stop).
    """

    reset: str
    replay: str
    seed: int
    noise: float
    accuracy: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    importance_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cer(self) -> int:
        """The paper's CER: misclassified test samples summed over the mega-batches."""
        return int(sum(self.errors))

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last mega-batch (%)."""
        return self.accuracy[-1]

    @property
    def mean_gap(self) -> float:
        """Generalization gap averaged over the mega-batches (pp)."""
        return float(np.mean(self.gaps))


# ----------------------------------------------------------------------------- data


def stratified_indices(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut ``range(len(labels))`` into ``parts`` random parts with (almost) equal class counts.

    Samples of each class are shuffled and dealt in turn to the parts, one class after another, so
    every part gets ``⌊n_c / parts⌋`` or one more sample of class c and the part sizes differ by at
    most one.
    """
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [np.sort(order[k::parts]) for k in range(parts)]


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Copy of ``labels`` with ``round(fraction · n)`` of them moved uniformly to another class."""
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return noisy


def make_stream(seed: int, noise: float = 0.0, megabatches: int = MEGABATCHES) -> Stream:
    """The digits stream of ``seed``: a fixed stratified test set, a per-seed stratified partition.

    Args:
        seed: seed of the partition into mega-batches and of the label noise.
        noise: share of training labels flipped to another class (test labels stay clean).
        megabatches: number of mega-batches.
    """
    digits = load_digits()
    x, y = digits.inputs.astype(np.float32), digits.labels
    # One of five stratified parts: a fixed 20% test set, the same for every seed.
    test = stratified_indices(y, round(1 / TEST_FRACTION), np.random.default_rng(12345))[0]
    train = np.setdiff1d(np.arange(len(y)), test)
    rng = np.random.default_rng([seed, 7])
    parts = stratified_indices(y[train], megabatches, rng)
    labels = y[train]
    if noise > 0:
        labels = flip_labels(labels, noise, len(digits.classes), np.random.default_rng([seed, 11]))
    return Stream(
        inputs=[x[train][p] for p in parts],
        labels=[labels[p] for p in parts],
        test_inputs=x[test],
        test_labels=y[test],
    )


# ----------------------------------------------------------------------------- servers


def server_overrides(settings: Settings, reset: str, replay: str, seed: int) -> dict[str, Any]:
    """Dotted-key configuration of one lure server."""
    return {
        "model.strategy": "lure",
        "model.backbone": settings.backbone,
        "model.width": settings.width,
        "model.seed": seed,
        "model.torch_threads": settings.torch_threads,
        "model.options.replay": replay,
        "model.options.reset": reset,
        "training.epochs": settings.epochs,
        "training.batch_size": settings.batch_size,
        "training.learning_rate": settings.learning_rate,
        "training.holdout_fraction": settings.holdout_fraction,
    }


@contextmanager
def serve(settings: Settings, reset: str, replay: str, seed: int) -> Iterator[LetheClient]:
    """A fresh ``lethe serve`` of lure in a subprocess with its own data directory and SQLite database.

    Yields:
        A :class:`LetheClient` connected to it; the server and its files are gone afterwards.
    """
    with scratch_lethe_server(server_overrides(settings, reset, replay, seed), prefix="lethe-repro-lure-") as server:
        yield server.client


def test_errors(client: LetheClient, stream: Stream) -> tuple[int, np.ndarray]:
    """Misclassified test samples and the test logits, through ``Predict(task=None)``."""
    prediction = client.predict(None, stream.test_inputs)
    return int(np.sum(prediction.classes != stream.test_labels)), prediction.outputs


def learn(client: LetheClient, name: str, inputs: np.ndarray, labels: np.ndarray) -> pb.Job:
    """One Learn of a mega-batch, waited for."""
    return client.wait(client.learn(name, inputs, labels).id)


def run_stream(settings: Settings, reset: str, replay: str, seed: int, noise: float) -> RunResult:
    """Learn the 8 mega-batches of ``seed`` in a fresh server, evaluating the test set after each."""
    stream = make_stream(seed, noise)
    result = RunResult(reset, replay, seed, noise)
    started = time.perf_counter()
    with serve(settings, reset, replay, seed) as client:
        for i, (x, y) in enumerate(zip(stream.inputs, stream.labels, strict=True)):
            job = learn(client, f"mb{i}", x, y)
            errors, _ = test_errors(client, stream)
            result.errors.append(errors)
            result.accuracy.append(100.0 * (1 - errors / len(stream.test_labels)))
            result.gaps.append(float(job.metrics["generalization_gap"]))
            result.importance_seconds.append(float(job.metrics.get("importance_seconds", 0.0)))
            result.train_seconds.append(float(job.metrics["train_seconds"]))
    result.seconds = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------- unlearning


def forget_accuracy(client: LetheClient, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy (%) of the served model on ``inputs`` (the forgotten mega-batch as it was sent)."""
    prediction = client.predict(None, inputs)
    return float(100.0 * np.mean(prediction.classes == labels))


def unlearning_experiment(settings: Settings, seed: int = 0) -> dict[str, Any]:
    """Exact vs approximate unlearning of mega-batch ``FORGET``, and exact == retraining through the API.

    Four servers learn the same lure/full-replay stream: A unlearns ``mb{FORGET}`` exactly, B
    approximately; C is fresh and never receives ``mb{FORGET}``, but a Learn of it is queued and
    cancelled at its place in the stream so that the later jobs keep the queue positions (job
    ``seq``) they have in A; D is fresh and simply skips it. The Predict logits of A are compared
    with C's and D's.
    """
    stream = make_stream(seed)
    n_test = len(stream.test_labels)
    forget_x, forget_y = stream.inputs[FORGET], stream.labels[FORGET]
    out: dict[str, Any] = {"forget": f"mb{FORGET}", "seed": seed, "megabatches": MEGABATCHES}
    logits: dict[str, np.ndarray] = {}
    for method in ("exact", "approximate"):
        with serve(settings, "lure", "full", seed) as client:
            learn_seconds = 0.0
            for i, (x, y) in enumerate(zip(stream.inputs, stream.labels, strict=True)):
                job = learn(client, f"mb{i}", x, y)
                learn_seconds += float(job.metrics["learn_seconds"])
            before_forget = forget_accuracy(client, forget_x, forget_y)
            before_errors, _ = test_errors(client, stream)
            started = time.perf_counter()
            job = client.wait(client.unlearn(f"mb{FORGET}", reason="reproduction", method=method).id)
            wall = time.perf_counter() - started
            after_errors, logits[method] = test_errors(client, stream)
            out[method] = {
                "forget_accuracy_before": before_forget,
                "forget_accuracy_after": forget_accuracy(client, forget_x, forget_y),
                "probe_accuracy_after": float(job.metrics.get("forget_accuracy_task", math.nan)),
                "test_accuracy_before": 100.0 * (1 - before_errors / n_test),
                "test_accuracy_after": 100.0 * (1 - after_errors / n_test),
                "mia": float(job.metrics.get("mia", math.nan)),
                "uni": float(job.metrics.get("uni", math.nan)),
                "spill": float(job.metrics.get("spill", math.nan)),
                "unlearn_seconds": float(job.metrics["unlearn_seconds"]),
                "unlearn_wall_seconds": wall,
                "replayed_megabatches": float(job.metrics.get("replayed_megabatches", 0.0)),
                "stream_learn_seconds": learn_seconds,
            }
    for variant in ("aligned", "naive"):
        with serve(settings, "lure", "full", seed) as client:
            for i, (x, y) in enumerate(zip(stream.inputs, stream.labels, strict=True)):
                if i == FORGET:
                    continue
                if variant == "aligned" and i == FORGET - 1:
                    running = client.learn(f"mb{i}", x, y)
                    _take_queue_position(client, f"mb{FORGET}", forget_x, forget_y)
                    client.wait(running.id)
                else:
                    learn(client, f"mb{i}", x, y)
            _, logits[variant] = test_errors(client, stream)
            out[f"fresh_{variant}_learn_seqs"] = [
                int(j.seq) for j in client.jobs() if j.kind == pb.LEARN and j.state == pb.SUCCEEDED
            ]
    exact = logits["exact"]
    for variant in ("aligned", "naive"):
        other = logits[variant]
        out[f"retrain_{variant}"] = {
            "bit_identical": bool(np.array_equal(exact, other)),
            "max_abs_logit_difference": float(np.max(np.abs(exact - other))),
            "same_classes": float(np.mean(exact.argmax(1) == other.argmax(1))),
        }
    return out


def _take_queue_position(client: LetheClient, name: str, x: np.ndarray, y: np.ndarray) -> None:
    """Submit and cancel a Learn of ``name`` while the previous Learn runs: its data never reaches the model.

    Raises:
        RuntimeError: if the worker picked the job up before it could be cancelled (then the
            comparison would be wrong, so it is not made).
    """
    job = client.learn(name, x, y)
    cancelled = client.cancel(job.id)
    if cancelled.state != pb.CANCELLED:
        raise RuntimeError(f"could not cancel the placeholder learn of {name} (state {cancelled.state})")


# ----------------------------------------------------------------------------- reporting


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = float(statistics.fmean(values))
    return mean, float(statistics.stdev(values)) if len(values) > 1 else 0.0


def summarize(runs: Sequence[RunResult]) -> dict[tuple[float, str, str], dict[str, Any]]:
    """Mean and std over seeds of every (noise, replay, reset) cell."""
    cells: dict[tuple[float, str, str], list[RunResult]] = {}
    for run in runs:
        cells.setdefault((run.noise, run.replay, run.reset), []).append(run)
    summary: dict[tuple[float, str, str], dict[str, Any]] = {}
    for key, group in cells.items():
        summary[key] = {
            "seeds": len(group),
            "accuracy": _mean_std([r.final_accuracy for r in group]),
            "cer": _mean_std([float(r.cer) for r in group]),
            "gap": _mean_std([r.mean_gap for r in group]),
            "curve": np.mean([r.accuracy for r in group], axis=0).tolist(),
            "seconds": float(statistics.fmean(r.seconds for r in group)),
        }
    return summary


def _pm(pair: tuple[float, float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def results_tables(runs: Sequence[RunResult], n_test: int) -> str:
    """Markdown tables of the grid, one per noise level, the best mean of each column in bold."""
    summary = summarize(runs)
    lines: list[str] = []
    for noise in sorted({k[0] for k in summary}):
        seeds = sorted({r.seed for r in runs if r.noise == noise})
        lines += [
            "",
            f"**{'Clean labels' if noise == 0 else f'{noise:.0%} label noise'}** "
            f"({len(seeds)} seeds: {', '.join(map(str, seeds))}; CER out of {MEGABATCHES} × {n_test} test predictions)",
            "",
            "| Replay | Method | Test accuracy (%) ↑ | CER ↓ | Generalization gap (pp) ↓ |",
            "|---|---|---|---|---|",
        ]
        for replay in REPLAYS:
            cells = {reset: summary[(noise, replay, reset)] for reset in RESETS if (noise, replay, reset) in summary}
            if not cells:
                continue
            best_acc = max(c["accuracy"][0] for c in cells.values())
            best_cer = min(c["cer"][0] for c in cells.values())
            best_gap = min(c["gap"][0] for c in cells.values())
            for reset, cell in cells.items():
                acc, cer, gap = _pm(cell["accuracy"], 2), _pm(cell["cer"], 1), _pm(cell["gap"], 2)
                acc = f"**{acc}**" if cell["accuracy"][0] == best_acc else acc
                cer = f"**{cer}**" if cell["cer"][0] == best_cer else cer
                gap = f"**{gap}**" if cell["gap"][0] == best_gap else gap
                lines.append(f"| {replay} | {LABELS[reset]} | {acc} | {cer} | {gap} |")
    return "\n".join(lines)


def cer_verdict(runs: Sequence[RunResult]) -> str:
    """For every (noise, replay): which method has the lowest mean CER, and LURE's rank."""
    summary = summarize(runs)
    lines = [
        "",
        "| Labels | Replay | Lowest mean CER | LURE's rank (of 4) | LURE − best other (CER) |",
        "|---|---|---|---|---|",
    ]
    for noise in sorted({k[0] for k in summary}):
        for replay in REPLAYS:
            cells = {r: summary[(noise, replay, r)]["cer"][0] for r in RESETS if (noise, replay, r) in summary}
            if "lure" not in cells:
                continue
            ranked = sorted(cells, key=lambda r: cells[r])
            others = min(v for r, v in cells.items() if r != "lure")
            label = "clean" if noise == 0 else f"{noise:.0%} noise"
            lines.append(
                f"| {label} | {replay} | {LABELS[ranked[0]]} ({cells[ranked[0]]:.1f}) | "
                f"{ranked.index('lure') + 1} | {cells['lure'] - others:+.1f} |"
            )
    return "\n".join(lines)


def paired_cer(runs: Sequence[RunResult]) -> str:
    """LURE's CER minus each baseline's on the same seed (same partition, same noise): mean ± std, wins."""
    by_key = {(r.noise, r.replay, r.reset, r.seed): r.cer for r in runs}
    others = [reset for reset in RESETS if reset != "lure"]
    lines = [
        "",
        "| Labels | Replay | " + " | ".join(f"LURE − {LABELS[o]}" for o in others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    for noise in sorted({r.noise for r in runs}):
        for replay in REPLAYS:
            seeds = sorted({r.seed for r in runs if (r.noise, r.replay, r.reset) == (noise, replay, "lure")})
            cells = []
            for other in others:
                diffs = [
                    by_key[(noise, replay, "lure", s)] - by_key[(noise, replay, other, s)]
                    for s in seeds
                    if (noise, replay, other, s) in by_key
                ]
                if not diffs:
                    cells.append("—")
                    continue
                mean, std = _mean_std([float(d) for d in diffs])
                wins = sum(d < 0 for d in diffs)
                cells.append(f"{mean:+.1f} ± {std:.1f} (lower on {wins}/{len(diffs)})")
            label = "clean" if noise == 0 else f"{noise:.0%} noise"
            lines.append(f"| {label} | {replay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    """The paper's Table 1 (CIFAR rows), for side-by-side reading."""
    lines = [
        "",
        "| Dataset (paper, ResNet18) | Method | Test accuracy (%) | CER | Generalization gap |",
        "|---|---|---|---|---|",
    ]
    for dataset, rows in PAPER_TABLE1.items():
        for reset in ("warm-start", "llf", "shrink-perturb", "lure"):
            acc, cer, gap = rows[reset]
            lines.append(f"| {dataset} | {LABELS[reset]} | {acc:.2f} | {cer} | {gap:.2f} |")
    return "\n".join(lines)


def unlearning_table(result: dict[str, Any]) -> str:
    """Exact vs approximate unlearning side by side, and the retraining check."""
    ex, ap = result["exact"], result["approximate"]

    def row(name: str, key: str, digits: int = 1) -> str:
        return f"| {name} | {ex[key]:.{digits}f} | {ap[key]:.{digits}f} |"

    lines = [
        "",
        f"Forgotten: `{result['forget']}` of {result['megabatches']} (seed {result['seed']}, lure, full replay).",
        "",
        "| | exact | approximate |",
        "|---|---|---|",
        row("accuracy on the forgotten mega-batch before (%)", "forget_accuracy_before"),
        row("accuracy on the forgotten mega-batch after (%)", "forget_accuracy_after"),
        row("accuracy on its probe (held-out) samples after (%)", "probe_accuracy_after"),
        row("test accuracy before (%)", "test_accuracy_before"),
        row("test accuracy after (%)", "test_accuracy_after"),
        row("MIA after (%; ideal ≈ 50)", "mia"),
        row("spill (pp)", "spill"),
        row("unlearn time (s, job metric)", "unlearn_seconds", 2),
        row("mega-batches replayed", "replayed_megabatches", 0),
        row("time to learn the whole stream (s)", "stream_learn_seconds", 2),
        "",
        "| Exact-unlearned server vs a fresh server without the mega-batch "
        "| bit-identical logits | max abs difference | same class |",
        "|---|---|---|---|",
    ]
    for variant, text in (
        ("aligned", "fresh server, cancelled placeholder keeps the job seqs"),
        ("naive", "fresh server, later jobs shift one seq down"),
    ):
        r = result[f"retrain_{variant}"]
        lines.append(
            f"| {text} | {'yes' if r['bit_identical'] else 'no'} | {r['max_abs_logit_difference']:.3g} | "
            f"{100 * r['same_classes']:.1f}% |"
        )
    return "\n".join(lines)


def plot(runs: Sequence[RunResult], path: Path) -> None:
    """Test accuracy after each mega-batch per method (one panel per replay mode) and a CER bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    noises = sorted({k[0] for k in summary})
    colors = {"lure": "tab:red", "warm-start": "tab:gray", "shrink-perturb": "tab:blue", "llf": "tab:green"}
    fig = plt.figure(figsize=(14, 8.5))
    grid = fig.add_gridspec(2, len(REPLAYS))
    xs = np.arange(1, MEGABATCHES + 1)
    for col, replay in enumerate(REPLAYS):
        ax = fig.add_subplot(grid[0, col])
        for noise in noises:
            for reset in RESETS:
                cell = summary.get((noise, replay, reset))
                if cell is None:
                    continue
                ax.plot(
                    xs,
                    cell["curve"],
                    color=colors[reset],
                    linestyle="-" if noise == 0 else "--",
                    marker="o" if noise == 0 else "x",
                    markersize=3,
                    label=f"{LABELS[reset]}{'' if noise == 0 else f' ({noise:.0%} noise)'}",
                )
        ax.set_title(f"replay = {replay}")
        ax.set_xlabel("mega-batches learned")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    groups = [(noise, replay) for noise in noises for replay in REPLAYS]
    width = 0.8 / len(RESETS)
    for j, reset in enumerate(RESETS):
        means = [summary[(n, r, reset)]["cer"][0] if (n, r, reset) in summary else np.nan for n, r in groups]
        stds = [summary[(n, r, reset)]["cer"][1] if (n, r, reset) in summary else 0 for n, r in groups]
        ax.bar(
            np.arange(len(groups)) + (j - 1.5) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=colors[reset],
            label=LABELS[reset],
        )
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([f"{r}\n{'clean' if n == 0 else f'{n:.0%} noise'}" for n, r in groups])
    ax.set_ylabel("CER ↓ (test errors summed over the stream)")
    ax.set_title("Cumulative error (CER), mean ± std over seeds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("LURE on the digits stream (8 mega-batches, mlp, through the gRPC API)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(data: dict[str, Any]) -> str:
    """The generated Markdown block: settings, the grid's tables, the verdict, unlearning."""
    runs = [RunResult(**r) for r in data["runs"]]
    parts = [
        f"Settings: `{json.dumps(data['settings'])}`, buffered replay = `buffer:{BUFFER}`, "
        f"noisy grid epochs = {data['noisy_epochs']}; wall time {data['seconds'] / 60:.1f} min on "
        f"{data['machine']}.",
        results_tables(runs, data["n_test"]),
        "",
        "**Which method has the lowest CER** (mean over seeds):",
        cer_verdict(runs),
        "",
        "**Paired by seed** (LURE's CER minus the baseline's on the same partition; negative = LURE better):",
        paired_cer(runs),
        "",
        "**The paper's Table 1** (CIFAR, ResNet18, 8 mega-batches of 6,250 images, full replay; "
        "CER over a 10,000-image test set):",
        paper_table(),
    ]
    if "unlearning" in data:
        parts += ["", "**Exact vs approximate unlearning of one mega-batch**", unlearning_table(data["unlearning"])]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main


def _parse_seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction; return 0 on success.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repro_lure", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 8 epochs, results under var/ only")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the clean grid")
    parser.add_argument("--noisy-seeds", default=None, help="seeds of the 20%% label-noise grid (default: --seeds)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per mega-batch (default 20; quick 8)")
    parser.add_argument("--noisy-epochs", type=int, default=None, help="epochs for the noisy grid (default: --epochs)")
    parser.add_argument("--skip-grid", action="store_true", help="reuse the grid of an earlier results.json")
    parser.add_argument("--resume", action="store_true", help="keep the runs of results.json, run only missing ones")
    parser.add_argument("--skip-unlearning", action="store_true", help="leave out the unlearning experiment")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default var/repro-lure[-quick])")
    args = parser.parse_args(argv)

    seeds = _parse_seeds("0,1" if args.quick and args.seeds == "0,1,2,3,4" else args.seeds)
    noisy_seeds = seeds if args.noisy_seeds is None else _parse_seeds(args.noisy_seeds)
    epochs = args.epochs or (8 if args.quick else 20)
    settings = Settings(epochs=epochs)
    noisy = Settings(epochs=args.noisy_epochs or epochs)
    out = args.out or ROOT / "var" / ("repro-lure-quick" if args.quick else "repro-lure")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    data: dict[str, Any] = {
        "settings": asdict(settings),
        "noisy_epochs": noisy.epochs,
        "n_test": len(make_stream(0).test_labels),
        "machine": f"{machine_summary()}, torch threads {settings.torch_threads}",
        "runs": [],
        "seconds": 0.0,
    }
    if (args.skip_grid or args.resume) and results_path.exists():
        saved = json.loads(results_path.read_text())
        if args.resume and (saved["settings"], saved["noisy_epochs"]) != (data["settings"], data["noisy_epochs"]):
            raise SystemExit(f"--resume: {results_path} was made with other settings: {saved['settings']}")
        data = saved
    done_keys = {(r["noise"], r["replay"], r["reset"], r["seed"]) for r in data["runs"]}
    started = time.perf_counter()
    if not args.skip_grid:
        grid = [(0.0, s, settings) for s in seeds] + [(NOISE, s, noisy) for s in noisy_seeds]
        total = len(grid) * len(REPLAYS) * len(RESETS)
        done = 0
        for noise, seed, cfg in grid:
            for replay in REPLAYS:
                for reset in RESETS:
                    done += 1
                    if (noise, replay, reset, seed) in done_keys:
                        continue
                    run = run_stream(cfg, reset, replay, seed, noise)
                    data["runs"].append(asdict(run))
                    print(
                        f"[{done}/{total}] noise={noise:.1f} seed={seed} {replay:>9} {reset:<14} "
                        f"acc={run.final_accuracy:5.1f} CER={run.cer:4d} gap={run.mean_gap:5.2f} "
                        f"({run.seconds:.1f} s)",
                        flush=True,
                    )
                    results_path.write_text(json.dumps(data, indent=1))
        data["seconds"] = float(data.get("seconds", 0.0)) + time.perf_counter() - started
    if not args.skip_unlearning:
        data["unlearning"] = unlearning_experiment(settings)
        print(json.dumps(data["unlearning"], indent=1), flush=True)
    results_path.write_text(json.dumps(data, indent=1))

    text = report(data)
    print(text, flush=True)
    plot_path = out / "lure-digits.png" if args.quick or args.out else PLOT
    plot([RunResult(**r) for r in data["runs"]], plot_path)
    if not (args.quick or args.out):
        write_section(DOC, SECTION, text, title=TITLE)
    print(f"results: {results_path}; plot: {plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
