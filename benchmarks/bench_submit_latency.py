"""Learn submission latency while an unlearn's evaluation runs, against the same submissions on an idle server.

A real ``python -m server`` runs as a fresh process at the server's defaults (strategy ``uncle``, digits
``[1,8,8]``, 10 classes, SQLite in a scratch directory, ``--no-auth``, port 0), except
``training.max_probe_samples``, raised so that the evaluation an unlearn runs at its end takes seconds
(see :class:`SubmitSettings`). It first learns ``tasks`` large tasks: two digits classes each, the
~360 samples repeated with a little noise up to ``2 × probe_samples``, held out at 0.5, so each task
keeps ``probe_samples`` probe samples and as many member samples. The members and the probe set of an
unlearned task feed the membership-inference attack (MIA) with its 200-permutation null, whose time
grows linearly with them (about 0.5 ms a member on one core); every task's probe set is evaluated
after every job.

Then, interleaved, ``unlearns`` repetitions of:

- **idle**: with no job running, ``idle_submissions / unlearns`` small Learn streams (``tiny_samples``
  digits, a new task name each, one epoch). The worker claims such a job within milliseconds, before
  any client's CancelJob arrives, so each one is cancelled if it can be and otherwise waited for (it
  is learned), and the next call starts on an idle server after a short pause;
- **busy**: an Unlearn of the next large task; while it runs, small Learn streams back to back, each
  job cancelled by a second thread (it is queued behind the unlearn, so the cancel succeeds; a
  cancel made by the submitting thread itself would take the blocking in place of a Learn), until
  the unlearn ends.

Measured: the wall time of :meth:`LetheClient.learn`, from its first message to the returned Job. A
third thread polls ``GetJob`` every ``poll_seconds`` on its own channel, in both phases (idle: a
finished job): its replies give the unlearn's windows, and its own latency.

- **RUNNING window**: from the job's ``started_at`` to the first poll that returns it SUCCEEDED;
- **evaluation/commit phase**: from the last poll before the job's progress reached its final value
  (the strategy's last step: uncle reports 1.0 after its burn-in and refit) to the end. In it: the
  forgetting check, the checkpoint, the evaluation of every task, the MIA, the SQL transaction;
- **strategy phase**: the rest of the RUNNING window (burn-in, and further forgetting attempts).

A call counts for a window when it overlaps it. The goal (issue 13): p99 during the
evaluation/commit phase ≤ 2 × idle p99.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.report import BenchmarkResult, RunOptions, machine_info, machine_summary, now_utc, result_markdown
from benchmarks.servers import lethe_server
from benchmarks.timing import Stopwatch, compare
from client import FailedPreconditionError, LetheClient, LetheError
from client.datasets import load_digits
from protos import lethe_pb2 as pb
from server.config import TrainingSection

NAME = "submit"
#: The issue's goal: Learn p99 during an unlearn's evaluation at most this many times the idle p99.
GOAL = 2.0
#: Standard deviation of the noise added to repeated digits (pixels are in [0, 1]).
NOISE = 0.05
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


@dataclass(frozen=True)
class SubmitSettings:
    """The workload.

    Attributes:
        tasks: large tasks learned before anything is measured.
        probe_samples: ``training.max_probe_samples`` of the server (default 1,000); each large task
            streams twice this many samples with ``holdout_fraction`` 0.5, so it keeps this many probe
            and member samples. The MIA of an unlearned task costs about 0.5 ms per member on one core.
        learn_epochs: epochs of each large task's Learn (its header); the server's default is 20.
        idle_submissions: measured idle Learn streams, spread evenly over the repetitions.
        unlearns: repetitions: each unlearns the next large task (at most ``tasks``).
        warmup: idle Learn streams before anything is measured (discarded).
        tiny_samples: samples of each measured Learn stream.
        poll_seconds: interval of the GetJob poller.
        idle_pause_seconds: pause before each idle call, once the previous call's job is over (the
            worker's work after a commit, e.g. deleting files, ends; the poller reads an idle server).
    """

    tasks: int = 8
    probe_samples: int = 4000
    learn_epochs: int = 1
    idle_submissions: int = 48
    unlearns: int = 4
    warmup: int = 5
    tiny_samples: int = 16
    poll_seconds: float = 0.025
    idle_pause_seconds: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.unlearns <= self.tasks:
            raise ValueError(f"unlearns must be in 1..tasks ({self.tasks}), got {self.unlearns}")
        if self.idle_submissions < self.unlearns:
            raise ValueError(f"idle_submissions must be >= unlearns ({self.unlearns}), got {self.idle_submissions}")
        if self.probe_samples < 1 or self.tiny_samples < 2:
            raise ValueError("probe_samples must be >= 1 and tiny_samples >= 2")


FULL = SubmitSettings()
#: The smoke configuration: numbers mean nothing.
QUICK = SubmitSettings(tasks=2, probe_samples=200, idle_submissions=4, unlearns=1, warmup=1)


@dataclass(frozen=True)
class Submission:
    """One measured Learn call: ``started`` on the wall clock (``time.time()``), ``seconds`` it took."""

    started: float
    seconds: float

    @property
    def ended(self) -> float:
        """When the call returned, on the wall clock."""
        return self.started + self.seconds

    def overlaps(self, window: tuple[float, float]) -> bool:
        """Whether the call was in progress at some time inside ``window`` (wall clock)."""
        return self.ended > window[0] and self.started < window[1]


@dataclass(frozen=True)
class Poll:
    """One GetJob reply: when it was sent and received (wall clock) and what it said."""

    sent: float
    received: float
    state: int
    progress: float
    message: str

    @property
    def seconds(self) -> float:
        """The call's latency."""
        return self.received - self.sent


class Poller:
    """Calls GetJob for one job every ``interval`` seconds in a thread, on its own channel; keeps every reply.

    Stops on :meth:`stop` or, with ``until_terminal``, by itself once the job has ended (``finished``
    is set then).
    """

    def __init__(self, target: str, job_id: str, interval: float, *, until_terminal: bool) -> None:
        self.job_id = job_id
        self.interval = interval
        self.until_terminal = until_terminal
        self.polls: list[Poll] = []
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._client = LetheClient(target, retries=1, timeout=120)
        self._thread = threading.Thread(target=self._run, name="getjob-poller", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> Poller:
        """Start polling; returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                sent = time.time()
                job = self._client.job(self.job_id)
                self.polls.append(Poll(sent, time.time(), job.state, job.progress, job.message))
                if self.until_terminal and job.state in TERMINAL:
                    break
                self._stop.wait(self.interval)
        except BaseException as error:  # re-raised by stop()
            self._error = error
        finally:
            self.finished.set()

    def stop(self) -> list[Poll]:
        """Stop, close the channel and return the replies.

        Raises:
            RuntimeError: when a GetJob call failed.
        """
        self._stop.set()
        self._thread.join(180)
        self._client.close()
        if self._error is not None:
            raise RuntimeError(f"GetJob poller failed: {self._error}") from self._error
        return self.polls


@dataclass(frozen=True)
class UnlearnRun:
    """One busy repetition: the unlearn's windows, the submissions made meanwhile and the poller's replies.

    Attributes:
        task: the unlearned task.
        running: (start, end) of the RUNNING window, wall clock.
        evaluation: (start, end) of the evaluation/commit phase, wall clock.
        submissions: every Learn call made while waiting for the unlearn (some may fall outside it).
        polls: the poller's replies.
        metrics: the finished job's metrics.
    """

    task: str
    running: tuple[float, float]
    evaluation: tuple[float, float]
    submissions: list[Submission]
    polls: list[Poll]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def strategy(self) -> tuple[float, float]:
        """(start, end) of the strategy phase: the RUNNING window before the evaluation/commit phase."""
        return self.running[0], self.evaluation[0]

    def in_evaluation(self) -> list[Submission]:
        """Submissions overlapping the evaluation/commit phase."""
        return [s for s in self.submissions if s.overlaps(self.evaluation)]

    def in_running(self) -> list[Submission]:
        """Submissions overlapping the RUNNING window."""
        return [s for s in self.submissions if s.overlaps(self.running)]

    def in_strategy_only(self) -> list[Submission]:
        """Submissions overlapping the RUNNING window but not the evaluation/commit phase."""
        return [s for s in self.in_running() if not s.overlaps(self.evaluation)]


def windows(started_at: float, polls: Sequence[Poll]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The RUNNING window and the evaluation/commit phase of a finished job from its poller's replies.

    The phase starts at the reply before the first one that showed the job's final progress value
    (the progress was set between the two; the strategy's last step), or at ``started_at`` when no
    RUNNING reply showed another value; both end when the first terminal reply returned.

    Args:
        started_at: the job's ``started_at`` (wall clock, seconds).
        polls: the replies, oldest first, the last one terminal.

    Raises:
        ValueError: when no reply is terminal.
    """
    terminal = next((i for i, p in enumerate(polls) if p.state in TERMINAL), None)
    if terminal is None:
        raise ValueError("the poller never saw the job end")
    end = polls[terminal].received
    running = [p for p in polls[:terminal] if p.state == pb.RUNNING]
    start = started_at
    if running:
        final = running[-1].progress
        first = len(running) - 1
        while first > 0 and running[first - 1].progress == final:
            first -= 1
        if first > 0:
            start = max(started_at, running[first - 1].received)
    return (started_at, end), (min(start, end), end)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(values, q)) if values else math.nan


def digits_task(index: int, samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two digits classes (by ``index``), drawn with replacement to ``samples`` samples, plus noise.

    Returns inputs ``[samples, 1, 8, 8]`` float32 in [0, 1] and int64 labels ``[samples]``.
    """
    first = 2 * index % 10
    data = load_digits().select([first, first + 1])
    rng = np.random.default_rng([seed, index])
    pick = rng.integers(0, len(data.labels), samples)
    noise = rng.normal(0.0, NOISE, size=(samples, *data.inputs.shape[1:])).astype(np.float32)
    return np.clip(data.inputs[pick] + noise, 0.0, 1.0), data.labels[pick]


def settle(client: LetheClient, job: pb.Job) -> None:
    """Leave no work behind an idle Learn: cancel its job, and wait for it if it is not over.

    On an idle server the worker claims the job within milliseconds, before any client's CancelJob
    arrives: CancelJob refuses it (today) or cancels the running job (once running jobs can be
    cancelled). Either way the next call starts on an idle server.
    """
    with contextlib.suppress(FailedPreconditionError):  # already over
        job = client.cancel(job.id)
    if job.state not in TERMINAL:
        client.wait(job.id, timeout=600, check=False)


class Canceller:
    """Cancels the jobs handed to it from a thread of its own, on its own channel.

    During an unlearn the submitting thread makes Learn calls only, back to back: were it to cancel
    each job itself, a transaction that starts during its CancelJob would block that call instead
    of a Learn, and the Learn would miss it. Jobs not over after their cancel (the worker claimed
    them once the unlearn ended) are kept in ``pending``, to be waited for.
    """

    def __init__(self, target: str) -> None:
        self.pending: list[str] = []
        self._client = LetheClient(target, retries=1, timeout=120)
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="canceller", daemon=True)
        self._thread.start()

    def cancel(self, job_id: str) -> None:
        """Cancel ``job_id`` soon."""
        self._jobs.put(job_id)

    def _run(self) -> None:
        while (job_id := self._jobs.get()) is not None:
            try:
                if self._client.cancel(job_id).state in TERMINAL:
                    continue
            except FailedPreconditionError:
                pass
            except LetheError as exc:
                self._error = exc
                return
            self.pending.append(job_id)

    def close(self) -> list[str]:
        """Cancel what is left, stop, and return the jobs that were not over after their cancel.

        Raises:
            RuntimeError: when a CancelJob call failed otherwise.
        """
        self._jobs.put(None)
        self._thread.join(180)
        self._client.close()
        if self._error is not None:
            raise RuntimeError(f"CancelJob failed: {self._error}") from self._error
        return self.pending


class Submitter:
    """Makes measured Learn calls of a small digits stream under new task names."""

    def __init__(self, client: LetheClient, samples: int) -> None:
        self.client = client
        self.inputs, self.labels = digits_task(0, samples, seed=1)
        self.count = 0

    def learn(self, prefix: str) -> tuple[Submission, pb.Job]:
        """One Learn call, measured; the job it queued."""
        self.count += 1
        started = time.time()
        with Stopwatch() as watch:
            job = self.client.learn(f"{prefix}-{self.count:04d}", self.inputs, self.labels, epochs=1)
        return Submission(started, watch.seconds), job


def idle_block(
    target: str, submitter: Submitter, count: int, reference_job: str, settings: SubmitSettings
) -> tuple[list[Submission], list[Poll]]:
    """``count`` Learn calls, each on an idle server (:func:`settle` after each, then a pause of
    ``settings.idle_pause_seconds``), while the poller reads ``reference_job`` (a finished job).

    Returns:
        The calls, and the poller's replies that fell entirely inside a quiet interval: from the end
        of the previous call's job (or the block's start) to the end of a call. The others may have
        waited behind the transactions of the measured calls' own jobs.
    """
    poller = Poller(target, reference_job, settings.poll_seconds, until_terminal=False).start()
    submissions: list[Submission] = []
    quiet: list[tuple[float, float]] = []
    try:
        for _ in range(count):
            since = time.time()
            time.sleep(settings.idle_pause_seconds)
            submission, job = submitter.learn("idle")
            submissions.append(submission)
            quiet.append((since, submission.ended))
            settle(submitter.client, job)
    finally:
        polls = poller.stop()
    return submissions, [p for p in polls if any(a <= p.sent and p.received <= b for a, b in quiet)]


def busy_block(target: str, client: LetheClient, submitter: Submitter, task: str, poll: float) -> UnlearnRun:
    """Unlearn ``task``; submit Learn calls back to back until the poller sees it end, cancelling each job
    from a :class:`Canceller`; then wait for the jobs that were not over after their cancel."""
    job = client.unlearn(task, reason="benchmark: submission latency")
    poller = Poller(target, job.id, poll, until_terminal=True).start()
    canceller = Canceller(target)
    submissions: list[Submission] = []
    try:
        while not poller.finished.is_set():
            submission, queued = submitter.learn("busy")
            submissions.append(submission)
            canceller.cancel(queued.id)
    finally:
        polls = poller.stop()
        pending = canceller.close()
    for job_id in pending:
        client.wait(job_id, timeout=600, check=False)
    final = client.job(job.id)
    if final.state != pb.SUCCEEDED:
        raise RuntimeError(f"the unlearn of {task} ended {pb.JobState.Name(final.state)}: {final.message}")
    running, evaluation = windows(final.started_at.ToNanoseconds() / 1e9, polls)
    return UnlearnRun(task, running, evaluation, submissions, polls, dict(final.metrics))


def measure(
    root: Path, settings: SubmitSettings, log: Callable[[str], None]
) -> tuple[list[Submission], list[Poll], list[UnlearnRun], int]:
    """Start the server, learn the large tasks, run the interleaved idle and busy blocks.

    Returns:
        The idle submissions, the idle polls, one :class:`UnlearnRun` per repetition, and the
        number of tasks the server held at the end.
    """
    # Every setting at the server's defaults (no BASE_SETTINGS) except the probe cap; metrics on a free port.
    server_settings = {"training.max_probe_samples": settings.probe_samples, "server.metrics_port": 0}
    with lethe_server(root / "data", server_settings, base={}, client_timeout=60) as server:
        client = server.client
        log(f"submit: server at {server.target}; learning {settings.tasks} tasks ...")
        jobs = []
        for index in range(settings.tasks):
            inputs, labels = digits_task(index, 2 * settings.probe_samples)
            jobs.append(
                client.learn(f"large-{index}", inputs, labels, epochs=settings.learn_epochs, holdout_fraction=0.5)
            )
        for job in jobs:
            done = client.wait(job.id, timeout=900)
            log(f"  learned {done.task}: {done.metrics.get('probe_samples', 0):.0f} probe samples")
        submitter = Submitter(client, settings.tiny_samples)
        for _ in range(settings.warmup):
            settle(client, submitter.learn("warmup")[1])
        idle: list[Submission] = []
        idle_polls: list[Poll] = []
        runs: list[UnlearnRun] = []
        per_block = [settings.idle_submissions // settings.unlearns] * settings.unlearns
        for index in range(settings.idle_submissions % settings.unlearns):
            per_block[index] += 1
        for rep in range(settings.unlearns):
            submissions, polls = idle_block(server.target, submitter, per_block[rep], jobs[-1].id, settings)
            idle += submissions
            idle_polls += polls
            run = busy_block(server.target, client, submitter, f"large-{rep}", settings.poll_seconds)
            runs.append(run)
            idle_p50 = 1000 * percentile([s.seconds for s in submissions], 50)
            longest = 1000 * max((s.seconds for s in run.in_running()), default=math.nan)
            log(
                f"  repetition {rep + 1}/{settings.unlearns}: idle p50 {idle_p50:.1f} ms; unlearn of {run.task}: "
                f"RUNNING {run.running[1] - run.running[0]:.2f} s, evaluation/commit "
                f"{run.evaluation[1] - run.evaluation[0]:.2f} s, {len(run.in_running())} Learn calls overlapping, "
                f"longest {longest:.0f} ms"
            )
        tasks = len(client.tasks())
    return idle, idle_polls, runs, tasks


def _ms(values: Sequence[float]) -> list[float]:
    return [1000 * v for v in values]


def _cells(values_ms: Sequence[float], idle_p99: float) -> list[str]:
    if not values_ms:
        return ["0", "—", "—", "—", "—"]
    p99 = percentile(values_ms, 99)
    return [
        str(len(values_ms)),
        f"{percentile(values_ms, 50):,.1f}",
        f"{p99:,.1f}",
        f"{max(values_ms):,.1f}",
        f"{p99 / idle_p99:,.2f}" if idle_p99 > 0 else "—",
    ]


def report(
    idle: Sequence[Submission],
    idle_polls: Sequence[Poll],
    runs: Sequence[UnlearnRun],
    tasks_at_end: int,
    settings: SubmitSettings,
    seconds: float,
) -> BenchmarkResult:
    """The benchmark's tables from the measurements."""
    idle_ms = _ms([s.seconds for s in idle])
    phases = {
        "whole RUNNING window": _ms([s.seconds for r in runs for s in r.in_running()]),
        "strategy phase (burn-in)": _ms([s.seconds for r in runs for s in r.in_strategy_only()]),
        "evaluation/commit phase": _ms([s.seconds for r in runs for s in r.in_evaluation()]),
    }
    idle_p50, idle_p99 = percentile(idle_ms, 50), percentile(idle_ms, 99)
    comparisons = []
    for phase in ("evaluation/commit phase", "whole RUNNING window"):
        values = phases[phase]
        if values:
            for q in (50, 99):
                comparisons.append(
                    compare(
                        f"Learn submission p{q}, during an unlearn's {phase}",
                        "ms",
                        f"idle p{q}",
                        [idle_p50 if q == 50 else idle_p99],
                        [percentile(values, q)],
                    )
                )
    latency_rows = [["idle (no job running)", *_cells(idle_ms, idle_p99)]]
    latency_rows += [[f"during an unlearn: {phase}", *_cells(values, idle_p99)] for phase, values in phases.items()]

    evaluation = phases["evaluation/commit phase"]
    ratio = percentile(evaluation, 99) / idle_p99 if evaluation and idle_p99 > 0 else math.nan
    goals = [
        [
            "Learn p99 during the evaluation/commit phase ÷ idle p99",
            f"{ratio:,.2f}" if not math.isnan(ratio) else "no submission overlapped it",
            f"≤ {GOAL:g}",
            "met" if ratio <= GOAL else "**not met**",
        ]
    ]

    def poll_ms(selected: Sequence[Poll]) -> list[float]:
        return _ms([p.seconds for p in selected])

    poll_phases = {
        "idle (a finished job)": poll_ms(idle_polls),
        "strategy phase (burn-in)": poll_ms(
            [p for r in runs for p in r.polls if p.received > r.strategy[0] and p.sent < r.strategy[1]]
        ),
        "evaluation/commit phase": poll_ms(
            [p for r in runs for p in r.polls if p.received > r.evaluation[0] and p.sent < r.evaluation[1]]
        ),
    }
    poll_idle_p99 = percentile(poll_phases["idle (a finished job)"], 99)
    poll_rows = [[phase, *_cells(values, poll_idle_p99)] for phase, values in poll_phases.items()]

    run_rows = []
    for index, run in enumerate(runs, start=1):
        in_eval = _ms([s.seconds for s in run.in_evaluation()])
        run_rows.append(
            [
                str(index),
                run.task,
                f"{run.running[1] - run.running[0]:.2f}",
                f"{run.strategy[1] - run.strategy[0]:.2f}",
                f"{run.evaluation[1] - run.evaluation[0]:.2f}",
                f"{len(run.in_strategy_only())} / {len(in_eval)}",
                f"{max(in_eval):,.0f}" if in_eval else "—",
                f"{run.metrics.get('unlearn_seconds', math.nan):.2f}",
                f"{run.metrics.get('forget_attempts', math.nan):.0f}",
                f"{run.metrics.get('mia_members', math.nan):,.0f}",
            ]
        )
    outside = sum(len(r.submissions) - len(r.in_running()) for r in runs)
    stats = ["p50 (ms)", "p99 (ms)", "max (ms)", "p99 ÷ idle p99"]
    return BenchmarkResult(
        name=NAME,
        title="Learn submission latency during an unlearn's evaluation",
        comparisons=comparisons,
        tables=[
            ("Goals", ["quantity", "measured", "goal", ""], goals),
            (
                "Learn submission latency (the client's wall time of one Learn stream)",
                ["when", "Learn calls", *stats],
                latency_rows,
            ),
            (
                "GetJob latency (the poller, every " + f"{1000 * settings.poll_seconds:.0f} ms)",
                ["when", "GetJob calls", *stats],
                poll_rows,
            ),
            (
                "Each unlearn",
                [
                    "#",
                    "task",
                    "RUNNING (s)",
                    "strategy phase (s)",
                    "evaluation/commit phase (s)",
                    "Learn calls: strategy / evaluation phase",
                    "longest Learn in the evaluation phase (ms)",
                    "strategy's unlearn_seconds",
                    "forget_attempts",
                    "MIA members",
                ],
                run_rows,
            ),
        ],
        settings={
            "server": "python -m server at its defaults (uncle, mlp, digits 1×8×8, 10 classes, SQLite, --no-auth, "
            f"port 0) with training.max_probe_samples = {settings.probe_samples:,} "
            f"(default {TrainingSection.max_probe_samples:,})",
            "large tasks": f"{settings.tasks}, two digits classes each, {2 * settings.probe_samples:,} samples "
            f"(repeated, noise σ {NOISE}), holdout 0.5, {settings.learn_epochs} epoch(s): "
            f"{settings.probe_samples:,} probe and member samples each",
            "measured Learn": f"{settings.tiny_samples} samples (2 classes), 1 epoch, a new task name each; "
            f"{settings.warmup} warm-up calls discarded",
            "repetitions": f"{settings.unlearns} (idle block, then an unlearn of the next large task)",
            "idle calls": str(len(idle)),
            "GetJob poll": f"every {1000 * settings.poll_seconds:.0f} ms, its own channel, in both phases",
            "tasks at the end": f"{tasks_at_end} (the large ones, the unlearned ones included, and every idle Learn "
            "job that ran to its end)",
        },
        notes=[
            "p50/p99 pool the calls of every repetition (linear interpolation between ranks); with few calls in a "
            "window p99 is close to its maximum. A call counts for a window when it overlaps it; "
            f"{outside} busy call(s) fell outside every RUNNING window (before the claim or after the end).",
            "Windows come from the GetJob poller: RUNNING from the job's started_at to the first SUCCEEDED reply; "
            "the evaluation/commit phase from the reply before the job's progress reached its final value (the "
            "strategy's last step) to that end, so it also holds the forgetting check and the checkpoint.",
        ],
        seconds=seconds,
    )


def run(options: RunOptions, settings: SubmitSettings | None = None) -> BenchmarkResult:
    """Run the benchmark in a scratch directory under ``options.data_dir``; return its result."""
    settings = settings or (QUICK if options.quick else FULL)
    root = Path(tempfile.mkdtemp(prefix="submit-", dir=options.data_dir))
    try:
        with Stopwatch() as total:
            idle, idle_polls, runs, tasks = measure(root, settings, options.log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(idle, idle_polls, runs, tasks, settings, total.seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_submit_latency [--quick] [sizes] [--json FILE]``: run, print the markdown.

    Writes no document: ``make bench ARGS="--only submit"`` runs the default sizes and updates
    docs/benchmarks.md.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_submit_latency", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (numbers are meaningless)")
    for name in ("tasks", "probe_samples", "idle_submissions", "unlearns"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(FULL, name)}")
    parser.add_argument("--json", type=Path, help="also write the result and the machine facts as JSON to this file")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()), help="scratch directory")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k in FULL.__dataclass_fields__ and v is not None}
    settings = dataclasses.replace(QUICK if args.quick else FULL, **sizes)
    info, when = machine_info(), now_utc()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    result = run(RunOptions(quick=args.quick, data_dir=args.data_dir), settings)
    print(result_markdown(result, machine_summary(info), when, args.quick))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": info, "when": when, "quick": args.quick, "results": [dataclasses.asdict(result)]})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
