"""A real Prometheus (Debian's binary) scrapes a running Lethe and answers PromQL about it."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client import pb
from tests.ops.conftest import run_sequence
from tests.ops.helpers import DEPLOY, require_tool
from tests.support import free_port, make_config, running_app

T = TypeVar("T")
#: Stand-ins for Grafana's variables when the dashboard's queries are run directly.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API the test needs."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector: a list of ``{"metric": labels, "value": [ts, "value"]}``."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def values(self, expr: str, by: str = "") -> dict[str, float]:
        """``label value (or "") -> float`` of an instant vector."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy (errors count as not yet); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (OSError, AssertionError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    return exprs


def test_prometheus_scrapes_lethe_and_answers_promql(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", "Debian: apt-get install prometheus")
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", **{"training.epochs": 3})
    with running_app(config) as server:
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {DEPLOY / 'alerts.yml'}\n"
            "scrape_configs:\n  - job_name: lethe\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{server.app.ports.metrics}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            api = PrometheusAPI(f"http://127.0.0.1:{port}")
            wait_for("Prometheus to scrape Lethe", lambda: api.values('up{job="lethe"}') == {"": 1.0})
            jobs = run_sequence(server)
            unlearn = jobs["unlearn a"]
            tasks = {t.name: t for t in server.client.tasks()}
            final = server.client.evaluations()[-1]
            wait_for("the last job to be scraped", lambda: api.values("lethe_model_version") == {"": 4.0})
            # The worker sets the other gauges just after the version: take the scrape after this one.
            seen = api.values("timestamp(lethe_model_version)")[""]
            wait_for("one more scrape", lambda: api.values("timestamp(lethe_model_version)")[""] > seen)

            # Spill of the unlearn, as the job reported it (points) and Prometheus stores it (ratio).
            spill = api.values("lethe_last_unlearn_spill_ratio")[""]
            assert spill == pytest.approx(unlearn.metrics["spill"] / 100, abs=1e-9)
            assert api.values("lethe_unlearn_spill_ratio_count") == {"": 1.0}

            # Relapse of the unlearned task, per task and the maximum.
            relapse = api.values("lethe_task_relapse_ratio", by="task")
            assert set(relapse) == {"a"}
            assert relapse["a"] == pytest.approx(tasks["a"].relapse / 100, abs=1e-9)
            assert api.values("lethe_max_relapse_ratio")[""] == pytest.approx(relapse["a"], abs=1e-12)

            # Per-task accuracy is the newest row of the accuracy matrix.
            accuracy = api.values("lethe_task_accuracy_ratio", by="task")
            assert accuracy == pytest.approx({t: a / 100 for t, a in final.accuracies.items()}, abs=1e-9)
            assert accuracy["b"] > 0.8 and accuracy["c"] > 0.8
            assert api.values("lethe_retain_accuracy_ratio")[""] == pytest.approx(
                (accuracy["b"] + accuracy["c"]) / 2, abs=1e-9
            )
            assert api.values("lethe_forget_accuracy_ratio")[""] == pytest.approx(accuracy["a"], abs=1e-9)

            # Job durations: three learns and one unlearn, with a finite median.
            counts = api.values("sum by (kind) (lethe_job_duration_seconds_count)", by="kind")
            assert counts == {"learn": 3.0, "unlearn": 1.0, "commit": 0.0}
            median = api.values(
                'histogram_quantile(0.5, sum by (le) (lethe_job_duration_seconds_bucket{kind="learn"}))'
            )[""]
            assert 0 < median < 600 and math.isfinite(median)
            outcomes = api.values('sum by (outcome) (lethe_jobs_total{kind="learn"})', by="outcome")
            assert outcomes == {"succeeded": 3.0, "failed": 0.0, "cancelled": 0.0}
            assert api.values("lethe_ready") == {"": 1.0}

            # The alerting rules load, and a relapse above 5 points is pending as LetheRelapse.
            groups = api.get("/api/v1/rules")["groups"]
            assert {g["name"] for g in groups} == {"lethe-availability", "lethe-jobs", "lethe-unlearning-quality"}
            assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
            expect_relapse_alert = tasks["a"].relapse > 5

            def relapse_alert_settled() -> bool:
                alerts = {a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["alerts"]}
                return ("LetheRelapse" in alerts) == expect_relapse_alert and "LetheDown" not in alerts

            wait_for("the alert rules to be evaluated", relapse_alert_settled, timeout=20)

            # Every query of the Grafana dashboard parses and returns data from a real server.
            for expr in dashboard_queries():
                assert api.query(expr), f"dashboard query returned nothing: {expr}"
            assert unlearn.state == pb.SUCCEEDED
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
            log.close()
