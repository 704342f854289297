"""A short scripted tour: start a server, learn three digit tasks, unlearn one, show the tables.

Run with ``make demo``. It starts its own daemon (finetune strategy unless ``--strategy`` is given)
on a free port with a temporary data directory, and stops it at the end.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LetheClient, pb
from client.cli import print_job, print_tasks
from client.datasets import load_digits

TASKS = {"digits-0-1": [0, 1], "digits-2-3": [2, 3], "digits-4-5": [4, 5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(target: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="lethe.v1.Lethe"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    raise SystemExit("the server did not become ready")


def accuracy_table(client: LetheClient, holdout: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'task':<14} {'state':<10} {'accuracy on held-out digits':>28}")
    states = {t.name: t.state for t in client.tasks()}
    for name, (x, y) in holdout.items():
        allow = states.get(name) == pb.UNLEARNED  # audit it with allow_unlearned
        p = client.predict(name, x, allow_unlearned=allow)
        state = "unlearned" if allow else "learned"
        print(f"{name:<14} {state:<10} {np.mean(p.classes == y) * 100:>27.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", default="finetune")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="lethe-demo-") as tmp:
        log = Path(tmp) / "server.log"
        command = [
            sys.executable,
            "-m",
            "server",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--data-dir",
            str(Path(tmp) / "data"),
            "--strategy",
            args.strategy,
            "--no-auth",
            "--set",
            "telemetry.log_format=text",
        ]
        print("$", " ".join(command[2:]))
        process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_ready(target, process)
            with LetheClient(target) as client:
                print(f"server ready on {target}: {client.model().strategy} / {client.model().backbone}")
                holdout = {}
                for name, classes in TASKS.items():
                    train, test = load_digits().select(classes).split(0.8, seed=0)
                    holdout[name] = (test.inputs, test.labels)
                    job = client.learn(name, train.inputs, train.labels, epochs=args.epochs)
                    print(f"\nlearn {name} (classes {classes}, {len(train)} samples)")
                    print_job(client.wait(job.id))
                accuracy_table(client, holdout, "Before the unlearn:")
                print("\nunlearn digits-2-3 (right to be forgotten)")
                print_job(client.wait(client.unlearn("digits-2-3", reason="demo: customer request").id))
                accuracy_table(client, holdout, "After the unlearn:")
                print()
                print_tasks(client.tasks())
                events = client.audit_events()
                print(f"\naudit trail: {len(events)} events; last: {events[-1].action} {events[-1].task}")
        finally:
            process.terminate()
            process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
