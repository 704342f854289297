"""Load and soak: many learn/unlearn cycles against a server subprocess, under concurrent Predict load.

A real ``python -m server`` runs in a subprocess (finetune, MLP of width 32, one epoch) so that its
resident memory and open file descriptors can be read from ``/proc/<pid>``. After a permanent task
is learned, each cycle learns a small digits task under a new name, waits for it, predicts it,
unlearns it and waits again. Meanwhile two client threads call Predict on the permanent task in a
loop: every call must succeed, and the model version each thread sees must never go back.

Measured: the server's RSS and fd count after warm-up (10% of the cycles) and at the end; the data
directory's bytes and files at baseline (permanent task learned) and at the end (every soak task
unlearned; with ``training.forget_probe_ops = 0`` an unlearned task's files all go at once, so only
the checkpoint's name and size may differ). A second, shorter run with the default
``forget_probe_ops`` shows the probe sets of unlearned tasks being purged later rather than kept.

Baseline: plain PyTorch training of the same model (same backbone builder, Adam, batch size, epoch
count) on the same tasks' training splits, in this process, for the same number of cycles. It is
context for the cost of a cycle, not a like-for-like comparison (a cycle also ingests, evaluates,
checkpoints, unlearns and purges).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.servers import start_lethe, stop_lethe
from benchmarks.timing import Stopwatch, compare
from client import LetheClient
from client.audit import verify_chain
from client.datasets import load_digits
from protos import lethe_pb2 as pb

NAME = "soak"
#: The issue's goals.
RSS_GROWTH_GOAL = 0.10
FD_SLACK = 5

PERMANENT = "permanent"
#: Server settings (over benchmarks.servers.BASE_SETTINGS: finetune on the CPU).
SETTINGS: dict[str, Any] = {
    "model.backbone": "mlp",
    "model.width": 32,
    "training.epochs": 1,
    "training.batch_size": 32,
    "training.holdout_fraction": 0.2,
}


@dataclass(frozen=True)
class SoakSettings:
    """The workload.

    Attributes:
        cycles: learn/unlearn cycles of the main run (forget_probe_ops = 0).
        probe_cycles: cycles of the second run with the default forget_probe_ops.
        predict_threads: concurrent Predict clients on the permanent task.
        predict_batch: samples per Predict call.
    """

    cycles: int = 200
    probe_cycles: int = 16
    predict_threads: int = 2
    predict_batch: int = 16


FULL = SoakSettings()
QUICK = SoakSettings(cycles=4, probe_cycles=3)


def digits_task(index: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits of two classes, chosen by ``index``: inputs [n,1,8,8] float32 and labels."""
    first = index % 10
    data = load_digits().select([first, (first + 1) % 10])
    return data.inputs, data.labels


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def proc_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(directory: Path) -> dict[str, int]:
    """Every file under ``directory``: relative path -> bytes."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def settled_snapshot(directory: Path, *, quiet: float = 0.1, timeout: float = 10.0) -> dict[str, int]:
    """:func:`snapshot` once it has not changed for ``quiet`` seconds (or after ``timeout``).

    A job's purge runs just after its commit, so a client that has seen the job SUCCEEDED may
    still catch its files for a few milliseconds.
    """
    deadline = time.monotonic() + timeout
    last = snapshot(directory)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        current = snapshot(directory)
        if current == last:
            return current
        last = current
    return last


def without_checkpoints(files: dict[str, int]) -> set[str]:
    """The file names outside ``checkpoints/``."""
    return {name for name in files if not name.startswith("checkpoints/")}


def checkpoints_of(files: dict[str, int]) -> dict[str, int]:
    """The files under ``checkpoints/``."""
    return {name: size for name, size in files.items() if name.startswith("checkpoints/")}


@dataclass
class PredictLoad:
    """Predict clients hammering the permanent task on threads until stopped."""

    target: str
    inputs: np.ndarray
    threads: int
    calls: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    versions: list[set[int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(self.threads):
            self.calls.append(0)
            self.versions.append(set())
            worker = threading.Thread(target=self._run, args=(index,), name=f"soak-predict-{index}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def _run(self, index: int) -> None:
        last = 0
        with LetheClient(self.target, retries=1, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    version = client.predict(PERMANENT, self.inputs).model_version
                except Exception as exc:  # every failure counts, whatever it is
                    with self._lock:
                        self.failures.append(f"thread {index}: {type(exc).__name__}: {exc}"[:300])
                    time.sleep(0.05)
                    continue
                self.calls[index] += 1
                self.versions[index].add(version)
                if version < last:
                    with self._lock:
                        self.regressions.append(f"thread {index}: version {version} after {last}")
                last = max(last, version)
                time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)


@dataclass
class SoakReport:
    """What one soak run observed."""

    cycles: int
    warmup_cycles: int
    seconds: float
    rss_warm: int
    rss_end: int
    rss_peak: int
    fds_warm: int
    fds_end: int
    baseline_files: dict[str, int]
    end_files: dict[str, int]
    predict_calls: int
    predict_failures: list[str]
    version_regressions: list[str]
    versions_seen: int
    tasks_not_unlearned: list[str]
    audit_problem: str | None
    probe_files: list[int]
    rss_trace: list[tuple[int, int, int]]  # (cycle, rss bytes, fds)

    @property
    def rss_growth(self) -> float:
        return self.rss_end / self.rss_warm - 1

    @property
    def cycles_per_second(self) -> float:
        return self.cycles / self.seconds

    @property
    def same_files(self) -> bool:
        return without_checkpoints(self.baseline_files) == without_checkpoints(self.end_files)


def soak(
    data_dir: Path,
    cycles: int,
    *,
    forget_probe_ops: int | None = 0,
    predict_threads: int = 2,
    predict_batch: int = 16,
    log: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Run ``cycles`` learn/predict/unlearn cycles against a fresh server subprocess; see the module doc."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server_data = data_dir / "data"
    settings = dict(SETTINGS)
    if forget_probe_ops is not None:
        settings["training.forget_probe_ops"] = forget_probe_ops
    lethe = start_lethe(server_data, settings, database_url=f"sqlite:///{data_dir / 'lethe.db'}", client_timeout=60)
    try:
        pid = lethe.server.pid
        client = lethe.client
        inputs, labels = digits_task(0)
        client.wait(client.learn(PERMANENT, inputs, labels).id, timeout=300)
        baseline_files = snapshot(server_data)
        load = PredictLoad(lethe.target, inputs[:predict_batch], predict_threads)
        load.start()
        warmup = max(1, cycles // 10)
        rss_warm = fds_warm = 0
        rss_trace: list[tuple[int, int, int]] = []
        probe_files: list[int] = []
        step = max(1, cycles // 10)
        names: list[str] = []
        started = time.perf_counter()
        try:
            for cycle in range(1, cycles + 1):
                name = f"soak-{cycle:04d}"
                names.append(name)
                x, y = digits_task(cycle)
                client.wait(client.learn(name, x, y).id, timeout=300)
                client.predict(name, x[:predict_batch])
                client.wait(client.unlearn(name, reason="soak").id, timeout=300)
                probe_files.append(len(settled_snapshot(server_data / "probes", quiet=0.02)))
                if cycle == warmup:
                    rss_warm, fds_warm = proc_rss_bytes(pid), proc_fds(pid)
                if cycle % step == 0 or cycle == cycles:
                    rss_trace.append((cycle, proc_rss_bytes(pid), proc_fds(pid)))
                    log(f"  cycle {cycle}/{cycles}: rss {rss_trace[-1][1] / 2**20:.1f} MiB, fds {rss_trace[-1][2]}")
            seconds = time.perf_counter() - started
        finally:
            load.stop()
        rss_end, fds_end = proc_rss_bytes(pid), proc_fds(pid)
        end_files = settled_snapshot(server_data)
        states = {t.name: t.state for t in client.tasks()}
        not_unlearned = [n for n in names if states.get(n) != pb.UNLEARNED]
        audit_problem = verify_chain(client.audit_events())
        return SoakReport(
            cycles=cycles,
            warmup_cycles=warmup,
            seconds=seconds,
            rss_warm=rss_warm,
            rss_end=rss_end,
            rss_peak=max(r for _c, r, _f in rss_trace),
            fds_warm=fds_warm,
            fds_end=fds_end,
            baseline_files=baseline_files,
            end_files=end_files,
            predict_calls=sum(load.calls),
            predict_failures=list(load.failures),
            version_regressions=list(load.regressions),
            versions_seen=len(set().union(*load.versions)),
            tasks_not_unlearned=not_unlearned,
            audit_problem=audit_problem,
            probe_files=probe_files,
            rss_trace=rss_trace,
        )
    finally:
        stop_lethe(lethe)


def plain_pytorch_seconds(cycles: int) -> float:
    """Seconds to train the same model as the server (fresh Adam per task, 1 epoch) on ``cycles`` tasks."""
    import torch
    from torch.nn import functional

    from server.engine.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("mlp", (1, 8, 8), 10, width=int(SETTINGS["model.width"]))
    batch = int(SETTINGS["training.batch_size"])
    tasks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for cycle in range(1, cycles + 1):
        inputs, labels = digits_task(cycle)
        n_train = len(labels) - round(len(labels) * float(SETTINGS["training.holdout_fraction"]))
        tasks.append((torch.from_numpy(inputs[:n_train]), torch.from_numpy(labels[:n_train].astype(np.int64))))
    with Stopwatch() as watch:
        for x, y in tasks:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _epoch in range(int(SETTINGS["training.epochs"])):
                order = torch.randperm(len(y))
                for start in range(0, len(y), batch):
                    index = order[start : start + batch]
                    loss = functional.cross_entropy(model(x[index]), y[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    return watch.seconds


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def run(options: RunOptions) -> BenchmarkResult:
    """The soak benchmark (see the module doc)."""
    settings = QUICK if options.quick else FULL
    with Stopwatch() as total:
        options.log(f"soak: {settings.cycles} cycles, forget_probe_ops = 0")
        main = soak(
            options.data_dir / "soak-main",
            settings.cycles,
            forget_probe_ops=0,
            predict_threads=settings.predict_threads,
            predict_batch=settings.predict_batch,
            log=options.log,
        )
        options.log(f"soak: {settings.probe_cycles} cycles, default forget_probe_ops")
        probes = soak(
            options.data_dir / "soak-probes",
            settings.probe_cycles,
            forget_probe_ops=None,
            predict_threads=settings.predict_threads,
            predict_batch=settings.predict_batch,
            log=options.log,
        )
        plain = plain_pytorch_seconds(settings.cycles)

    base_bytes, end_bytes = sum(main.baseline_files.values()), sum(main.end_files.values())
    base_ckpt, end_ckpt = checkpoints_of(main.baseline_files), checkpoints_of(main.end_files)
    ckpt_delta = sum(end_ckpt.values()) - sum(base_ckpt.values())
    extra = sorted(without_checkpoints(main.end_files) - without_checkpoints(main.baseline_files))
    missing = sorted(without_checkpoints(main.baseline_files) - without_checkpoints(main.end_files))

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    rows = [
        [
            "server RSS after warm-up → end",
            f"{_mib(main.rss_warm)} → {_mib(main.rss_end)} MiB "
            f"({main.rss_growth:+.1%}; peak sampled {_mib(main.rss_peak)})",
            f"≤ +{RSS_GROWTH_GOAL:.0%}",
            verdict(main.rss_growth <= RSS_GROWTH_GOAL),
        ],
        [
            "server open fds after warm-up → end",
            f"{main.fds_warm} → {main.fds_end}",
            "flat",
            verdict(main.fds_end <= main.fds_warm + FD_SLACK),
        ],
        [
            "data directory bytes, baseline → end",
            f"{base_bytes:,} → {end_bytes:,} B (checkpoint {ckpt_delta:+,} B)",
            "baseline ± checkpoint size",
            verdict(end_bytes - base_bytes == ckpt_delta),
        ],
        [
            "data directory files, baseline → end",
            f"{len(main.baseline_files)} → {len(main.end_files)} (checkpoints: {len(end_ckpt)}; "
            f"extra {len(extra)}, missing {len(missing)})",
            "same files, one checkpoint",
            verdict(main.same_files and len(end_ckpt) == 1),
        ],
        [
            "Predict calls / failures / version regressions",
            f"{main.predict_calls:,} / {len(main.predict_failures)} / {len(main.version_regressions)} "
            f"({main.versions_seen} versions seen)",
            "0 failures, monotonic",
            verdict(not main.predict_failures and not main.version_regressions),
        ],
        [
            "soak tasks not UNLEARNED; audit chain",
            f"{len(main.tasks_not_unlearned)}; {main.audit_problem or 'verifies'}",
            "0; verifies",
            verdict(not main.tasks_not_unlearned and main.audit_problem is None),
        ],
        ["cycles per second", f"{main.cycles_per_second:.2f}", "", ""],
    ]
    trace = [[str(c), _mib(r), str(f)] for c, r, f in main.rss_trace]
    probe_counts = probes.probe_files
    notes = [
        f"{main.cycles} cycles in {main.seconds:.0f} s ({main.cycles_per_second:.2f} cycles/s); each cycle is "
        "Learn (stream, train 1 epoch, evaluate, checkpoint), Predict, Unlearn (evaluate, checkpoint, purge).",
        f"Warm-up: the first {main.warmup_cycles} cycle(s); RSS and fds are read from /proc/<pid> of the server "
        "process.",
        f"Default forget_probe_ops ({probes.cycles} cycles): probes/ held "
        f"{', '.join(map(str, probe_counts))} files after each cycle — it levels off at {max(probe_counts)} instead of "
        f"growing by one per cycle, so unlearned tasks' probe sets are purged later; "
        f"{len(probes.predict_failures)} Predict failures, {probes.fds_warm} → {probes.fds_end} fds.",
    ]
    if extra or missing:
        notes.append(f"Files differing from baseline: extra {extra[:10]}, missing {missing[:10]}.")
    for failure in (main.predict_failures + probes.predict_failures)[:5]:
        notes.append(f"Predict failure: {failure}")
    return BenchmarkResult(
        name=NAME,
        title="Load and soak: learn/unlearn cycles under Predict load",
        comparisons=[
            compare(
                f"{main.cycles} learn/predict/unlearn cycles, wall time",
                "s",
                "plain PyTorch, training only, in-process",
                [plain],
                [main.seconds],
            )
        ],
        tables=[
            ("Invariants", ["quantity", "measured", "goal", ""], rows),
            ("Server RSS and fds during the run", ["after cycle", "RSS (MiB)", "open fds"], trace),
        ],
        settings={
            "strategy": "finetune",
            "backbone": f"mlp, width {SETTINGS['model.width']}",
            "epochs": str(SETTINGS["training.epochs"]),
            "task": "two digits classes (~360 samples, 8x8)",
            "Predict clients": f"{settings.predict_threads} threads, {settings.predict_batch} samples per call",
            "cycles": f"{settings.cycles} (forget_probe_ops = 0) and {settings.probe_cycles} (default)",
        },
        notes=notes,
        seconds=total.seconds,
    )
