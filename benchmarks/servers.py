"""The one way benchmarks start servers: a subprocess on a free port, ready when its probe says so.

:class:`ServerProcess` runs any server command (``lethe serve``, a bare gRPC echo, MLServer) in
its own process group, on a port picked here, waits until a readiness probe passes (and fails with
the server's log if it exits first), records the time from process start to ready, reads the
resident memory of the whole process tree, and stops it cleanly (SIGTERM, then SIGKILL of the
group after a timeout). :func:`lethe_server` is ``python -m server`` (= ``lethe serve``) of this
checkout with dotted-key settings; :func:`bare_server` is a minimal grpcio server with only the
handlers a benchmark gives it, the floor any Python gRPC server pays.

Servers run as they are deployed, in their own processes, so they never share an interpreter lock
with the benchmark's clients. They read Python bytecode from a cache of their own
(``PYTHONPYCACHEPREFIX`` under :data:`CACHE_DIR`), as an installed package has compiled bytecode:
without it every start compiles torch from source, which this environment
(``PYTHONDONTWRITEBYTECODE``) would otherwise repeat on every start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from client import LetheClient

ROOT = Path(__file__).resolve().parents[1]
#: Where benchmarks keep what outlives a run: the bytecode cache, MLServer's environment.
CACHE_DIR = Path(os.environ.get("LETHE_BENCH_CACHE", Path.home() / ".cache" / "lethe-bench"))
#: Settings every benchmark server starts from: CPU, no auth, no metrics endpoint, the finetune strategy.
BASE_SETTINGS: dict[str, Any] = {
    "model.strategy": "finetune",
    "model.device": "cpu",
    "server.metrics_port": -1,
}
#: The gRPC service whose health status is Lethe's readiness.
LETHE_SERVICE = "lethe.v1.Lethe"
#: Resident memory is read from ``/proc``.
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ServerStartError(RuntimeError):
    """The server exited, or did not become ready in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(extra: Mapping[str, str] | None = None, *, pythonpath: Sequence[Path] = (ROOT,)) -> dict[str, str]:
    """The environment of a server process: this one, without ``LETHE_*`` settings, with ``pythonpath``
    first on the path (this checkout, whatever an installed ``lethe`` points at), a bytecode cache of its
    own and unbuffered output; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_") and k != "PYTHONDONTWRITEBYTECODE"}
    paths = [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(paths),
            "PYTHONPYCACHEPREFIX": str(CACHE_DIR / "pycache"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


#: Channel options of the readiness probes. A channel whose first connection is refused (the server is not
#: listening yet) waits out gRPC's reconnect backoff (1 s, then 1.6 s, ...) before it tries again, which
#: made a start that missed the first probe read up to 2.8 s slower than it was; a probe retries at once.
PROBE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def health_probe(target: str, service: str = LETHE_SERVICE) -> Callable[[], bool]:
    """A readiness probe: ``grpc.health.v1.Health/Check`` of ``service`` at ``target`` answers SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target, options=PROBE_CHANNEL_OPTIONS)
    stub = health_pb2_grpc.HealthStub(channel)

    def ready() -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return False
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            channel.close()
            return True
        return False

    return ready


class ServerProcess:
    """A server command in a subprocess of its own process group; see the module doc.

    Args:
        argv: the command.
        ready: the readiness probe, called every ``poll`` seconds until it returns True.
        log: where the server's stdout and stderr go.
        env: its environment (default :func:`server_env`).
        cwd: its working directory (default the repository root).
        timeout: seconds to wait for readiness.
        poll: seconds between probes.

    Attributes:
        ready_seconds: from just before the process was started to the first passing probe.

    Raises:
        ServerStartError: if the process exits before it is ready, or is not ready within ``timeout``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        ready: Callable[[], bool],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        timeout: float = 180,
        poll: float = 0.05,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env) if env is not None else server_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if self.process.poll() is not None:
                    raise ServerStartError(f"{self.argv[0]} exited with {self.process.returncode}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise ServerStartError(f"{self.argv[0]} not ready after {timeout:.0f} s:\n{self.tail()}")
                time.sleep(poll)
            self.ready_seconds = time.perf_counter() - started
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (MLServer's workers, say)."""
        return sum(_rss(pid) for pid in _process_tree(self.process.pid))

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL of the whole group after ``timeout``; the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind by a server that exited
        if self.process.poll() is None:
            self.process.wait(30)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------------------- Lethe


@dataclass
class LetheServer:
    """A running ``lethe serve`` and a client connected to it."""

    server: ServerProcess
    client: LetheClient
    target: str
    data_dir: Path


def lethe_argv(data_dir: Path, port: int, settings: Mapping[str, Any], *, database_url: str | None = None) -> list[str]:
    """``python -m server`` (= ``lethe serve``), ``--no-auth`` on ``127.0.0.1:port``, ``settings`` as ``--set``."""
    argv = [sys.executable, "-m", "server", "--no-auth", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--data-dir", str(data_dir)]
    if database_url:
        argv += ["--database-url", database_url]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def start_lethe(
    data_dir: Path,
    settings: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] = BASE_SETTINGS,
    database_url: str | None = None,
    timeout: float = 180,
    client_timeout: float = 120,
) -> LetheServer:
    """Start ``lethe serve`` of this checkout on a free port with ``base`` then ``settings``; wait until ready.

    Readiness is ``grpc.health.v1`` SERVING for ``lethe.v1.Lethe``. The log is ``server.log`` next to
    ``data_dir``. Pass ``base={}`` for a server at its own defaults.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    merged = {**base, **(settings or {})}
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = ServerProcess(
        lethe_argv(data_dir, port, merged, database_url=database_url),
        health_probe(target),
        data_dir.parent / f"{data_dir.name}-server.log",
        timeout=timeout,
    )
    max_bytes = int(merged.get("server.max_message_bytes", 16 << 20))
    client = LetheClient(target, retries=3, timeout=client_timeout, max_message_bytes=max_bytes)
    return LetheServer(server, client, target, data_dir)


def stop_lethe(running: LetheServer, timeout: float = 60) -> int | None:
    """Close the client, stop the server; its exit code."""
    running.client.close()
    return running.server.stop(timeout)


@contextlib.contextmanager
def lethe_server(
    data_dir: Path,
    settings: Mapping[str, Any] | None = None,
    **options: Any,
) -> Iterator[LetheServer]:
    """:func:`start_lethe` for the duration of a ``with`` block."""
    running = start_lethe(data_dir, settings, **options)
    try:
        yield running
    finally:
        stop_lethe(running)


@contextlib.contextmanager
def scratch_lethe_server(
    settings: Mapping[str, Any] | None = None, *, prefix: str = "lethe-bench-", **options: Any
) -> Iterator[LetheServer]:
    """:func:`lethe_server` with a data directory and SQLite database of its own, removed afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        lethe_server(Path(tmp) / "data", settings, **options) as running,
    ):
        yield running


# ------------------------------------------------------------------------------------ bare gRPC


#: ``lethe.v1.Lethe``: bare servers register their handlers under the real service name, so
#: :class:`LetheClient` talks to them unchanged.
SERVICE = LETHE_SERVICE


@contextlib.contextmanager
def bare_server(
    handlers: str,
    args: Sequence[Any] = (),
    *,
    threads: int,
    max_message_bytes: int,
    log_dir: Path | None = None,
) -> Iterator[LetheClient]:
    """A minimal grpcio server in a subprocess with only the handlers of ``lethe.v1.Lethe`` that
    ``handlers(*args)`` returns (``"module:function"``, a function returning method name → handler;
    ``args`` JSON-serializable).

    Same thread pool, message-size options and concurrency limit as the thread-pool gRPC server,
    but no interceptor, reflection or servicer (health only, for readiness). Yields a
    :class:`LetheClient` connected to it.
    """
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "benchmarks.servers", handlers, json.dumps(list(args)), "--port", str(port)]
    argv += ["--threads", str(threads), "--max-message-bytes", str(max_message_bytes)]
    with tempfile.TemporaryDirectory(prefix="bare-") as tmp:
        log = (log_dir or Path(tmp)) / f"bare-{port}.log"
        with ServerProcess(argv, health_probe(target, ""), log) as _server:
            client = LetheClient(target, retries=1, timeout=120, max_message_bytes=max_message_bytes)
            try:
                yield client
            finally:
                client.close()


def serve_bare(handlers: str, args: Sequence[Any], port: int, threads: int, max_message_bytes: int) -> None:
    """Run a bare server until SIGTERM (the child side of :func:`bare_server`)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    module, _, function = handlers.partition(":")
    build: Callable[..., Mapping[str, grpc.RpcMethodHandler]] = getattr(importlib.import_module(module), function)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bare-rpc"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, dict(build(*args)))],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=threads * 16,
    )
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    while not stopping:
        time.sleep(0.1)
    server.stop(grace=1).wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.servers MODULE:FUNCTION JSON_ARGS --port P --threads T --max-message-bytes M``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers", description="A bare gRPC server.")
    parser.add_argument("handlers", help="module:function returning method name -> grpc.RpcMethodHandler")
    parser.add_argument("args", help="JSON list of the function's arguments")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-message-bytes", type=int, default=16 << 20)
    a = parser.parse_args(argv)
    serve_bare(a.handlers, json.loads(a.args), a.port, a.threads, a.max_message_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
