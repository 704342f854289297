"""Timing and repetition: stopwatches, interleaved repetitions, client threads, medians and ratios.

Every benchmark measures Lethe and its baseline *in the same run*, interleaved repetition by
repetition (baseline, Lethe, baseline, Lethe, ...), so that a burst of load from other processes
hits both sides alike. Results are medians; the ratio of a row is the median of the per-repetition
ratios (Lethe / baseline of the same repetition), which cancels slow drifts of the machine's load.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Summary:
    """Median and range of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarize ``values`` (at least one)."""
        if not values:
            raise ValueError("nothing to summarize: no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, digits: int = 1) -> str:
        """``median`` alone for one measurement, else ``median (low–high)``."""
        if self.count == 1:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} ({self.low:,.{digits}f}–{self.high:,.{digits}f})"


@dataclass(frozen=True)
class Comparison:
    """One row of a results table: Lethe against its baseline on the same workload.

    Attributes:
        case: what was measured (workload and variant), as shown in the table.
        unit: unit of both values, e.g. ``"MB/s"``.
        baseline_name: what the baseline is, e.g. ``"bare gRPC echo"``.
        baseline: the baseline's measurements.
        lethe: Lethe's measurements.
        ratio: per-repetition ratios Lethe / baseline.
        goal: the smallest acceptable ratio, or None when the row is informative only.
    """

    case: str
    unit: str
    baseline_name: str
    baseline: Summary
    lethe: Summary
    ratio: Summary
    goal: float | None = None

    @property
    def meets_goal(self) -> bool | None:
        """Whether the median ratio reaches the goal (None without a goal)."""
        return None if self.goal is None else self.ratio.median >= self.goal


def compare(
    case: str,
    unit: str,
    baseline_name: str,
    baseline: Sequence[float],
    lethe: Sequence[float],
    goal: float | None = None,
) -> Comparison:
    """Build a :class:`Comparison` from paired measurements (repetition i of each side ran back to back)."""
    if len(baseline) != len(lethe):
        raise ValueError(f"paired measurements differ in length: {len(baseline)} and {len(lethe)}")
    ratios = [b and x / b for b, x in zip(baseline, lethe, strict=True)]
    return Comparison(case, unit, baseline_name, Summary.of(baseline), Summary.of(lethe), Summary.of(ratios), goal)


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started


def interleaved(
    variants: Mapping[str, Callable[[], float]],
    repeats: int,
    *,
    warmup: bool = True,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Measure every variant ``repeats`` times, interleaved: v1, v2, ..., v1, v2, ...

    Args:
        variants: name → a measurement (returns one number, e.g. a rate or seconds), in run order.
        repeats: measurements of each variant.
        warmup: run every variant once first and discard it (connections, allocators, first calls).
        log: called after each repetition with its index (from 1) and what each variant measured.

    Returns:
        name → its ``repeats`` measurements, in order.
    """
    if warmup:
        for measure in variants.values():
            measure()
    measured: dict[str, list[float]] = {name: [] for name in variants}
    for repetition in range(1, repeats + 1):
        this: dict[str, float] = {}
        for name, measure in variants.items():
            this[name] = measure()
            measured[name].append(this[name])
        if log is not None:
            log(repetition, this)
    return measured


class ClientThreads:
    """Long-lived client threads that run a measurement body concurrently.

    The same threads serve every measurement, for the baseline as for gRPC: a fresh thread would
    start a fresh OpenMP team in torch on its first call, which a server's pool threads do not pay.
    """

    def __init__(self, size: int) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="bench-client")
        self.size = size

    def run(self, body: Callable[[float], int], threads: int, seconds: float) -> float:
        """Run ``body(deadline)`` (returns items handled) on ``threads`` threads at once; return items/s.

        All threads start at one barrier; the time runs from the barrier to the end of the last one.
        """
        if threads > self.size:
            raise ValueError(f"{threads} threads requested, the pool has {self.size}")
        barrier = threading.Barrier(threads + 1)

        def start() -> int:
            barrier.wait()
            return body(time.perf_counter() + seconds)

        running = [self._pool.submit(start) for _ in range(threads)]
        barrier.wait()
        started = time.perf_counter()
        items = sum(f.result() for f in running)
        return items / (time.perf_counter() - started)

    def throughput(self, call: Callable[[], int], threads: int, seconds: float) -> float:
        """Items per second of ``call`` (returns the items it handled) looped on ``threads`` threads."""

        def body(deadline: float) -> int:
            items = 0
            while time.perf_counter() < deadline:
                items += call()
            return items

        return self.run(body, threads, seconds)

    def close(self) -> None:
        """Stop the threads."""
        self._pool.shutdown()

    def __enter__(self) -> ClientThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_usage(servers: Iterable[int]) -> dict[str, float]:
    """CPU seconds so far: the ``servers`` processes' (pids) together, this process's, the machine's busy and wall.

    Linux ``/proc``; read by the client right around its timed window, so start-up and warm-up stay out.
    """
    tick = os.sysconf("SC_CLK_TCK")
    server = 0.0
    for pid in servers:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        server += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle, iowait
    own = os.times()
    return {
        "server_cpu": server,
        "client_cpu": own.user + own.system,
        "busy_cpu": (sum(jiffies) - idle) / tick,
        "wall": own.elapsed,
    }
