"""The Grafana dashboard reads only series the server exports, covers what operators need, and is provisioned."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.ops.conftest import OpsRun
from tests.ops.helpers import DEPLOY, exported_series_names, promql_metric_names, read

DASHBOARD = DEPLOY / "grafana" / "dashboard.json"


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(read(DASHBOARD)))


def _panels() -> list[dict[str, Any]]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def _queries() -> list[tuple[str, str]]:
    """``(where, expr)`` for every panel target and annotation query."""
    found = [(p["title"], t["expr"]) for p in _panels() for t in p.get("targets", [])]
    found += [(f"annotation {a['name']}", a["expr"]) for a in _dashboard()["annotations"]["list"] if "expr" in a]
    return found


@pytest.mark.parametrize(
    "expr,names",
    [
        ("lethe_model_version", {"lethe_model_version"}),
        (
            'histogram_quantile(0.99, sum by (le, kind) (rate(lethe_x_bucket{kind="learn", le!="+Inf"}[5m])))',
            {"lethe_x_bucket"},
        ),
        ("sum by (method, code) (rate(lethe_grpc_requests_total[$__rate_interval]))", {"lethe_grpc_requests_total"}),
        ("a / on(instance) group_left(task) b offset 5m > bool 0.5", {"a", "b"}),
        ("rate(x_sum[1m]) / rate(x_count[1m:10s]) and on() vector(1) unless absent(up)", {"x_sum", "x_count", "up"}),
        ('label_replace(m2, "dst", "$1", "src", "(.*)") * 1e-3 or -Inf', {"m2"}),
        ('{__name__="ignored"} + lethe_a:recorded', {"lethe_a:recorded"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_every_panel_query_reads_exported_series(ops_run: OpsRun) -> None:
    exported = exported_series_names(ops_run.scrape())
    assert "lethe_job_duration_seconds" not in exported  # a histogram's family name is not a series
    assert {"lethe_job_duration_seconds_bucket", "lethe_jobs_total", "lethe_build_info"} <= exported
    problems = []
    for where, expr in _queries():
        used = promql_metric_names(expr)
        if not used:
            problems.append(f"{where}: no metric in {expr!r}")
        elif not used <= exported:
            problems.append(f"{where}: {sorted(used - exported)} not exported ({expr})")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*(promql_metric_names(expr) for _, expr in _queries()))
    needed = {
        "lethe_task_accuracy_ratio",  # accuracy per task over time
        "lethe_retain_accuracy_ratio",
        "lethe_forget_accuracy_ratio",
        "lethe_last_unlearn_spill_ratio",  # spill per unlearn
        "lethe_unlearn_spill_ratio_bucket",
        "lethe_task_relapse_ratio",  # relapse per task
        "lethe_job_queue_depth",
        "lethe_job_queue_wait_seconds_bucket",
        "lethe_job_duration_seconds_bucket",
        "lethe_predict_latency_seconds_bucket",
        "lethe_ingest_bytes_total",
        "lethe_ingest_samples_total",
        "lethe_retained_data_bytes",
        "lethe_purged_data_bytes_total",
        "lethe_ready",
    }
    assert needed <= used, f"not on the dashboard: {sorted(needed - used)}"
    latency = [expr for _, expr in _queries() if "lethe_predict_latency_seconds_bucket" in expr]
    assert any("histogram_quantile(0.5," in e for e in latency) and any(
        "histogram_quantile(0.99," in e for e in latency
    )


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] == "Lethe"
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def _compose_mounts() -> list[tuple[str, str]]:
    """``(host path, container path)`` of the compose file's bind mounts of local files."""
    return re.findall(r"^\s+- (\./[^:\s]+):([^:\s]+)(?::ro)?\s*$", read(DEPLOY / "docker-compose.yml"), re.MULTILINE)


def test_compose_mounts_existing_files_and_provisions_the_dashboard() -> None:
    mounts = dict(_compose_mounts())
    for host in mounts:
        assert (DEPLOY / host).exists(), f"docker-compose.yml mounts {host}, which does not exist"
    assert mounts["./grafana/dashboard.json"] == "/var/lib/grafana/dashboards/lethe.json"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./alerts.yml"] == "/etc/prometheus/alerts.yml"  # rule_files: alerts.yml, next to the config
    provider = read(DEPLOY / "grafana" / "provisioning" / "dashboards" / "lethe.yml")
    assert re.search(r"path: /var/lib/grafana/dashboards\s*$", provider, re.MULTILINE)
    datasource = read(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert "url: http://prometheus:9090" in datasource and "type: prometheus" in datasource
    assert 'targets: ["lethe:9464"]' in read(DEPLOY / "prometheus.yml")


def test_compose_and_provisioning_parse_as_yaml() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the text-level checks above still run)")
    compose = yaml.safe_load(read(DEPLOY / "docker-compose.yml"))
    assert set(compose["services"]) == {"lethe", "prometheus", "grafana"}
    lethe = compose["services"]["lethe"]
    assert lethe["build"]["context"] == ".." and (DEPLOY / ".." / lethe["build"]["dockerfile"]).is_file()
    assert "lethe-data:/data" in lethe["volumes"]
    for path in ("datasources/prometheus.yml", "dashboards/lethe.yml"):
        provisioning = yaml.safe_load(read(DEPLOY / "grafana" / "provisioning" / path))
        assert provisioning["apiVersion"] == 1
    alerts = yaml.safe_load(read(DEPLOY / "alerts.yml"))
    assert sum(len(g["rules"]) for g in alerts["groups"]) == 12
