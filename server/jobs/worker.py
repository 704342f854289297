"""The single worker thread that owns the training model.

Each job runs in two phases so a kill -9 at any instant loses nothing:

1. *compute*: train or unlearn, write the job's data files, then an atomic checkpoint that records
   the job id and its metrics;
2. *finish*: evaluate every task, then one SQL transaction (job SUCCEEDED, task, evaluation row,
   data-file accounting, audit events), then delete purged files and publish the new snapshot.

On restart, a RUNNING job named by the newest checkpoint is finished from phase 2; any other
RUNNING job is re-queued and runs again from the checkpointed model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from server.checkpoints import Checkpoint, CheckpointMeta, CheckpointStore
from server.data import FileRecord, load_arrays, purge, read_spool, save_arrays, sha256_file
from server.engine import metrics
from server.engine.protocol import LearnOptions, Strategy, TaskData
from server.jobs.evaluation import (
    ForgetCheck,
    ProbeCache,
    ProbeSet,
    evaluate,
    forget_quality,
    verdict,
    verify_forgetting,
)
from server.jobs.events import JobEvents
from server.jobs.serving import ServingState
from server.logs import log_context
from server.storage import (
    AuditLog,
    DataFile,
    DataFileKind,
    DataFileRepository,
    EvaluationRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    Task,
    TaskRepository,
    TaskState,
    utc_now,
)
from server.telemetry import Telemetry

log = logging.getLogger(__name__)

#: Seconds between writes of a running job's progress to SQL (watchers see every change in memory).
_PROGRESS_FLUSH_SECONDS = 2.0


class JobInterruptedError(Exception):
    """The server is stopping and the grace period ran out; the job will run again after restart."""


class StateMismatchError(RuntimeError):
    """The checkpoint is older than what SQL says was applied: the model would silently miss jobs."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs from the configuration."""

    data_dir: Path
    seed: int
    max_probe_samples: int
    forget_probe_ops: int
    default_learning_rate: float
    #: Points the reference may lie outside the forgotten task's 95% interval (training.forget_tolerance).
    forget_tolerance: float = 5.0
    #: Forgetting operations per unlearn, the first included (training.forget_max_attempts).
    forget_max_attempts: int = 3


class Worker:
    """Runs queued jobs one at a time on the strategy it owns."""

    def __init__(
        self,
        strategy_factory: Callable[[], Strategy],
        sessions: sessionmaker[Session],
        events: JobEvents,
        serving: ServingState,
        telemetry: Telemetry,
        settings: WorkerSettings,
    ) -> None:
        self._factory = strategy_factory
        self.strategy = strategy_factory()
        self.sessions = sessions
        self.events = events
        self.serving = serving
        self.telemetry = telemetry
        self.settings = settings
        self.data_dir = settings.data_dir
        self.checkpoints = CheckpointStore(settings.data_dir)
        self.probes = ProbeCache(settings.data_dir)
        self.audit_log = AuditLog()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._deadline = math.inf
        self._last_flush = 0.0
        self.current_job: str | None = None

    # ------------------------------------------------------------ lifecycle
    def recover(self) -> None:
        """Load the newest checkpoint and reconcile it with SQL; then clean the data directory.

        Raises:
            StateMismatchError: SQL records a model version the checkpoint does not have.
        """
        # Task states first: finishing an interrupted job below publishes a model, and from then on
        # Predict must already know which tasks are unlearned (refused) rather than unknown.
        with self.sessions() as session:
            self.serving.load_tasks({t.name: t.state for t in TaskRepository(session).list()})
        checkpoint = self.checkpoints.load_latest()
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint.strategy_state)
        with self.sessions() as session, session.begin():
            jobs = JobRepository(session)
            applied = jobs.max_model_version()
            have = checkpoint.meta.version if checkpoint else 0
            running = jobs.running()
            if applied > have and not (checkpoint and any(j.id == checkpoint.meta.last_job_id for j in running)):
                raise StateMismatchError(
                    f"the database records model version {applied} but the newest checkpoint in "
                    f"{self.checkpoints.directory} is version {have}; restore the data directory and the "
                    "database from the same backup"
                )
            to_finish: Job | None = None
            for job in running:
                if checkpoint is not None and job.id == checkpoint.meta.last_job_id:
                    to_finish = job
                else:
                    job.state, job.started_at, job.progress = JobState.QUEUED, None, 0.0
                    job.message = "re-queued after a restart"
                    log.warning("re-queued job %s (%s %s) interrupted by a restart", job.id, job.kind, job.task)
        if to_finish is not None and checkpoint is not None:
            log.warning("finishing job %s from its checkpoint after a restart", to_finish.id)
            self._finish(to_finish, checkpoint.meta.last_job_metrics, time.monotonic())
        self._sweep()
        newest = self.checkpoints.paths()
        if newest:
            self.checkpoints.prune(keep=newest[0])
        self._load_serving_state()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="lethe-worker", daemon=True)
        self._thread.start()

    def request_stop(self, grace_seconds: float) -> None:
        """Take no new job; the running one may finish within ``grace_seconds``, else it is interrupted.

        An interrupted job goes back to QUEUED with the model restored, and runs again after restart.
        """
        self._deadline = time.monotonic() + grace_seconds
        self._stopping.set()
        self.events.close()

    def join(self, timeout: float) -> None:
        """Wait for the worker thread to end (after :meth:`request_stop`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        seen = self.events.counter
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                job = self._claim()
                if job is None:
                    seen = self.events.wait(seen, timeout=5.0)
                    continue
                with log_context(job_id=job.id, task=job.task, principal=job.principal):
                    self._execute(job)
                backoff = 1.0
            except Exception:
                # The database went away (or similar) outside a job's own error handling: keep the
                # worker alive and retry; a job left RUNNING is reconciled at the next restart.
                log.exception("worker loop error; retrying in %.0f s", backoff)
                self.events.wait(self.events.counter, timeout=backoff)
                backoff = min(backoff * 2, 60.0)

    # --------------------------------------------------------------- claim
    def _claim(self) -> Job | None:
        with self.sessions() as session, session.begin():
            job = JobRepository(session).next_runnable()
            if job is None:
                return None
            job.state, job.started_at, job.attempts = JobState.RUNNING, utc_now(), job.attempts + 1
            job.progress, job.message = 0.0, "running"
        self.telemetry.job_queue_wait.labels(job.kind.value).observe(
            max(0.0, (job.started_at - job.created_at).total_seconds())
        )
        self.events.notify()
        return job

    def _execute(self, job: Job) -> None:
        self.current_job = job.id
        started = time.monotonic()
        log.info("%s job started", job.kind.value)
        try:
            job_metrics: dict[str, float] | None
            if job.kind == JobKind.LEARN:
                job_metrics = self._compute_learn(job)
            elif job.kind == JobKind.UNLEARN:
                job_metrics = self._compute_unlearn(job)
            else:
                raise NotImplementedError(f"job kind {job.kind.value} is not supported by this server")
            if job_metrics is not None:
                self._checkpoint(job, job_metrics)
            self._finish(job, job_metrics or {}, started)
            log.info("%s job succeeded", job.kind.value, extra={"model_version": self.strategy.version})
        except JobInterruptedError:
            self._requeue(job)
            self._restore()
        except Exception as exc:
            log.exception("job %s (%s %s) failed", job.id, job.kind.value, job.task)
            self._fail(job, f"{type(exc).__name__}: {exc}", started)
            self._restore()
        finally:
            self.events.clear_progress(job.id)
            self.current_job = None
            self.events.notify()

    def _progress(self, job: Job) -> Callable[[float, str], None]:
        def report(fraction: float, message: str) -> None:
            if self._stopping.is_set() and time.monotonic() > self._deadline:
                raise JobInterruptedError(job.id)
            fraction = min(max(float(fraction), 0.0), 1.0)
            self.events.set_progress(job.id, fraction, message)
            now = time.monotonic()
            if now - self._last_flush >= _PROGRESS_FLUSH_SECONDS:
                self._last_flush = now
                with self.sessions() as session, session.begin():
                    row = JobRepository(session).get(job.id)
                    if row is not None:
                        row.progress, row.message = fraction, message

        return report

    # --------------------------------------------------------------- learn
    def _split(self, job: Job, inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Deterministic (train, probe, member) index arrays for a learn job's samples."""
        n = len(labels)
        holdout = float(job.options.get("holdout_fraction", 0.1))
        n_probe = min(max(1, round(n * holdout)), self.settings.max_probe_samples, n - 1)
        # Seeded by the task's name, not the queue position, so the same mega-batch is split the same
        # way whatever came before it (LURE's exact unlearning equals retraining only then).
        task_seed = int.from_bytes(hashlib.sha256(job.task.encode()).digest()[:8], "little")
        order = np.random.default_rng([self.settings.seed, task_seed]).permutation(n)
        probe, train = order[:n_probe], order[n_probe:]
        member = train[: min(n_probe, len(train))]  # trained on, kept only to measure membership inference
        return train, probe, member

    def _compute_learn(self, job: Job) -> dict[str, float]:
        spool = self.data_dir / f"spool/{job.id}.spool"
        inputs, labels, _ids = read_spool(spool)
        train, probe, member = self._split(job, inputs, labels)
        data = TaskData(torch.from_numpy(inputs[train]), torch.from_numpy(labels[train]))
        opts = job.options
        options = LearnOptions(
            epochs=int(opts["epochs"]),
            batch_size=int(opts["batch_size"]),
            learning_rate=float(opts["learning_rate"]) or self.settings.default_learning_rate,
            seed=self.settings.seed,
        )
        replay = self._replay(exclude=job.task)
        report = self.strategy.learn(job.task, data, options, self._progress(job), replay)
        self._check_finite(job.task, inputs[probe])
        save_arrays(self.data_dir / f"probes/{job.id}.npz", inputs=inputs[probe], labels=labels[probe])
        save_arrays(self.data_dir / f"members/{job.id}.npz", inputs=inputs[member], labels=labels[member])
        if report.retain is not None:
            save_arrays(
                self.data_dir / f"retained/{job.id}.npz",
                inputs=report.retain.inputs.numpy(),
                labels=report.retain.labels.numpy(),
            )
        job_metrics = {k: float(v) for k, v in report.metrics.items()}
        job_metrics.setdefault("samples", float(len(train)))
        job_metrics["probe_samples"] = float(len(probe))
        return job_metrics

    def _check_finite(self, task: str, inputs: np.ndarray) -> None:
        """Refuse a model whose outputs are no longer finite (training diverged, e.g. on huge inputs).

        Raising here fails the job before its checkpoint, and the model is restored from the last one,
        so a single bad stream cannot corrupt every other task.
        """
        name = task if self.strategy.task_incremental else None
        batch = torch.from_numpy(np.ascontiguousarray(inputs[:256]))
        logits = self.strategy.predictor().predict(name, batch)
        if torch.isnan(logits).any() or torch.isposinf(logits).any():
            raise ValueError(
                "training diverged: the model's outputs are not finite after this learn; it was rolled back "
                "(check the input scale: features are expected roughly in [0, 1] or standardized)"
            )

    def _replay(self, exclude: str | None = None) -> dict[str, TaskData]:
        if not self.strategy.needs_replay:
            return {}
        with self.sessions() as session:
            files = DataFileRepository(session).live(kind=DataFileKind.RETAINED)
        replay: dict[str, TaskData] = {}
        for f in files:
            if f.task != exclude:
                arrays = load_arrays(self.data_dir / f.path)
                replay[f.task] = TaskData(torch.from_numpy(arrays["inputs"]), torch.from_numpy(arrays["labels"]))
        return replay

    # ------------------------------------------------------------- unlearn
    def _compute_unlearn(self, job: Job) -> dict[str, float] | None:
        """Forget the task in the model; None when its data never reached the model."""
        with self.sessions() as session:
            task = TaskRepository(session).get(job.task)
        if task is None or task.learned_version is None:
            return None
        method = job.method or self.strategy.unlearn_methods[0]
        started = time.perf_counter()
        report = self.strategy.unlearn(job.task, method, self._progress(job), self._replay())
        job_metrics = {k: float(v) for k, v in report.metrics.items()}
        job_metrics.setdefault("unlearn_seconds", time.perf_counter() - started)
        job_metrics.update(self._keep_forgetting(job))
        return job_metrics

    def _keep_forgetting(self, job: Job) -> dict[str, float]:
        """Call the strategy's optional ``forget_more`` while the task is not verified forgotten.

        Stops at the first verified measurement, when ``forget_max_attempts`` forgetting
        operations (the unlearn included) have run, or when the strategy has nothing stronger
        (no ``forget_more``, or it returns None). Each call is a committed operation of its own.

        Returns:
            ``forget_attempts`` (the unlearn counts as 1) and, after extra attempts,
            ``forget_more_seconds``.
        """
        forget_more = getattr(self.strategy, "forget_more", None)
        attempts, started = 1, time.perf_counter()
        while forget_more is not None and attempts < self.settings.forget_max_attempts:
            check = self._verify(job.task)
            if check is None or check.verified:
                break
            log.warning("forgetting of %s not verified after %d attempt(s): %s", job.task, attempts, check.metrics)
            final = attempts + 1 == self.settings.forget_max_attempts
            if forget_more(job.task, attempts, self._progress(job), final=final) is None:
                break
            attempts += 1
        result = {"forget_attempts": float(attempts)}
        if attempts > 1:
            result["forget_more_seconds"] = time.perf_counter() - started
        return result

    def _forget_samples(self, session: Session, task: str) -> tuple[ProbeSet | None, ProbeSet | None]:
        """The (member, probe) samples of ``task`` still on disk."""
        files = DataFileRepository(session)
        members = next(iter(files.live(task=task, kind=DataFileKind.MEMBER)), None)
        probe = next(iter(files.live(task=task, kind=DataFileKind.PROBE)), None)
        return (
            self.probes.get(members.path) if members else None,
            self.probes.get(probe.path) if probe else None,
        )

    def _verify(self, task: str, samples: tuple[ProbeSet | None, ProbeSet | None] | None = None) -> ForgetCheck | None:
        """Measure the just-unlearned ``task`` against its reference with the current model.

        Args:
            task: the unlearned task.
            samples: its (member, probe) samples when the caller has them; else read here.
        """
        if samples is None:
            with self.sessions() as session:
                samples = self._forget_samples(session, task)
        members, probe = samples
        return verify_forgetting(
            self.strategy.predictor(),
            task,
            members,
            probe,
            task_incremental=self.strategy.task_incremental,
            tolerance=self.settings.forget_tolerance,
        )

    # ---------------------------------------------------------- checkpoint
    def _checkpoint(self, job: Job, job_metrics: dict[str, float]) -> None:
        meta = CheckpointMeta(self.strategy.version, job.id, job_metrics)
        self.checkpoints.save(meta, self.strategy.state_dict())

    def _restore(self) -> None:
        """Put the model back to the newest checkpoint after a failed or interrupted job."""
        checkpoint: Checkpoint | None = self.checkpoints.load_latest()
        self.strategy = self._factory()
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint.strategy_state)
        self.serving.publish(self.strategy.predictor())

    # -------------------------------------------------------------- finish
    def _finish(self, job: Job, job_metrics: dict[str, float], started: float) -> None:
        """Evaluate, commit everything about the job in one transaction, purge, publish."""
        predictor = self.strategy.predictor()
        task_incremental = self.strategy.task_incremental
        to_delete: list[str] = []
        with self.sessions() as session, session.begin():
            tasks, files, jobs = TaskRepository(session), DataFileRepository(session), JobRepository(session)
            row = jobs.get(job.id)
            assert row is not None
            task = tasks.get_for_update(job.task)
            now = utc_now()
            new_files: list[DataFile] = []
            if job.kind == JobKind.LEARN:
                for kind, folder in (
                    (DataFileKind.PROBE, "probes"),
                    (DataFileKind.MEMBER, "members"),
                    (DataFileKind.RETAINED, "retained"),
                ):
                    path = self.data_dir / f"{folder}/{job.id}.npz"
                    if path.exists():
                        record = FileRecord(f"{folder}/{job.id}.npz", path.stat().st_size, sha256_file(path))
                        new_files.append(
                            DataFile(
                                kind=kind,
                                task=job.task,
                                job_id=job.id,
                                path=record.path,
                                bytes=record.bytes,
                                sha256=record.sha256,
                            )
                        )
                for f in new_files:
                    files.add(f)
                spool = f"spool/{job.id}.spool"
                files.mark_purged(spool)  # consumed: the training data now lives only in the model
                to_delete.append(spool)
            previous = EvaluationRepository(session).latest_accuracies()
            probe_files = {f.task: f for f in files.live(kind=DataFileKind.PROBE)}
            probes = {name: self.probes.get(f.path) for name, f in probe_files.items()}
            accuracies = evaluate(predictor, probes, task_incremental=task_incremental)
            all_tasks = {t.name: t for t in tasks.list()}
            learned_now = [n for n, t in all_tasks.items() if t.state in (TaskState.LEARNED, TaskState.UNLEARNING)]
            if job.kind == JobKind.LEARN and task is not None:
                if task.state == TaskState.LEARNING:
                    task.state = TaskState.LEARNED
                task.learned_version, task.learned_at = self.strategy.version, now
                task.accuracy = accuracies.get(task.name)
            if job.kind == JobKind.UNLEARN and task is not None:
                to_delete += self._finish_unlearn(
                    session, job, task, probes, previous, accuracies, learned_now, job_metrics
                )
            # Relapse of every unlearned task still measured; count operations since each unlearn.
            relapses: dict[str, float] = {}
            for name, t in all_tasks.items():
                if name in accuracies and t.state not in (TaskState.UNLEARNED,):
                    t.accuracy = accuracies[name]
                if t.state != TaskState.UNLEARNED or (name == job.task and job.kind == JobKind.UNLEARN):
                    continue
                t.ops_since_unlearn += 1
                if name in accuracies and t.unlearned_accuracy is not None:
                    t.relapse = metrics.relapse(t.unlearned_accuracy, accuracies[name])
                    t.accuracy = accuracies[name]
                if t.relapse is not None:
                    relapses[name] = t.relapse
                if t.ops_since_unlearn >= self.settings.forget_probe_ops and name in probe_files:
                    to_delete += self._purge_files(session, [probe_files[name]], job, "forget_probe_ops reached")
            learned = [n for n, t in all_tasks.items() if t.state in (TaskState.LEARNED, TaskState.UNLEARNING)]
            unlearned = [n for n, t in all_tasks.items() if t.state == TaskState.UNLEARNED]
            for name, names in (("retain_accuracy", learned), ("forget_accuracy", unlearned)):
                values = [accuracies[n] for n in names if n in accuracies]
                if values:
                    job_metrics[name] = float(np.mean(values))
            if job.kind == JobKind.LEARN and job.task in accuracies:
                job_metrics["task_accuracy"] = accuracies[job.task]
            if not task_incremental:
                job_metrics.update(self._stream_metrics(jobs, learned, probes, accuracies))
            EvaluationRepository(session).add_rows(row.seq, accuracies)
            row.state, row.finished_at, row.progress = JobState.SUCCEEDED, now, 1.0
            row.model_version = self.strategy.version
            row.metrics = {k: v for k, v in job_metrics.items() if not math.isnan(v)}
            row.message = "succeeded"
            if job.kind == JobKind.UNLEARN and row.metrics.get("forget_verified") == 0.0:
                # The data is purged all the same (the request is honoured); the model may still know it.
                row.message = f"unlearned, forgetting NOT verified: {verdict(row.metrics)}"
            self.audit_log.append(
                session,
                principal=job.principal,
                action=f"{job.kind.value}.succeeded",
                task=job.task,
                job_id=job.id,
                details={
                    "model_version": self.strategy.version,
                    "metrics": row.metrics,
                    "files": [
                        {"path": f.path, "kind": f.kind.value, "bytes": f.bytes, "sha256": f.sha256} for f in new_files
                    ],
                },
            )
            states = {t.name: t.state for t in tasks.list()}
            retained = files.total_live_bytes()
            # Publish before the commit, so a client that sees SUCCEEDED can use the task at once;
            # if the commit fails, _fail restores the checkpointed model and republishes it. Only this
            # job's task changes state here: other tasks' states may be changing concurrently (an
            # accepted Unlearn) and must not be overwritten with what this transaction read earlier.
            self.serving.publish(predictor)
            self.serving.set_task_state(job.task, task.state if task is not None else None)
        # Older checkpoints hold what this job may have removed (an unlearned task): keep only the newest.
        newest = self.checkpoints.paths()
        if newest:
            self.checkpoints.prune(keep=newest[0])
        for relative in to_delete:
            purged = purge(self.data_dir, relative)
            self.probes.drop(relative)
            if purged is not None:
                self.telemetry.purged_bytes.inc(purged.bytes)
        self._publish_metrics(job, row.metrics, accuracies, states, relapses, retained, started)

    def _stream_metrics(
        self, jobs: JobRepository, learned: list[str], probes: dict[str, ProbeSet], accuracies: dict[str, float]
    ) -> dict[str, float]:
        """Class-incremental stream metrics: test accuracy pooled over the learned mega-batches' probe
        sets, and CER, the cumulative count of misclassified probe samples over all jobs so far."""
        sizes = {t: len(probes[t].labels) for t in learned if t in probes and t in accuracies}
        total = sum(sizes.values())
        if not total:
            return {}
        correct = sum(accuracies[t] / 100.0 * n for t, n in sizes.items())
        previous = jobs.last_succeeded()
        cer = (previous.metrics.get("cer", 0.0) if previous is not None else 0.0) + (total - correct)
        return {"test_accuracy": 100.0 * correct / total, "cer": round(cer, 6)}

    def _finish_unlearn(
        self,
        session: Session,
        job: Job,
        task: Task,
        probes: dict[str, ProbeSet],
        previous: dict[str, float],
        accuracies: dict[str, float],
        learned_now: list[str],
        job_metrics: dict[str, float],
    ) -> list[str]:
        files = DataFileRepository(session)
        reached_model = task.learned_version is not None
        now = utc_now()
        if not reached_model:
            # Its learn never ran (e.g. re-queued by a restart behind this unlearn): it never will.
            for learn in JobRepository(session).list(task=task.name, state=JobState.QUEUED, kind=JobKind.LEARN):
                learn.state, learn.finished_at = JobState.CANCELLED, now
                learn.message = "cancelled by an unlearn of its task before it reached the model"
                self.audit_log.append(
                    session,
                    principal=job.principal,
                    action="job.cancelled",
                    task=task.name,
                    job_id=learn.id,
                    details={"why": learn.message},
                )
        else:
            members, probe = self._forget_samples(session, task.name)
            predictor = self.strategy.predictor()
            incremental = self.strategy.task_incremental
            quality = forget_quality(
                predictor, task.name, members, probe, task_incremental=incremental, seed=self.settings.seed
            )
            job_metrics.update({k: v for k, v in quality.items() if not math.isnan(v)})
            check = self._verify(task.name, (members, probe))
            task.forget_verified = None if check is None else check.verified
            if check is not None:
                job_metrics.update(check.metrics)
                job_metrics.setdefault("forget_attempts", 1.0)
            if check is not None and not check.verified:
                self.audit_log.append(
                    session,
                    principal=job.principal,
                    action="unlearn.unverified",
                    task=task.name,
                    job_id=job.id,
                    details={"why": verdict(job_metrics), "metrics": check.metrics},
                )
            job_metrics["spill"] = metrics.spill(
                previous, accuracies, task.name, [n for n in learned_now if n != task.name]
            )
            if task.name in accuracies:
                job_metrics["forget_accuracy_task"] = accuracies[task.name]
                task.unlearned_accuracy = task.accuracy = accuracies[task.name]
            task.unlearned_version = self.strategy.version
        task.state, task.unlearned_at, task.updated_at, task.ops_since_unlearn = TaskState.UNLEARNED, now, now, 0
        # Relapse is measured while the probe set is kept; with forget_probe_ops = 0 it is unknown.
        measurable = task.unlearned_accuracy is not None and self.settings.forget_probe_ops > 0
        task.relapse = 0.0 if measurable else None
        # Right to be forgotten: every file of the task goes now, except its probe set, kept for
        # forget_probe_ops more operations to measure relapse (0 = purge it now as well).
        doomed = [
            f for f in files.live(task=task.name) if f.kind != DataFileKind.PROBE or self.settings.forget_probe_ops == 0
        ]
        deleted = self._purge_files(session, doomed, job, "unlearned")
        job_metrics["purged_bytes"] = float(sum(f.bytes for f in doomed))
        return deleted

    def _purge_files(self, session: Session, doomed: list[DataFile], job: Job, why: str) -> list[str]:
        if not doomed:
            return []
        files = DataFileRepository(session)
        for f in doomed:
            files.mark_purged(f.path)
        self.audit_log.append(
            session,
            principal=job.principal,
            action="data.purged",
            task=doomed[0].task,
            job_id=job.id,
            details={
                "why": why,
                "files": [{"path": f.path, "kind": f.kind.value, "bytes": f.bytes, "sha256": f.sha256} for f in doomed],
                "bytes": sum(f.bytes for f in doomed),
            },
        )
        return [f.path for f in doomed]

    # ------------------------------------------------------- failure paths
    def _fail(self, job: Job, message: str, started: float) -> None:
        to_delete: list[str] = []
        with self.sessions() as session, session.begin():
            row = JobRepository(session).get(job.id)
            assert row is not None
            row.state, row.finished_at, row.message = JobState.FAILED, utc_now(), message[:2000]
            self.audit_log.append(
                session,
                principal=job.principal,
                action=f"{job.kind.value}.failed",
                task=job.task,
                job_id=job.id,
                details={"error": message[:2000]},
            )
            task = TaskRepository(session).get_for_update(job.task)
            if task is not None and job.kind == JobKind.LEARN and task.state == TaskState.LEARNING:
                # The task never reached the model: drop its data and free the name for a retry.
                to_delete = self._purge_files(
                    session, DataFileRepository(session).live(task=task.name), job, "learn failed"
                )
                session.delete(task)
                task = None
            new_state = task.state if task is not None else None
        for path in to_delete:
            purge(self.data_dir, path)
        self.serving.set_task_state(job.task, new_state)
        self.telemetry.jobs_total.labels(job.kind.value, "failed").inc()
        self.telemetry.job_duration.labels(job.kind.value).observe(time.monotonic() - started)

    def _requeue(self, job: Job) -> None:
        with self.sessions() as session, session.begin():
            row = JobRepository(session).get(job.id)
            if row is not None:
                row.state, row.started_at, row.progress = JobState.QUEUED, None, 0.0
                row.message = "interrupted by shutdown; it runs again after restart"
        log.warning("job %s interrupted by shutdown and re-queued", job.id)

    # -------------------------------------------------------------- helpers
    def _sweep(self) -> None:
        """Delete files SQL says are purged, spools no job owns, and temporary leftovers."""
        with self.sessions() as session:
            files = DataFileRepository(session)
            live = {f.path for f in files.live()}
            purged = files.purged_paths()
        for path in purged:
            if (self.data_dir / path).exists():
                log.warning("deleting %s: purged in the database but still on disk (crash during purge)", path)
                purge(self.data_dir, path)
        for folder in ("spool", "probes", "members", "retained"):
            directory = self.data_dir / folder
            if not directory.is_dir():
                continue
            for file in directory.iterdir():
                relative = f"{folder}/{file.name}"
                if (relative not in live and folder == "spool") or file.suffix in (".partial", ".tmp"):
                    log.warning("deleting orphan %s (written before a crash, never recorded)", relative)
                    file.unlink(missing_ok=True)

    def _load_serving_state(self) -> None:
        with self.sessions() as session:
            states = {t.name: t.state for t in TaskRepository(session).list()}
            retained = DataFileRepository(session).total_live_bytes()
            relapses = {t.name: t.relapse for t in TaskRepository(session).list() if t.relapse is not None}
        self.serving.load_tasks(states)
        self.serving.publish(self.strategy.predictor())
        self.telemetry.model_version.set(self.strategy.version)
        self.telemetry.retained_bytes.set(retained)
        self.telemetry.record_relapse(relapses)

    def _publish_metrics(
        self,
        job: Job,
        job_metrics: dict[str, float],
        accuracies: dict[str, float],
        states: dict[str, TaskState],
        relapses: dict[str, float],
        retained: int,
        started: float,
    ) -> None:
        t = self.telemetry
        t.jobs_total.labels(job.kind.value, "succeeded").inc()
        t.job_duration.labels(job.kind.value).observe(time.monotonic() - started)
        t.model_version.set(self.strategy.version)
        t.record_accuracies(
            accuracies,
            [n for n, s in states.items() if s == TaskState.LEARNED],
            [n for n, s in states.items() if s == TaskState.UNLEARNED],
        )
        t.record_relapse(relapses)
        t.retained_bytes.set(retained)
        if job.kind == JobKind.UNLEARN and "spill" in job_metrics:
            t.unlearn_spill.observe(job_metrics["spill"] / 100.0)
            t.last_unlearn_spill.set(job_metrics["spill"] / 100.0)
        if "mia" in job_metrics:
            t.unlearn_mia.set(job_metrics["mia"] / 100.0)
        if job.kind == JobKind.UNLEARN and job_metrics.get("forget_verified") == 0.0:
            t.unverified_unlearns.inc()
