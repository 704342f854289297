"""Every Prometheus metric the server exports, in one place, on an injected registry.

Names follow DESIGN.md section 5: prefix ``lethe_``, base units (seconds, bytes), ratios in 0..1.
Per-task series are capped by ``max_task_series`` so a tenant-per-task deployment cannot explode
cardinality: tasks beyond the cap are not given their own series.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_RATIO_BUCKETS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
TASK_STATES = ("learning", "learned", "temporary", "unlearning", "unlearned")
JOB_KINDS = ("learn", "unlearn", "commit")


#: The roles ``lethe_role`` reports.
ROLES = ("primary", "standby", "replica")


class Telemetry:
    """The server's metrics. Create one per server with its own registry (tests use isolated ones)."""

    def __init__(self, registry: CollectorRegistry, *, max_task_series: int = 100, version: str = "0") -> None:
        self.registry = registry
        self.max_task_series = max_task_series
        #: Gauge → tasks that have a series in it (a task counts against the cap while it has any).
        self._task_series: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        r = registry
        self.build_info = Info("lethe_build", "Lethe build and model configuration", registry=r)
        self.build_info.info({"version": version})
        self.model_version = Gauge("lethe_model_version", "Version of the published model", registry=r)
        self.model_parameters = Gauge(
            "lethe_model_parameters",
            "Trainable parameters of the live model (changes when capacity grows or prunes hidden layers)",
            registry=r,
        )
        self.ready = Gauge(
            "lethe_ready", "1 while the readiness check (health service lethe.v1.Lethe) reports SERVING", registry=r
        )
        self.worker_up = Gauge("lethe_worker_up", "1 while the worker thread that runs jobs is alive", registry=r)
        self.role = Gauge(
            "lethe_role",
            "1 for this server's role: primary (holds the lease) or standby (waits for it)",
            ["role"],
            registry=r,
        )
        self.tasks = Gauge("lethe_tasks", "Tasks by state", ["state"], registry=r)
        self.jobs_total = Counter("lethe_jobs", "Finished jobs by kind and outcome", ["kind", "outcome"], registry=r)
        self.job_duration = Histogram(
            "lethe_job_duration_seconds", "Job run time", ["kind"], buckets=_DURATION_BUCKETS, registry=r
        )
        self.job_queue_wait = Histogram(
            "lethe_job_queue_wait_seconds",
            "Time from queued to running",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.job_queue_depth = Gauge("lethe_job_queue_depth", "Jobs waiting in the queue", registry=r)
        self.job_queue_limit = Gauge(
            "lethe_job_queue_limit",
            "Queued jobs allowed (limits.max_queued_jobs); beyond it RESOURCE_EXHAUSTED",
            registry=r,
        )
        self.task_accuracy = Gauge("lethe_task_accuracy_ratio", "Latest probe accuracy per task", ["task"], registry=r)
        self.retain_accuracy = Gauge("lethe_retain_accuracy_ratio", "Mean accuracy over learned tasks", registry=r)
        self.forget_accuracy = Gauge("lethe_forget_accuracy_ratio", "Mean accuracy over unlearned tasks", registry=r)
        self.unlearn_spill = Histogram(
            "lethe_unlearn_spill_ratio", "Spill of each unlearn", buckets=_RATIO_BUCKETS, registry=r
        )
        self.last_unlearn_spill = Gauge("lethe_last_unlearn_spill_ratio", "Spill of the latest unlearn", registry=r)
        self.task_relapse = Gauge("lethe_task_relapse_ratio", "Relapse per unlearned task", ["task"], registry=r)
        self.max_relapse = Gauge("lethe_max_relapse_ratio", "Largest relapse over unlearned tasks", registry=r)
        self.unlearn_mia = Gauge(
            "lethe_unlearn_mia_ratio", "Membership-inference accuracy of the latest unlearn", registry=r
        )
        self.unverified_unlearns = Counter(
            "lethe_unverified_unlearns",
            "Unlearns whose forgetting was not verified (the forgotten task still measures off its reference)",
            registry=r,
        )
        self.forgotten_samples = Counter(
            "lethe_forgotten_samples", "Samples forgotten by records-level unlearns", registry=r
        )
        self.predict_latency = Histogram(
            "lethe_predict_latency_seconds", "Predict latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.grpc_requests = Counter(
            "lethe_grpc_requests", "gRPC requests by method and status code", ["method", "code"], registry=r
        )
        self.auth_denied = Counter(
            "lethe_auth_denied",
            "Calls refused for a missing or invalid token, or a missing scope",
            ["code"],
            registry=r,
        )
        for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.auth_denied.labels(code)
        self.predict_batch_rows = Histogram(
            "lethe_predict_batch_rows",
            "Rows per forward pass of dynamic batching (Predict, PredictStream, ModelInfer)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 8192),
            registry=r,
        )
        self.predict_batch_requests = Histogram(
            "lethe_predict_batch_requests",
            "Requests joined into one forward pass by dynamic batching",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.ingest_bytes = Counter("lethe_ingest_bytes", "Bytes accepted by Learn", registry=r)
        self.ingest_samples = Counter("lethe_ingest_samples", "Samples accepted by Learn", registry=r)
        self.retained_bytes = Gauge("lethe_retained_data_bytes", "Bytes of task data kept on disk", registry=r)
        self.purged_bytes = Counter("lethe_purged_data_bytes", "Bytes of task data purged", registry=r)
        self.audit_events = Counter("lethe_audit_events", "Audit events by action", ["action"], registry=r)
        self.audit_head = Gauge(
            "lethe_audit_head",
            "Seq of the newest committed audit event; its hash, the head signature and the key fingerprint as labels",
            ["hash", "signature", "key"],
            registry=r,
        )
        self._audit_head_labels: tuple[str, str, str] | None = None
        for state in TASK_STATES:
            self.tasks.labels(state).set(0)
        for kind in JOB_KINDS:
            self.job_duration.labels(kind)
            self.job_queue_wait.labels(kind)
            for outcome in ("succeeded", "failed", "cancelled"):
                self.jobs_total.labels(kind, outcome)
        for gauge in (self.retain_accuracy, self.forget_accuracy, self.last_unlearn_spill, self.unlearn_mia):
            gauge.set(math.nan)
        self.max_relapse.set(0)

    def set_role(self, role: str) -> None:
        """``lethe_role{role}`` = 1 for ``role``, 0 for the others."""
        for name in ROLES:
            self.role.labels(name).set(1.0 if name == role else 0.0)

    def record_audit_head(self, seq: int, head_hash: str, signature: str, key: str) -> None:
        """Publish the signed audit head as ``lethe_audit_head{hash, signature, key} = seq``.

        One series at any time: the previous head's series is removed, not kept, so the cardinality
        is 1 however long the log grows. Each scrape that sees a new head starts a new series in
        Prometheus (churn bounded by the scrape rate, not by the number of events), and every stored
        sample is a self-contained signed head that anyone with the public key can check against the
        database later: the point of publishing it outside the database. For a continuous series
        of the seq, aggregate the labels away: ``max without (hash, signature, key) (lethe_audit_head)``.
        """
        labels = (head_hash, signature, key)
        with self._lock:
            if self._audit_head_labels is not None and self._audit_head_labels != labels:
                with contextlib.suppress(KeyError):
                    self.audit_head.remove(*self._audit_head_labels)
            self.audit_head.labels(*labels).set(seq)
            self._audit_head_labels = labels

    def _tracked(self, gauge: Gauge, task: str) -> bool:
        """Whether ``task`` may have a series in ``gauge`` (registers it while under the cap)."""
        with self._lock:
            series = self._task_series.setdefault(gauge._name, set())
            holders = set().union(*self._task_series.values())  # the cap counts tasks, not series
            if task not in holders and len(holders) >= self.max_task_series:
                return False
            series.add(task)
            return True

    def count_tasks_with(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Read ``lethe_tasks{state}`` from ``counts()`` at every scrape (always current, no bookkeeping)."""

        def reader(state: str) -> Callable[[], float]:
            return lambda: float(counts().get(state, 0))

        for state in TASK_STATES:
            self.tasks.labels(state).set_function(reader(state))

    def _release(self, gauge: Gauge, keep: Iterable[str]) -> None:
        """Drop ``gauge``'s series of tasks not in ``keep``, freeing their slots under the cap.

        Without this, a long-lived server that saw ``max_task_series`` tasks would give every new
        task no series at all.
        """
        kept = set(keep)
        with self._lock:
            series = self._task_series.setdefault(gauge._name, set())
            for task in series - kept:
                with contextlib.suppress(KeyError):
                    gauge.remove(task)
            series &= kept

    def record_accuracies(
        self, accuracies: Mapping[str, float], learned: Iterable[str], unlearned: Iterable[str]
    ) -> None:
        """Publish per-task accuracy (percent in, ratio out), RA and FA after a job."""
        self._release(self.task_accuracy, accuracies)
        for task, acc in accuracies.items():
            if self._tracked(self.task_accuracy, task):
                self.task_accuracy.labels(task).set(acc / 100.0)
        learned_acc = [accuracies[t] for t in learned if t in accuracies]
        forgot_acc = [accuracies[t] for t in unlearned if t in accuracies]
        self.retain_accuracy.set(sum(learned_acc) / len(learned_acc) / 100.0 if learned_acc else math.nan)
        self.forget_accuracy.set(sum(forgot_acc) / len(forgot_acc) / 100.0 if forgot_acc else math.nan)

    def record_relapse(self, relapses: Mapping[str, float]) -> None:
        """Publish relapse per unlearned task (points in, ratio out) and the maximum."""
        self._release(self.task_relapse, relapses)
        for task, value in relapses.items():
            if self._tracked(self.task_relapse, task):
                self.task_relapse.labels(task).set(value / 100.0)
        finite = [v for v in relapses.values() if not math.isnan(v)]
        self.max_relapse.set(max(finite) / 100.0 if finite else 0.0)
