"""Scale of the hypernetwork server: memory, Predict latency and learn time at 10, 100 and 1,000 tasks.

The ``uncle`` strategy at its defaults (``mlp`` 2×256 on 8×8 digits: 85,002 generated parameters,
340 kB a network; hypernetwork 128-256-512; ``predict_cache_mb`` 512), engine level (no gRPC: a
Predict call's gRPC cost does not depend on the number of tasks; ``benchmarks/predict.py`` measures
it). Each count of tasks is measured in its own spawned process, so the process's resident memory
(``VmRSS``) belongs to that count alone:

1. the strategy is loaded with N tasks, then every task is predicted once (batch 64), which fills
   the cache of generated networks up to its budget (each of these is a miss: generation time);
2. **Predict p50 of a cached task**: the most recently predicted task, ``predict_calls`` times;
3. **RSS** after 1-2 (after ``malloc_trim``: memory in use, not freed heap glibc keeps; also
   before it), and its growth over the 10-task process: goal, bounded by the cache budget;
4. one **learn** of a new 2-class task (~360 samples, 1 epoch, batch 32: 12 steps): the median
   step (after the first, which includes building the target bank) and the whole operation's wall
   time, split into before the first step (target bank), the steps, and after the last step
   (closed-form refit of the output layer, commit).

The first ``tasks[0]`` tasks are learned for real (2-class digits pairs, 1 epoch); the others are
added to the saved state with embeddings drawn as a learn initializes them. Their networks are
what the hypernetwork generates for them, of the same size and cost as learned ones: learning
1,000 tasks for real takes hours on 2 cores, because every operation's time grows with the number
of tasks (measured here). One more process runs the largest count with ``small_budget_mb``, so the
cache evicts. Counts run in rounds (10, 100, 1,000, 10, ...) and ratios are taken within a round.
One torch thread per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import itertools
import multiprocessing
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.timing import Stopwatch, compare
from client.datasets import load_digits
from server.engine.protocol import LearnOptions, TaskData, no_progress

NAME = "scale"
#: The issue's goals (ratios to the smallest count), and the default cache budget.
PREDICT_RATIO_GOAL = 1.2
STEP_RATIO_GOAL = 1.5
DEFAULT_BUDGET_MB = 512.0
INPUT_SHAPE = (1, 8, 8)
#: Every learn: 1 epoch, batch 32, Adam 1e-3.
LEARN = LearnOptions(epochs=1, batch_size=32, learning_rate=1e-3, seed=0)


@dataclass(frozen=True)
class ScaleSettings:
    """The workload.

    Attributes:
        tasks: the task counts; the first is the baseline, and that many tasks are learned for real.
        rounds: processes per count (ratios are taken within a round).
        small_budget_mb: ``predict_cache_mb`` of the extra process at the largest count.
        predict_calls: timed Predict calls of a cached task.
        predict_batch: samples per Predict call.
    """

    tasks: tuple[int, ...] = (10, 100, 1000)
    rounds: int = 3
    small_budget_mb: float = 64.0
    predict_calls: int = 300
    predict_batch: int = 64


#: The smoke configuration: three processes.
QUICK = ScaleSettings(tasks=(2, 6), rounds=1, small_budget_mb=0.5, predict_calls=20)


def pair(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits of classes ``index % 5 * 2`` and the next one: inputs ``[n, 1, 8, 8]``, labels ``[n]``."""
    data = load_digits()
    inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    first = index % 5 * 2
    keep = ((labels == first) | (labels == first + 1)).nonzero().squeeze(1)
    return inputs[keep], labels[keep]


def _strategy(budget_mb: float) -> Any:
    from server.engine.uncle import build_uncle

    return build_uncle(
        backbone="mlp",
        input_shape=INPUT_SHAPE,
        num_classes=10,
        device=torch.device("cpu"),
        seed=0,
        predict_cache_mb=budget_mb,
    )


def learned_state(count: int) -> bytes:
    """The saved state (``torch.save`` bytes) of a strategy that learned ``count`` 2-class tasks."""
    torch.set_num_threads(1)
    strategy = _strategy(DEFAULT_BUDGET_MB)
    for index in range(count):
        strategy.learn(f"task{index}", TaskData(*pair(index)), LEARN, no_progress, {})
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    return buffer.getvalue()


def extended(state: dict[str, Any], count: int) -> dict[str, Any]:
    """``state`` with tasks added up to ``count``, embeddings drawn as a learn of them would start."""
    from server.engine.training import seeded_generator
    from server.engine.uncle.hypernetwork import init_task_embedding

    dim = state["embeddings"][0].numel()
    buffers = state["buffers"][0]
    for index in range(len(state["tasks"]), count):
        name = f"task{index}"
        state["embeddings"].append(init_task_embedding(dim, seeded_generator(0, index, "synthetic")))
        state["buffers"].append({key: value.clone() for key, value in buffers.items()})
        first = index % 5 * 2
        state["tasks"].append(
            {"name": name, "classes": [first, first + 1], "samples": 360, "unlearned": False, "method": ""}
        )
        state["slots"][name] = index
    return state


def _rss_mib(*, trim: bool) -> float:
    """This process's resident memory in MiB; with ``trim``, after handing glibc's free heap back (``malloc_trim``)."""
    gc.collect()
    if trim:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kib("VmRSS") / 1024


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(state_bytes: bytes, count: int, budget_mb: float, settings: ScaleSettings) -> dict[str, float]:
    """Everything measured at one count, in this process (see the module docstring)."""
    torch.set_num_threads(1)
    state = extended(torch.load(io.BytesIO(state_bytes), weights_only=True), count)
    strategy = _strategy(budget_mb)
    strategy.load_state_dict(state)
    del state
    loaded = _rss_mib(trim=True)
    x = torch.from_numpy(load_digits().inputs[: settings.predict_batch])
    predictor = strategy.predictor()
    misses = []
    for index in range(count):
        with Stopwatch() as watch:
            predictor.predict(f"task{index}", x)
        misses.append(watch.seconds)
    untrimmed = _rss_mib(trim=False)
    rss = _rss_mib(trim=True)
    cached = f"task{count - 1}"
    hits = []
    for _ in range(settings.predict_calls):
        with Stopwatch() as watch:
            predictor.predict(cached, x)
        hits.append(watch.seconds)
    stats = predictor.cache_stats()

    stamps: list[float] = []
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        stamps.append(time.perf_counter())

    strategy.learn("new", TaskData(*pair(count)), LEARN, progress, {})
    finished = time.perf_counter()
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    step = statistics.median(steps)  # the first step's own time is taken to be the median
    return {
        "rss_mib": rss,
        "untrimmed_rss_mib": untrimmed,
        "predicted_rss_mib": rss - loaded,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "cache_mib": stats.bytes / 2**20,
        "cache_entries": float(stats.entries),
        "evictions": float(stats.evictions),
        "miss_ms": 1000 * statistics.median(misses),
        "hit_ms": 1000 * statistics.median(hits),
        "step_ms": 1000 * step,
        "learn_s": finished - started,
        "bank_s": stamps[0] - started - step,
        "steps_s": stamps[-1] - stamps[0] + step,
        "refit_s": finished - stamps[-1],
    }


def _child(state_bytes: bytes, count: int, budget_mb: float, settings: ScaleSettings, connection: Connection) -> None:
    try:
        connection.send(measure(state_bytes, count, budget_mb, settings))
    except Exception as error:  # reported to the parent, which raises it
        connection.send(f"{type(error).__name__}: {error}")


def in_child(state_bytes: bytes, count: int, budget_mb: float, settings: ScaleSettings) -> dict[str, float]:
    """:func:`measure` in a spawned process of its own (its RSS holds this count only)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(state_bytes, count, budget_mb, settings, child), daemon=True)
    process.start()
    try:
        reply = parent.recv()
    finally:
        process.join(60)
    if isinstance(reply, str):
        raise RuntimeError(f"measuring {count} tasks failed: {reply}")
    return dict(reply)


def _median(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def run(options: RunOptions, settings: ScaleSettings | None = None) -> BenchmarkResult:
    """Measure every count in ``settings`` (or the quick or full defaults) and report ratios to the first."""
    settings = settings or (QUICK if options.quick else ScaleSettings())
    base, largest = settings.tasks[0], settings.tasks[-1]
    with Stopwatch() as total:
        options.log(f"scale: learning {base} tasks ...")
        state = learned_state(base)
        runs: dict[tuple[int, float], list[dict[str, float]]] = {}
        for round_ in range(settings.rounds):
            for count, budget in [(n, DEFAULT_BUDGET_MB) for n in settings.tasks] + [
                (largest, settings.small_budget_mb)
            ]:
                row = in_child(state, count, budget, settings)
                runs.setdefault((count, budget), []).append(row)
                options.log(f"scale: round {round_ + 1}, {count} tasks, cache {budget:g} MiB: {row}")
    return report(runs, settings, total.seconds)


def report(
    runs: Mapping[tuple[int, float], list[dict[str, float]]], settings: ScaleSettings, seconds: float
) -> BenchmarkResult:
    """The benchmark's tables from the measurements of every (count, budget)."""
    base, largest, small = settings.tasks[0], settings.tasks[-1], settings.small_budget_mb
    baseline = runs[(base, DEFAULT_BUDGET_MB)]
    label = f"{base:,} tasks"

    def column(count: int, budget: float, key: str) -> list[float]:
        return [row[key] for row in runs[(count, budget)]]

    comparisons = []
    for count, budget in [(n, DEFAULT_BUDGET_MB) for n in settings.tasks[1:]] + [(largest, small)]:
        where = f"{count:,} tasks" + ("" if budget == DEFAULT_BUDGET_MB else f", predict_cache_mb = {budget:g}")
        for case, unit, key in (
            ("process RSS in use after predicting every task", "MiB", "rss_mib"),
            (f"Predict p50, cached task, batch {settings.predict_batch}", "ms", "hit_ms"),
            ("learn step, median", "ms", "step_ms"),
            ("learn operation, wall time", "s", "learn_s"),
        ):
            comparisons.append(
                compare(f"{where}: {case}", unit, label, [r[key] for r in baseline], column(count, budget, key))
            )

    def growth(budget: float, key: str = "rss_mib") -> float:
        return statistics.median(b[key] - a[key] for a, b in zip(baseline, runs[(largest, budget)], strict=True))

    def ratio(key: str) -> float:
        return statistics.median(
            b[key] / a[key] for a, b in zip(baseline, runs[(largest, DEFAULT_BUDGET_MB)], strict=True)
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    goals = [
        [
            f"RSS growth {base:,} → {largest:,} tasks, predict_cache_mb = {budget:g}",
            f"{growth(budget):+,.1f} MiB in use ({growth(budget, 'untrimmed_rss_mib'):+,.1f} MiB untrimmed; "
            f"cache {_median(runs[(largest, budget)], 'cache_mib'):,.1f} MiB)",
            f"≤ {budget:g} MiB",
            verdict(growth(budget) <= budget),
        ]
        for budget in (DEFAULT_BUDGET_MB, small)
    ]
    goals += [
        [
            f"Predict p50 of a cached task, {largest:,} ÷ {base:,} tasks",
            f"{ratio('hit_ms'):.2f}",
            "≤ 1.2",
            verdict(ratio("hit_ms") <= PREDICT_RATIO_GOAL),
        ],
        [
            f"learn step, {largest:,} ÷ {base:,} tasks",
            f"{ratio('step_ms'):.2f}",
            "≤ 1.5",
            verdict(ratio("step_ms") <= STEP_RATIO_GOAL),
        ],
        [f"learn operation, {largest:,} ÷ {base:,} tasks", f"{ratio('learn_s'):.1f}", "—", ""],
    ]
    keys = [(n, DEFAULT_BUDGET_MB) for n in settings.tasks] + [(largest, small)]
    cache = [
        [
            f"{n:,}",
            f"{budget:g}",
            f"{_median(runs[(n, budget)], 'cache_entries'):,.0f}",
            f"{_median(runs[(n, budget)], 'cache_mib'):,.1f}",
            f"{_median(runs[(n, budget)], 'evictions'):,.0f}",
            f"{_median(runs[(n, budget)], 'miss_ms'):.2f}",
            f"{_median(runs[(n, budget)], 'hit_ms'):.3f}",
            f"{_median(runs[(n, budget)], 'predicted_rss_mib'):+,.1f}",
            f"{_median(runs[(n, budget)], 'rss_mib'):,.1f}",
            f"{_median(runs[(n, budget)], 'untrimmed_rss_mib'):,.1f}",
            f"{_median(runs[(n, budget)], 'peak_rss_mib'):,.1f}",
        ]
        for n, budget in keys
    ]
    learn = [
        [
            f"{n:,}",
            f"{_median(runs[(n, DEFAULT_BUDGET_MB)], 'bank_s'):.2f}",
            f"{_median(runs[(n, DEFAULT_BUDGET_MB)], 'steps_s'):.2f}",
            f"{_median(runs[(n, DEFAULT_BUDGET_MB)], 'refit_s'):.2f}",
            f"{_median(runs[(n, DEFAULT_BUDGET_MB)], 'learn_s'):.2f}",
            f"{1000 * _median(runs[(n, DEFAULT_BUDGET_MB)], 'refit_s') / n:.1f}",
        ]
        for n in settings.tasks
    ]
    return BenchmarkResult(
        name=NAME,
        title="Scale: uncle at 10, 100 and 1,000 tasks",
        comparisons=comparisons,
        tables=[
            ("Goals", ["quantity", "measured", "goal", ""], goals),
            (
                "Cache of generated networks, after predicting every task once (medians)",
                [
                    "tasks",
                    "predict_cache_mb",
                    "cached networks",
                    "cached MiB",
                    "evictions",
                    "miss p50 (ms)",
                    "hit p50 (ms)",
                    "RSS added by predicting (MiB)",
                    "RSS in use (MiB)",
                    "RSS untrimmed (MiB)",
                    "peak RSS (MiB)",
                ],
                cache,
            ),
            (
                "Where a learn operation's time goes (seconds, medians)",
                [
                    "tasks",
                    "before the first step (target bank)",
                    "the steps",
                    "after the last step (refit, commit)",
                    "whole learn",
                    "refit ms per task",
                ],
                learn,
            ),
        ],
        settings={
            "strategy": "uncle, default options (predict_cache_mb = 512)",
            "backbone": "mlp 2×256 on 1×8×8 digits, 85,002 generated parameters (340 kB)",
            "tasks": f"{', '.join(f'{n:,}' for n in settings.tasks)}; the first {base} learned, the rest added",
            "rounds": str(settings.rounds),
            "learn": "2 digits classes (~360 samples), 1 epoch, batch 32",
            "Predict": f"engine level, batch {settings.predict_batch}, {settings.predict_calls} calls",
            "torch threads": "1",
        },
        notes=[
            f"Ratios are to the same round's {base:,}-task process. RSS is VmRSS of the process after every task "
            "was predicted once: 'in use' after glibc's free heap was handed back (malloc_trim), 'untrimmed' "
            "before; 'added by predicting' is in-use RSS after predicting minus before, in the same process; "
            "peak RSS is VmHWM at the end (after the learn). Most of the RSS is the "
            "interpreter with torch and the server's libraries, the same at every count.",
        ],
        seconds=seconds,
    )
