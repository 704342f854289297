"""Helpers shared by the integration tests: digits tasks, an in-process server on port 0, and `lethe serve`
processes (at the server's defaults, or the fast test model)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from client import LetheClient
from client.datasets import load_digits
from server.app import App
from server.config import Config, load_config
from server.engine.protocol import Strategy

ROOT = Path(__file__).resolve().parents[1]

#: A small, fast model for the digits: mlp, few epochs.
FAST = {
    "model.strategy": "finetune",
    "model.backbone": "mlp",
    "model.width": 64,
    "model.device": "cpu",
    "training.epochs": 8,
    "training.batch_size": 32,
    "training.holdout_fraction": 0.2,
    "server.port": 0,
    "server.metrics_port": 0,
    "auth.enabled": False,
}


def digits(classes: list[int], permute: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [n,1,8,8] float32 and labels of the digits of ``classes``."""
    data = load_digits().select(classes)
    if permute is not None:
        data = data.permute_pixels(permute)
    return data.inputs, data.labels


def make_config(data_dir: Path, database_url: str, **overrides: Any) -> Config:
    """A test configuration: FAST defaults plus ``overrides`` (dotted keys)."""
    settings: dict[str, Any] = {**FAST, "storage.data_dir": str(data_dir), "storage.database_url": database_url}
    settings.update(overrides)
    return load_config(env={}, overrides=settings)


@dataclass
class Running:
    """An in-process server and a client connected to it."""

    app: App
    client: LetheClient
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_app(
    config: Config, token: str | None = None, strategy_factory: Callable[[], Strategy] | None = None
) -> Iterator[Running]:
    """Start an App on port 0 (with a named fake model if given), yield it with a client, stop it afterwards."""
    app = App(config, registry=CollectorRegistry(), strategy_factory=strategy_factory)
    ports = app.start()
    client = LetheClient(f"127.0.0.1:{ports.grpc}", token=token, retries=3, timeout=30)
    try:
        yield Running(app, client, ports.grpc)
    finally:
        client.close()
        app.stop(grace=5)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(target: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Wait until the server at ``target`` reports readiness SERVING; fail with its log if it exits."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="lethe.v1.Lethe"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def _file_size_limit(limit: int):  # type: ignore[no-untyped-def]
    """A preexec function capping every file the child writes at ``limit`` bytes (a full disk, as seen by
    ``write``: EFBIG); SIGXFSZ is ignored so the write fails instead of killing the process."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


class ServerProcess:
    """``lethe serve`` in a subprocess, for kill -9 and signal tests."""

    def __init__(
        self, data_dir: Path, database_url: str, *extra: str, port: int | None = None, max_file_bytes: int = 0
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log = data_dir.parent / f"server-{self.port}.log"
        settings = {**FAST, "server.port": self.port, "server.metrics_port": -1}
        args = [
            sys.executable,
            "-m",
            "server",
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            "--no-auth",
        ]
        for key, value in settings.items():
            if key not in ("auth.enabled",):
                args += ["--set", f"{key}={value}"]
        args += list(extra)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_file_size_limit(max_file_bytes) if max_file_bytes else None,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until readiness reports SERVING."""
        wait_ready(self.target, self.process, self.log, timeout)

    def kill(self) -> None:
        """SIGKILL, no cleanup at all."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@dataclass
class DeployedServer:
    """A ``lethe serve`` process at the server's defaults and a client connected to it."""

    process: subprocess.Popen[bytes]
    client: LetheClient
    target: str
    log: Path


def _listening_target(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The ``host:port`` a ``lethe serve --port 0`` printed, read from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"^lethe listening on (\S+):(\d+)$", log.read_text(errors="replace"), re.MULTILINE)
        if found:
            return f"{found.group(1)}:{found.group(2)}"
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"server printed no port after {timeout} s:\n{log.read_text()[-3000:]}")


def start_deployed(data_dir: Path, *settings: str, timeout: float = 120, auth: bool = False) -> DeployedServer:
    """Start ``lethe serve`` as a user would, in a fresh process: every setting at its default except
    ``--no-auth`` (every scope; with ``auth`` authentication stays on and ``settings`` name the tokens),
    port 0, a free metrics port, SQLite under ``data_dir``, and ``settings`` (``"model.seed=1"``, ... passed
    as ``--set``). No ``LETHE_*`` variable of the test's environment reaches it; torch threads, width,
    epochs and strategy are the defaults. Wait until it serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "server.log"
    args = [sys.executable, "-m", "server", "--data-dir", str(data_dir), "--port", "0", "--metrics-port", "0"]
    if not auth:
        args.append("--no-auth")
    for setting in settings:
        args += ["--set", setting]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")} | {"PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        target = _listening_target(process, log, timeout)
        wait_ready(target, process, log, timeout)
    except BaseException:
        stop_deployed_process(process)
        raise
    return DeployedServer(process, LetheClient(target, retries=3, timeout=60), target, log)


def stop_deployed_process(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM (a graceful drain), SIGKILL if it does not exit within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def stop_deployed(server: DeployedServer) -> None:
    """Close the client and stop the server process."""
    server.client.close()
    stop_deployed_process(server.process)


@contextlib.contextmanager
def deployed_server(
    data_dir: Path, *settings: str, timeout: float = 120, auth: bool = False
) -> Iterator[DeployedServer]:
    """:func:`start_deployed` for the duration of a ``with`` block."""
    server = start_deployed(data_dir, *settings, timeout=timeout, auth=auth)
    try:
        yield server
    finally:
        stop_deployed(server)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-class recall in percent over the classes present in ``labels`` (chance: 100 / classes)."""
    classes = np.unique(labels)
    return float(100.0 * np.mean([np.mean(predicted[labels == c] == c) for c in classes]))
