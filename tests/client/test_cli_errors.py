"""How ``lethe`` fails: one line on stderr, with a hint where the user can act, a non-zero exit, never a
traceback; Ctrl-C while a command waits on its job says the job keeps running and how to follow or cancel it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import pb
from client.cli import main as lethe
from server.rpc.auth import hash_token
from tests.support import ROOT, Running, digits, free_port, make_config, running_app

TOKENS = {"admin": "t-admin", "reader": "t-reader"}
ENTRIES = [f"root:{hash_token(TOKENS['admin'])}:admin", f"reader:{hash_token(TOKENS['reader'])}:predict"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``lethe ARGS`` in a fresh process, with no ``LETHE_*`` variable of the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")} | {"PYTHONUNBUFFERED": "1"}


def one_line(stderr: str) -> str:
    """The single line a failure printed (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lethe: "), stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _no_lethe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--server`` and ``--token`` defaults come from LETHE_SERVER/LETHE_TOKEN: none here."""
    monkeypatch.delenv("LETHE_SERVER", raising=False)
    monkeypatch.delenv("LETHE_TOKEN", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A server that wants tokens (admin and predict-only), with a learned task ``known``."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    config = make_config(
        tmp / "data", f"sqlite:///{tmp / 'db.sqlite'}", **{"auth.enabled": True, "auth.tokens": ENTRIES}
    )
    with running_app(config, token=TOKENS["admin"]) as running:
        running.client.wait(running.client.learn("known", *digits([0, 1]), epochs=1).id)
        yield running


def test_an_unreachable_server_names_the_address_and_how_to_give_it() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = cli("tasks", "--server", address)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"lethe: UNAVAILABLE: cannot reach a Lethe server at {address}"), line
    assert "--server HOST:PORT" in line and "LETHE_SERVER" in line


def test_no_or_a_wrong_token_says_how_to_give_one(server: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert lethe(["tasks", "--server", server.target]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("lethe: UNAUTHENTICATED: ") and "no token was given" in line
    assert "--token TOKEN or LETHE_TOKEN" in line
    assert lethe(["tasks", "--server", server.target, "--token", "guess"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "UNAUTHENTICATED" in line and "the token given was refused" in line and "--token" in line


def test_a_missing_scope_is_named(server: Running, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--server", server.target, "--token", TOKENS["reader"]]
    assert lethe(["learn", "more", "--classes", "2,3", *args]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("lethe: PERMISSION_DENIED: ") and "'learn' scope" in line


def test_a_bad_field_is_printed_with_its_path(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = digits([0, 1])
    y = y.copy()
    y[3] = 12  # the model has 10 classes
    np.savez(tmp_path / "bad.npz", x=x[:40], y=y[:40])
    args = ["--server", server.target, "--token", TOKENS["admin"]]
    assert lethe(["learn", "bad-labels", "--dataset", str(tmp_path / "bad.npz"), *args]) == 1
    line = one_line(capsys.readouterr().err)
    assert line == "lethe: INVALID_ARGUMENT: chunk[1].labels.data: labels must be in [0, 10), got 12", line
    assert lethe(["learn", "known", "--classes", "0,1", *args]) == 1  # names are never reused
    line = one_line(capsys.readouterr().err)
    assert line.startswith("lethe: ALREADY_EXISTS: task 'known' is already learned"), line


def test_a_refusal_through_the_real_command_has_no_traceback(server: Running) -> None:
    result = cli("jobs", "../etc/passwd", "--server", server.target, "--token", TOKENS["admin"])
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("lethe: INVALID_ARGUMENT: id: must be a job id"), result.stderr


def test_ctrl_c_while_learn_waits_leaves_the_job_running_and_says_how_to_follow_or_cancel_it(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")
    with running_app(config) as running:
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "learn", "long", "--epochs", "10000", "--server", running.target],
            cwd=ROOT,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            queued = re.match(r"queued learn job ([0-9a-f]{32}) ", process.stdout.readline())
            assert queued, process.stderr.read() if process.stderr else ""
            job_id = queued.group(1)
            deadline = time.monotonic() + 60
            while running.client.job(job_id).state != pb.RUNNING:
                assert time.monotonic() < deadline, "the learn job did not start"
                time.sleep(0.1)
            time.sleep(0.5)  # the command is in its wait
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert process.returncode == 130, stderr
        line = one_line(stderr)
        assert f"learn job {job_id} keeps running" in line, line
        assert f"'lethe jobs {job_id} --wait --server {running.target}'" in line, line
        assert f"'lethe cancel {job_id} --server {running.target}'" in line, line
        assert running.client.job(job_id).state == pb.RUNNING  # Ctrl-C stopped the command, not the job
        assert running.client.cancel(job_id).state == pb.CANCELLED


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_serve_on_a_busy_port_prints_one_line(tmp_path: Path, flag: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "-1"} | {flag: str(port)}
        args = ["serve", "--data-dir", str(tmp_path / "data"), "--no-auth"]
        result = cli(*args, "--port", ports["--port"], "--metrics-port", ports["--metrics-port"], timeout=60)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line and flag in line, line
    assert result.stdout == ""
