"""Structured logs of a real ``python -m server``: JSON lines with job, task, principal and model version;
never a token, never tensor data."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import LetheClient, LetheError, pb
from server.logs import ContextFilter, JsonFormatter, log_context
from tests.support import ROOT, digits, free_port, wait_ready

#: A value no log line has any reason to contain; float32(1234.5678) prints as 1234.5677.
PATTERN = 1234.5678


def _lines(log: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"log line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def _one(entries: list[dict[str, Any]], message: str, job_id: str) -> dict[str, Any]:
    found = [e for e in entries if e["message"].startswith(message) and e.get("job_id") == job_id]
    assert len(found) == 1, f"expected one {message!r} line for job {job_id}, got {found}"
    return found[0]


def test_server_logs_json_with_context_and_no_secrets(tmp_path: Path) -> None:
    token = "lethe_" + secrets.token_urlsafe(32)
    wrong_token = "lethe_" + secrets.token_urlsafe(32)
    entry = f"ops:{hashlib.sha256(token.encode()).hexdigest()}:admin"
    port = free_port()
    settings = {
        "telemetry.log_format": "json",
        "auth.tokens": entry,
        "model.strategy": "finetune",
        "model.backbone": "mlp",
        "model.width": 64,
        "model.device": "cpu",
        "training.epochs": 3,
        "training.holdout_fraction": 0.2,
    }
    args = [sys.executable, "-m", "server", "--port", str(port), "--metrics-port", "-1"]
    args += ["--data-dir", str(tmp_path / "data"), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    stderr, stdout = tmp_path / "stderr.log", tmp_path / "stdout.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")} | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, cwd=ROOT, stdout=stdout.open("wb"), stderr=stderr.open("wb"), env=env)
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target, process, stderr, timeout=90)
        inputs, labels = digits([0, 1])
        inputs = inputs.copy()
        inputs[:20] = PATTERN  # recognizable tensor data
        with LetheClient(target, token=token) as client:
            learn = client.wait(client.learn("patterned", inputs, labels).id)
            bad = inputs[:4, :, :4]  # wrong shape: refused with INVALID_ARGUMENT, still never logged
            with pytest.raises(LetheError) as refused:
                client.learn("refused", bad, labels[:4])
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            unlearn = client.wait(client.unlearn("patterned", reason="logging test").id)
        with LetheClient(target, token=wrong_token, retries=1) as intruder, pytest.raises(LetheError) as denied:
            intruder.tasks()
        assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    entries = _lines(stderr)
    assert learn.state == unlearn.state == pb.SUCCEEDED

    for kind, job, version in (("learn", learn, 1), ("unlearn", unlearn, 2)):
        for message in (f"{kind} job queued", f"{kind} job started", f"{kind} job succeeded"):
            line = _one(entries, message, job.id)
            assert line["task"] == "patterned" and line["principal"] == "ops", line
        assert _one(entries, f"{kind} job succeeded", job.id)["model_version"] == version == job.model_version
    # Every line of the job machinery carries the job it is about.
    jobs_lines = [e for e in entries if e["logger"].startswith("server.jobs")]
    assert jobs_lines and all("job_id" in e and "task" in e for e in jobs_lines), jobs_lines
    refusal = [e for e in entries if e["message"].startswith("refused ListTasks")]
    assert refusal and refusal[0]["principal"] == "-"

    everything = stderr.read_text() + stdout.read_text()
    for secret in (token, wrong_token, token[6:], wrong_token[6:]):
        assert secret not in everything, "a bearer token was logged"
    pattern_bytes = np.full(4, PATTERN, dtype=np.float32).tobytes()
    for trace in ("1234.56", "1234.57", repr(pattern_bytes)[2:-1], pattern_bytes.hex()):
        assert trace not in everything, f"tensor data was logged: {trace}"


def test_log_context_reaches_records_from_any_logger() -> None:
    import logging

    formatter, context = JsonFormatter(), ContextFilter()
    record = logging.LogRecord("server.data", logging.INFO, __file__, 1, "purged %s", ("x",), None)
    with log_context(job_id="j1", task="t", principal="alice"), log_context(model_version=7):
        context.filter(record)
    outside = logging.LogRecord("server.data", logging.INFO, __file__, 1, "plain", (), None)
    context.filter(outside)
    assert json.loads(formatter.format(record)) | {"ts": ""} == {
        "ts": "",
        "level": "INFO",
        "logger": "server.data",
        "message": "purged x",
        "job_id": "j1",
        "task": "t",
        "principal": "alice",
        "model_version": 7,
    }
    assert "job_id" not in json.loads(formatter.format(outside))
    explicit = logging.makeLogRecord({"name": "x", "msg": "m", "task": "explicit"})  # as extra={"task": ...} does
    with log_context(task="context"):
        context.filter(explicit)
    assert explicit.__dict__["task"] == "explicit"  # extra= wins over the context
