"""Helpers shared by the integration tests: digits tasks and an in-process server on port 0."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from client import LetheClient
from client.datasets import load_digits
from server.app import App
from server.config import Config, load_config

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
def running_app(config: Config, token: str | None = None) -> Iterator[Running]:
    """Start an App on port 0, yield it with a client, stop it afterwards."""
    app = App(config, registry=CollectorRegistry())
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
