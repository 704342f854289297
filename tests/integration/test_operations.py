"""What an operator touches: metrics endpoint, CLI, configuration, schema checks, SIGTERM."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import text

from client import LetheClient, LetheError, pb
from client.cli import main as lethe
from server.app import App
from server.config import ConfigError, load_config
from server.storage import SchemaError, make_engine, upgrade
from tests.support import ServerProcess, digits, make_config, running_app


def _metric(body: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", body, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not exported"
    return float(match.group(1))


def test_prometheus_endpoint_after_learn_and_unlearn(tmp_path: Path) -> None:
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")) as server:
        x, y = digits([0, 1])
        x2, y2 = digits([2, 3])
        server.client.wait(server.client.learn("a", x, y).id)
        server.client.wait(server.client.learn("b", x2, y2).id)
        server.client.wait(server.client.unlearn("a", reason="test").id)
        server.client.predict("b", x2[:10])
        url = f"http://127.0.0.1:{server.app.ports.metrics}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert _metric(body, "lethe_model_version") == 3
    assert _metric(body, "lethe_jobs_total", 'kind="learn",outcome="succeeded"') == 2
    assert _metric(body, "lethe_jobs_total", 'kind="unlearn",outcome="succeeded"') == 1
    assert _metric(body, "lethe_job_duration_seconds_count", 'kind="learn"') == 2
    assert _metric(body, "lethe_job_queue_depth") == 0
    assert _metric(body, "lethe_tasks", 'state="learned"') == 1
    assert _metric(body, "lethe_tasks", 'state="unlearned"') == 1
    assert _metric(body, "lethe_task_accuracy_ratio", 'task="b"') > 0.9
    assert _metric(body, "lethe_retain_accuracy_ratio") > 0.9
    assert 0 <= _metric(body, "lethe_last_unlearn_spill_ratio") < 0.01
    assert _metric(body, "lethe_unlearn_spill_ratio_count") == 1
    assert _metric(body, "lethe_purged_data_bytes_total") > 0
    assert _metric(body, "lethe_retained_data_bytes") > 0  # b's probe and member files, a's probe
    assert _metric(body, "lethe_ingest_samples_total") == len(y) + len(y2)
    assert _metric(body, "lethe_ingest_bytes_total") > x.nbytes
    assert _metric(body, "lethe_grpc_requests_total", 'code="OK",method="Learn"') == 2
    assert _metric(body, "lethe_audit_events_total", 'action="learn.requested"') == 2
    assert _metric(body, "lethe_audit_events_total", 'action="data.purged"') >= 1
    assert _metric(body, "lethe_predict_latency_seconds_count") >= 1
    assert "lethe_build_info{" in body


def test_cli_tour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")) as server:
        at = ["--server", server.target]
        assert lethe(["learn", "zeros-ones", "--dataset", "digits", "--classes", "0,1", "--epochs", "5", *at]) == 0
        out = capsys.readouterr().out
        assert "queued learn job" in out and "succeeded" in out and "task_accuracy" in out
        assert lethe(["predict", "zeros-ones", "--dataset", "digits", "--classes", "0,1", *at]) == 0
        accuracy = float(re.search(r"accuracy ([\d.]+)%", capsys.readouterr().out).group(1))  # type: ignore[union-attr]
        assert accuracy > 90
        assert lethe(["tasks", *at]) == 0
        assert re.search(r"zeros-ones\s+learned\s+360", capsys.readouterr().out)
        assert lethe(["unlearn", "zeros-ones", "--reason", "gdpr", *at]) == 0
        assert "spill" in capsys.readouterr().out
        assert lethe(["predict", "zeros-ones", "--dataset", "digits", "--classes", "0,1", *at]) == 1
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        assert lethe(["audit", "--verify", *at]) == 0
        assert "audit chain intact" in capsys.readouterr().out
        assert lethe(["jobs", *at]) == 0
        assert capsys.readouterr().out.count("succeeded") == 2
        assert lethe(["model", *at]) == 0
        assert '"strategy": "finetune"' in capsys.readouterr().out
        assert lethe(["learn", "x", "--dataset", "/nonexistent.npz", *at]) == 2


def test_cli_cancel_prints_the_cancelled_job_and_fails_with_the_servers_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")) as server:
        at, client = ["--server", server.target], server.client
        busy = client.learn("busy", *digits(list(range(10))), epochs=200)  # holds the worker
        waiting = client.learn("waiting", *digits([2, 3]))
        assert lethe(["cancel", waiting.id, *at]) == 0
        out = capsys.readouterr().out
        assert re.fullmatch(rf"{waiting.id}\s+learn\s+waiting\s+cancelled\s+v0\s+.*", out.strip()), out
        assert client.job(waiting.id).state == pb.CANCELLED
        assert [job.state for job in client.jobs()] in ([pb.QUEUED, pb.CANCELLED], [pb.RUNNING, pb.CANCELLED])

        assert lethe(["cancel", waiting.id, *at]) == 1  # the server's refusal, as the other commands print it
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"lethe: FAILED_PRECONDITION: job {waiting.id} is cancelled"), captured.err
        assert lethe(["cancel", "0" * 32, *at]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert client.job(busy.id).state in (pb.QUEUED, pb.RUNNING)  # untouched; interrupted by the stop


def test_token_create_prints_a_usable_config_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert lethe(["token", "create", "--principal", "alice", "--scopes", "learn,predict"]) == 0
    out = capsys.readouterr().out
    entry = re.search(r'"(alice:[0-9a-f]{64}:learn\+predict)"', out)
    assert entry
    config = load_config(env={}, overrides={"auth.tokens": entry.group(1)})
    assert config.auth.tokens == (entry.group(1),)


def test_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    file = tmp_path / "lethe.toml"
    file.write_text(
        "[server]\nport = 70000\n[model]\nnum_classes = 1\nbogus = 3\ninference_threads = -1\n"
        "[model.options]\nbeta = 0.1\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(file, env={"LETHE_TRAINING_EPOCHS": "zero"})
    problems = "\n".join(error.value.problems)
    assert "server.port" in problems and "model.num_classes" in problems and "'model.bogus'" in problems
    assert "training.epochs" in problems and "model.inference_threads: must be 0 (the default) to 1024" in problems
    good = tmp_path / "good.toml"
    good.write_text('[model]\nstrategy = "lure"\ninput_shape = [3, 32, 32]\n[model.options]\nreplay = "full"\n')
    config = load_config(good, env={"LETHE_SERVER_PORT": "0"}, overrides={"model.num_classes": "100"})
    assert config.model.input_shape == (3, 32, 32) and config.model.options == {"replay": "full"}
    assert config.server.port == 0 and config.model.num_classes == 100


def test_print_config_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert lethe(["serve", "--print-config", "--port", "0", "--set", "model.options.beta=0.1"]) == 0
    out = capsys.readouterr().out
    assert "port = 0" in out and "[model.options]" in out and "beta = 0.1" in out
    assert lethe(["serve", "--set", "server.nope=1", "--num-classes", "1"]) == 2
    err = capsys.readouterr().err
    assert "server.nope" in err and "model.num_classes" in err


def test_unknown_strategy_option_is_refused_at_start(tmp_path: Path) -> None:
    config = make_config(tmp_path / "d", f"sqlite:///{tmp_path / 'db.sqlite'}", **{"model.options.nonsense": 1})
    with pytest.raises(ValueError, match="nonsense"):
        App(config).start()


def test_refuses_unknown_schema_and_names_the_upgrade_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()
    app = App(make_config(tmp_path / "data", url))
    with pytest.raises(SchemaError, match="lethe db upgrade"):
        app.start()
    app.stop(0)


def test_sigterm_drains_and_interrupted_job_resumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    server = ServerProcess(tmp_path / "data", url, "--set", "server.grace_seconds=1")
    try:
        server.wait_ready()
        with LetheClient(server.target) as client:
            x, y = digits(list(range(10)))
            job = client.learn("long", x, y, epochs=150)
            while client.job(job.id).state != pb.RUNNING:
                time.sleep(0.1)
        assert server.terminate() == 0  # graceful: the running job is re-queued, not lost
        assert "interrupted by shutdown" in server.log.read_text()
    finally:
        if server.process.poll() is None:
            server.kill()
    restarted = ServerProcess(tmp_path / "data", url, port=server.port)
    try:
        restarted.wait_ready()
        with LetheClient(restarted.target) as client:
            done = client.wait(job.id, timeout=300)
            assert done.state == pb.SUCCEEDED and client.task("long").state == pb.LEARNED
            with pytest.raises(LetheError):
                client.job("f" * 32)
    finally:
        restarted.terminate()


def test_db_upgrade_and_verify_audit_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert lethe(["db", "upgrade", "--database-url", url]) == 0
    assert "newest schema" in capsys.readouterr().out
    with running_app(make_config(tmp_path / "data", url)) as server:
        server.client.wait(server.client.learn("a", *digits([0, 1])).id)
    assert lethe(["db", "verify-audit", "--database-url", url]) == 0
    assert "audit chain intact" in capsys.readouterr().out
    engine = make_engine(url)
    with engine.begin() as connection:  # tamper: someone rewrites who asked for the learn
        connection.execute(text("UPDATE audit_events SET principal = 'mallory' WHERE action = 'learn.requested'"))
    engine.dispose()
    assert lethe(["db", "verify-audit", "--database-url", url]) == 1
    assert "AUDIT CHAIN BROKEN" in capsys.readouterr().err


def test_full_disk_during_spooling_is_refused_cleanly_then_recovers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    server = ServerProcess(tmp_path / "data", url, max_file_bytes=1_000_000)  # writes beyond 1 MB fail
    try:
        server.wait_ready()
        with LetheClient(server.target, retries=1) as client:
            x, y = digits(list(range(10)))
            big = np.concatenate([x] * 5)  # 8985 samples x 256 B: a 2.3 MB spool file
            with pytest.raises(LetheError) as full:
                client.learn("too-big", big, np.concatenate([y] * 5))
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in full.value.message
            assert not list((tmp_path / "data" / "spool").iterdir())  # the partial spool is gone
            assert client.tasks() == [] and client.jobs() == []
            job = client.wait(client.learn("fits", *digits([0, 1])).id)  # space again: business as usual
            assert job.state == pb.SUCCEEDED
    finally:
        server.terminate()
