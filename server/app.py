"""The one place where configuration becomes objects and they are wired together."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from protos import inference as oip
from server.audit_head import HEAD_FILE, AuditHeadPublisher, compare_with_database
from server.audit_key import load_or_create_audit_key, write_public_key
from server.config import Config
from server.data.blobs import BlobStore, open_blob_store
from server.data.sample_ids import SampleIdKey
from server.engine.protocol import LearnOptions, Strategy, supports_temporary
from server.engine.registry import build_strategy, resolve_device, strategy_options
from server.errors import FailedPreconditionError, UnavailableError
from server.jobs import (
    JobContext,
    JobEvents,
    JobService,
    QueueLimits,
    ServingState,
    Worker,
    WorkerSettings,
    on_outcome_commit,
)
from server.jobs.expiry import TemporaryExpiry
from server.jobs.proof import ProofService
from server.jobs.records import SampleRequests
from server.lease import (
    PRIMARY_SERVICE,
    STANDBY_POLL_SECONDS,
    FileLease,
    Lease,
    LeaseHeldError,
    LeaseKeeper,
    fence_commits,
    lease_for,
)
from server.replica import ReplicaFollower
from server.rpc import (
    SERVICE_NAME,
    AuthInterceptor,
    LearnDefaults,
    LetheServicer,
    ModelDescription,
    TokenTable,
    create_server,
)
from server.rpc.affinity import PollerFollower
from server.rpc.auth import RefusalLog
from server.rpc.batching import Batcher, intra_op_threads
from server.rpc.guard import CallGuard, method_limits
from server.rpc.inference import InferenceServicer
from server.rpc.predicting import PredictService, max_response_rows
from server.rpc.server import HealthServicer, Keepalive
from server.rpc.validation import SampleLimits
from server.storage import (
    AuditLog,
    SchemaError,
    check_schema,
    current_revision,
    make_engine,
    make_session_factory,
    mask_url,
    on_audit_commit,
    on_audit_head_commit,
    upgrade,
)
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

__version__ = "0.1.0"


def prepare_database(config: Config) -> Engine:
    """Open the database, initialize an empty one, and refuse a schema this version does not know.

    Raises:
        SchemaError: the schema is older (and ``storage.auto_upgrade`` is off) or unknown; the message
            names the command that upgrades it.
    """
    url = config.database_url
    engine = make_engine(url)
    if current_revision(engine) is None:
        log.info("initializing an empty database at %s", mask_url(url))
        upgrade(url)
    else:
        try:
            check_schema(engine)
        except SchemaError:
            if not config.storage.auto_upgrade:
                raise
            log.warning("upgrading the database schema at %s (storage.auto_upgrade)", mask_url(url))
            upgrade(url)
            check_schema(engine)
    return engine


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the configured PEM files; None for plaintext."""
    s = config.server
    if not s.tls_cert:
        return None
    pair = [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())]
    if s.tls_client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=Path(s.tls_client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


@dataclass
class Ports:
    """Where the server listens."""

    grpc: int
    metrics: int | None


def sample_forgetting_refusal(strategy: Strategy) -> str | None:
    """Why ``strategy``, as configured, cannot forget individual samples (None when it can)."""
    check = getattr(strategy, "sample_forgetting", None)
    if check is None:
        return f"strategy {strategy.name!r} cannot forget individual samples; unlearn the whole task instead"
    reason: str | None = check()
    return reason


class App:
    """The Lethe daemon: database, worker, gRPC server and metrics endpoint.

    Args:
        config: the validated configuration.
        registry: Prometheus registry (tests pass an isolated one); a fresh one by default.
        strategy_factory: builds the model (the seam where tests put named fakes such as a
            strategy that fails or trains slowly); by default :meth:`build_strategy`.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        strategy_factory: Callable[[], Strategy] | None = None,
    ) -> None:
        self.config = config
        self.strategy_factory = strategy_factory or self.build_strategy
        self.registry = registry or CollectorRegistry()
        self.data_dir = Path(config.storage.data_dir).resolve()
        self.engine: Engine | None = None
        self.server: aio.Server | None = None
        self.worker: Worker | None = None
        self.expiry: TemporaryExpiry | None = None
        self.health: HealthServicer | None = None
        #: The gRPC edge runs on this event loop, in its own thread; blocking work goes to ``executor``.
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="lethe-rpc-loop", daemon=True)
        #: Keeps gRPC's poller thread on the core the event loop runs on (see ``server.rpc.affinity``).
        self._poller = PollerFollower(self.loop)
        inference = config.model.inference_threads or config.model.torch_threads
        self.executor = ThreadPoolExecutor(
            max_workers=config.server.threads,
            thread_name_prefix="lethe-rpc",
            initializer=functools.partial(intra_op_threads, inference) if inference else None,
        )
        self.ports = Ports(0, None)
        self.telemetry: Telemetry | None = None
        self.audit_head: AuditHeadPublisher | None = None
        self._metrics_server: Any = None
        self.lease: Lease | None = None
        #: Where spools, task data and checkpoints are (``storage.blob_url``), once started.
        self.blobs: BlobStore | None = None
        #: Set when the lease was lost to another server (``lethe serve`` then exits with 3).
        self.lease_lost = False
        #: Set once :meth:`stop` has finished.
        self.stopped = threading.Event()
        self._stopping = threading.Event()
        self._lease_keeper: LeaseKeeper | None = None
        self._follower: ReplicaFollower | None = None

    def learn_defaults(self, strategy: Strategy) -> LearnOptions:
        """What a Learn header's zero fields become: the training section, then the strategy's own."""
        t = self.config.training
        configured = LearnOptions(
            epochs=t.epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            holdout_fraction=t.holdout_fraction,
            seed=self.config.model.seed,
        )
        return configured.resolved(strategy.learn_defaults)

    def build_strategy(self) -> Strategy:
        """A fresh strategy exactly as configured (also used to restore after a failed job)."""
        m = self.config.model
        options: dict[str, Any] = {"cifar_stem": m.cifar_stem, "width": m.width}
        if "retain_training_data" in strategy_options(m.strategy):
            options["retain_training_data"] = self.config.training.retain_training_data
        return build_strategy(
            m.strategy,
            backbone=m.backbone,
            input_shape=tuple(m.input_shape),
            num_classes=m.num_classes,
            device=resolve_device(m.device),
            seed=m.seed,
            options={**options, **m.options},
        )

    def sample_id_key(self) -> SampleIdKey:
        """The HMAC key of sample ids (``storage.sample_id_key_file``, default under the data directory)."""
        configured = self.config.storage.sample_id_key_file
        return SampleIdKey(Path(configured) if configured else self.data_dir / "keys" / "sample-ids.key")

    def start(self) -> Ports:
        """Open storage, load the model, start serving; return the bound ports."""
        c = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if c.model.torch_threads:
            torch.set_num_threads(c.model.torch_threads)
        if not c.database_url.startswith("postgresql") and c.server.role == "primary":
            self._lock_data_dir()  # before anything is read or migrated
        self.engine = prepare_database(c)
        sessions = make_session_factory(self.engine)
        lease = self.lease = self.lease or lease_for(self.engine, self.data_dir, c.server.lease_ttl_seconds)
        fence_commits(sessions, lease)
        blobs = self.blobs = open_blob_store(c.storage.blob_url, self.data_dir, sessions)  # writes fenced too
        log.info("blobs (spools, task data, checkpoints) are in %s", blobs.description)
        telemetry = self.telemetry = Telemetry(
            self.registry, max_task_series=c.telemetry.max_task_series, version=__version__
        )
        on_audit_commit(sessions, lambda action: telemetry.audit_events.labels(action).inc())
        on_outcome_commit(sessions, lambda kind, outcome: telemetry.jobs_total.labels(kind, outcome).inc())
        key = load_or_create_audit_key(c.audit_key_file, create=not c.audit.signing_key_file)
        write_public_key(self.data_dir, key)
        audit_log = AuditLog(signer=key)
        with sessions() as session:
            stored_head = AuditLog.head(session)
        publisher = self.audit_head = AuditHeadPublisher(
            self.data_dir / HEAD_FILE, key.public_key, telemetry, stored_head
        )
        on_audit_head_commit(sessions, publisher.publish)
        events, serving, sample_key = JobEvents(), ServingState(), self.sample_id_key()
        context = JobContext(
            self.strategy_factory,
            sessions,
            events,
            serving,
            telemetry,
            WorkerSettings(
                data_dir=self.data_dir,
                seed=c.model.seed,
                max_probe_samples=c.training.max_probe_samples,
                forget_probe_ops=c.training.forget_probe_ops,
                forget_tolerance=c.training.forget_tolerance,
                forget_max_attempts=c.training.forget_max_attempts,
            ),
            audit_log=audit_log,
            sample_key=sample_key,
            blobs=blobs,
        )
        self.worker = Worker(context, on_fatal=self._worker_died)
        strategy = self.worker.strategy
        worker = self.worker
        telemetry.worker_up.set_function(lambda: float(worker.alive))
        telemetry.model_parameters.set_function(lambda: float(worker.strategy.parameter_count()))
        device = str(resolve_device(c.model.device))
        telemetry.build_info.info(
            {"version": __version__, "strategy": c.model.strategy, "backbone": c.model.backbone, "device": device}
        )
        jobs = JobService(
            sessions,
            self.data_dir,
            events,
            serving,
            QueueLimits(c.limits.max_queued_jobs, c.limits.max_tasks, max_temporary_tasks=c.limits.max_temporary_tasks),
            audit_log=audit_log,
            sample_key=sample_key,
            blobs=blobs,
        )
        telemetry.job_queue_depth.set_function(jobs.queue_depth)
        telemetry.job_queue_limit.set(c.limits.max_queued_jobs)
        telemetry.count_tasks_with(serving.counts)
        model = ModelDescription(
            strategy=c.model.strategy,
            backbone=c.model.backbone,
            input_shape=tuple(c.model.input_shape),
            num_classes=c.model.num_classes,
            parameters=lambda: worker.strategy.parameter_count(),
            task_incremental=strategy.task_incremental,
            supports_temporary=supports_temporary(strategy),
            unlearn_methods=tuple(strategy.unlearn_methods),
            device=device,
            config={str(k): str(v) for k, v in c.model.options.items()},
        )
        defaults = LearnDefaults(
            options=self.learn_defaults(strategy),
            max_stream_bytes=c.limits.max_stream_bytes,
            max_stream_samples=c.limits.max_stream_samples,
            max_predict_samples=c.limits.max_predict_samples,
            max_forget_samples=c.limits.max_forget_samples,
            temporary_ttl_seconds=c.limits.temporary_ttl_seconds,
        )
        proofs = ProofService(sessions, audit_log, key, lambda: publisher.current)
        records = SampleRequests(jobs, sample_forgetting_refusal(strategy), strategy.unlearn_methods[0])
        s = c.server

        def batched(rows: int, requests: int) -> None:
            telemetry.predict_batch_rows.observe(rows)
            telemetry.predict_batch_requests.observe(requests)

        ready = threading.Event()
        predictions = PredictService(
            serving,
            task_incremental=strategy.task_incremental,
            strategy=c.model.strategy,
            samples=SampleLimits(tuple(c.model.input_shape), c.model.num_classes),
            max_rows=max_response_rows(c.limits.max_predict_samples, c.model.num_classes, s.max_message_bytes),
            batcher=Batcher(
                self.executor,
                max_batch_size=s.max_batch_size,
                max_batch_delay_ms=s.max_batch_delay_ms,
                on_batch=batched,
            ),
            ready=ready.is_set,
        )
        guard = CallGuard(telemetry, method_limits(s.threads))
        inference = InferenceServicer(predictions, guard, server_version=__version__)
        servicer = LetheServicer(
            jobs,
            serving,
            telemetry,
            model,
            defaults,
            predictions=predictions,
            executor=self.executor,
            guard=guard,
            proofs=proofs,
            records=records,
        )
        if c.auth.enabled:
            tokens: TokenTable | None = TokenTable(c.auth.tokens)
        else:
            tokens = None
            log.warning(
                "AUTHENTICATION IS DISABLED (--no-auth): anyone who can reach the port can learn, unlearn "
                "and read everything"
            )

        def audit_refusal(method: str, code: str, principal: str, suppressed: int) -> None:
            def write() -> None:
                try:
                    jobs.audit(
                        principal or "unauthenticated", "auth.denied", method=method, code=code, suppressed=suppressed
                    )
                except Exception:  # an audit row of a refusal is not worth failing anything for
                    log.exception("could not audit a refused call")

            self.executor.submit(write)

        refusals = RefusalLog(audit_refusal, c.audit.denied_per_minute)

        def denied(method: str, code: str, principal: str) -> None:
            telemetry.grpc_requests.labels(method, code).inc()
            telemetry.auth_denied.labels(code).inc()
            refusals.refused(method, code, principal)

        def undecodable(method: str) -> None:
            telemetry.grpc_requests.labels(method, "INVALID_ARGUMENT").inc()

        auth = AuthInterceptor(tokens, on_denied=denied, on_undecodable=undecodable)
        self._loop_thread.start()
        self.server, port = self._on_loop(
            self._serve(
                servicer,
                auth,
                address=f"{s.host}:{s.port}",
                max_message_bytes=s.max_message_bytes,
                keepalive=Keepalive(s.keepalive_time_s, s.keepalive_timeout_s, s.keepalive_min_ping_interval_s),
                max_concurrent_rpcs=s.threads * 256,
                extra_handlers=(inference.handler(),),
                extra_services=(oip.SERVICE_NAME,),
                credentials=server_credentials(c),
            )
        )
        self.ports.grpc = port
        self.loop.call_soon_threadsafe(self._poller.start)
        if c.server.metrics_port >= 0:
            self._metrics_server, _thread = start_http_server(
                c.server.metrics_port, addr=c.server.metrics_host, registry=self.registry
            )
            self.ports.metrics = self._metrics_server.server_port

        def become_primary() -> None:
            """With the lease held: check the audit head, recover, run the queue, report ready."""
            jobs.refuse_writes = None
            telemetry.set_role("primary")
            with sessions() as session:
                stored = AuditLog.head(session)
                problem = compare_with_database(self.data_dir / HEAD_FILE, session, key.public_key)
            if problem is not None:
                # Recorded in the signed chain itself, before anything else appends (and rewrites the file).
                log.error("AUDIT HEAD MISMATCH: %s; run lethe audit verify --public-key", problem.problem)
                details = {**problem.details(), "database_head_seq": stored.seq}
                with sessions.begin() as session:
                    audit_log.append(session, principal="system", action="audit.head_mismatch", details=details)
            else:
                publisher.publish(stored)  # a standby's head is the one its predecessor left
            assert self.worker is not None
            self.worker.recover()
            jobs.mark_ready()
            self.worker.start()
            self.expiry = TemporaryExpiry(jobs)
            self.expiry.start()
            self._lease_keeper = LeaseKeeper(lease, c.server.lease_ttl_seconds, self._lease_lost)
            self._lease_keeper.start()
            jobs.audit(
                "system",
                "server.started",
                version=__version__,
                model_version=self.worker.strategy.version,
                audit_key=key.public_key.fingerprint,
                lease_epoch=lease.epoch,
            )
            self.set_health(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            self.set_health(PRIMARY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            ready.set()
            telemetry.ready.set(1)
            log.info("lethe serving on %s:%d (metrics %s)", c.server.host, port, self.ports.metrics)

        if c.server.role == "replica":
            self._follow(sessions, jobs, predictions, ready)
        elif lease.epoch or lease.try_acquire():
            become_primary()
        else:
            primary = lease.holder()
            jobs.refuse_writes = predictions.not_ready = lambda: UnavailableError(
                f"this server is a hot standby; the primary is {primary}: send requests there",
                reason="NOT_PRIMARY",
                retry_after=1.0,
            )
            telemetry.set_role("standby")
            log.warning(
                "STANDBY: the primary lease is held by %s; this server takes over when it is released "
                "or not renewed for %.0f s",
                primary,
                c.server.lease_ttl_seconds,
            )
            threading.Thread(target=self._stand_by, args=(become_primary,), name="lethe-standby", daemon=True).start()
        return self.ports

    def _lock_data_dir(self) -> None:
        """SQLite: take the data directory's lock, or refuse to start naming who holds it."""
        lease = FileLease(self.data_dir)
        if not lease.try_acquire():
            raise LeaseHeldError(
                f"the data directory {self.data_dir} is in use by another lethe serve ({lease.holder()}); "
                "a SQLite server has one process per data directory (PostgreSQL allows a hot standby)"
            )
        self.lease = lease

    def _follow(
        self, sessions: sessionmaker[Session], jobs: JobService, predictions: PredictService, ready: threading.Event
    ) -> None:
        """A read replica: no worker, no lease; Predict from the primary's committed models."""
        assert self.worker is not None and self.lease is not None and self.telemetry is not None
        lease, telemetry = self.lease, self.telemetry
        jobs.refuse_writes = lambda: FailedPreconditionError(
            f"this server is a read replica (Predict only); send writes to the primary, {lease.holder()}",
            reason="READ_REPLICA",
        )
        predictions.not_ready = lambda: UnavailableError(
            "this read replica cannot follow the primary right now (no model yet, or the database is away): "
            "retry shortly or ask another server",
            reason="REPLICA_BEHIND",
            retry_after=1.0,
        )
        telemetry.set_role("replica")

        def on_ready(now_ready: bool) -> None:
            (ready.set if now_ready else ready.clear)()
            telemetry.ready.set(1 if now_ready else 0)
            status = health_pb2.HealthCheckResponse.SERVING if now_ready else health_pb2.HealthCheckResponse.NOT_SERVING
            self.set_health(SERVICE_NAME, status)
            log.info("replica %s (model version %d)", "ready" if now_ready else "NOT ready: behind", follower.version)

        assert self.blobs is not None
        follower = ReplicaFollower(sessions, self.blobs, self.worker.strategy, predictions.serving, on_ready)
        self._follower = follower
        follower.start()
        log.info("lethe read replica on %s:%d", self.config.server.host, self.ports.grpc)

    def _stand_by(self, become_primary: Callable[[], None]) -> None:
        """Try to take the lease every second until it is taken (then serve as primary) or the server stops."""
        assert self.lease is not None
        while not self._stopping.is_set():
            try:
                taken = self.lease.try_acquire()
            except Exception as exc:  # the database is away: try again
                log.warning("standby: could not try the lease (%s)", exc)
                taken = False
            if taken and not self._stopping.is_set():
                log.warning("taking over as primary (lease epoch %d)", self.lease.epoch)
                try:
                    become_primary()
                except Exception:
                    log.critical("could not take over as primary; stopping", exc_info=True)
                    self._stop_in_background()
                return
            self._stopping.wait(STANDBY_POLL_SECONDS)

    def _lease_lost(self) -> None:
        """The lease was lost (another server took over): stop at once, writing nothing more."""
        epoch = self.lease.epoch if self.lease is not None else 0
        log.critical("LOST THE PRIMARY LEASE (epoch %d): another server took over; stopping", epoch)
        self.lease_lost = True
        self.set_health(PRIMARY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.set_health(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.telemetry is not None:
            self.telemetry.ready.set(0)
        self._stop_in_background()

    def _stop_in_background(self) -> None:
        threading.Thread(target=self.stop, args=(0.0,), name="lethe-stop", daemon=True).start()

    def _worker_died(self, error: BaseException) -> None:
        """The worker could not record how a job ended and stopped: stop reporting ready."""
        log.critical("the worker stopped (%s); the server is NOT ready until it is restarted", error)
        self.set_health(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.set_health(PRIMARY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.telemetry is not None:
            self.telemetry.ready.set(0)

    async def _serve(self, servicer: LetheServicer, auth: AuthInterceptor, **options: Any) -> tuple[aio.Server, int]:
        """On the loop: build the health service and the server, bind, start."""
        self.health = HealthServicer()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(PRIMARY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        server, port = create_server(servicer, self.health, auth, **options)
        await server.start()
        return server, port

    def _run_loop(self) -> None:
        """The event loop's thread: forward passes it runs inline use one intra-op thread (see ``batching``)."""
        intra_op_threads(1)
        self.loop.run_forever()

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the edge's event loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def set_health(self, service: str, status: int) -> None:
        """Set a health status from any thread (no-op before the server exists or after the loop ended)."""
        health = self.health
        if health is None or not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(health.set(service, status), self.loop)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: readiness NOT_SERVING, refuse new RPCs, finish in-flight ones, stop the worker."""
        grace = self.config.server.grace_seconds if grace is None else grace
        self._stopping.set()
        self.set_health(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.set_health(PRIMARY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.telemetry is not None:
            self.telemetry.ready.set(0)
        if self.expiry is not None:
            self.expiry.stop()
        if self.worker is not None:
            self.worker.request_stop(grace)
        if self.server is not None and self.loop.is_running():  # stop() may be called again
            self._on_loop(self.server.stop(grace))
        self.server = None
        if self.worker is not None:
            # A training step in progress ends at its next progress report after the deadline.
            self.worker.join(grace + 60)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self._poller.stop)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(10)
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._follower is not None:
            self._follower.stop()
        if self._lease_keeper is not None:
            self._lease_keeper.stop()
        if self.lease is not None:
            self.lease.release()
        if self.engine is not None:
            self.engine.dispose()
        self.stopped.set()
        log.info("lethe stopped")

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        if self.server is not None and self.loop.is_running():
            self._on_loop(self.server.wait_for_termination())
