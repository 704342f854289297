"""The Prometheus configuration and alerting rules: promtool checks, rule unit tests, real metric names."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.ops.conftest import OpsRun
from tests.ops.helpers import DEPLOY, exported_series_names, promql_metric_names, read, require_tool
from tests.support import ROOT

#: Series Prometheus itself creates for every target or rule.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", "Debian: apt-get install prometheus")
    return subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_config_and_rules() -> None:
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 12 rules found" in rules.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _alert_rules() -> list[tuple[str, str]]:
    """``(alert name, expr)`` of every rule in alerts.yml (each expr is written on one line)."""
    text = read(DEPLOY / "alerts.yml")
    return re.findall(r"- alert: (\w+)\n\s+expr: (.+)\n", text)


def test_every_alert_is_unit_tested_and_labelled() -> None:
    rules = _alert_rules()
    assert len(rules) == 12
    tested = set(re.findall(r"alertname: (\w+)", read(DEPLOY / "alerts_test.yml")))
    assert {name for name, _ in rules} <= tested, "every alert needs a case in alerts_test.yml"
    manual = read(ROOT / "docs" / "operations.md")
    assert not [n for n, _ in rules if f"`{n}`" not in manual], "docs/operations.md must explain every alert"
    blocks = read(DEPLOY / "alerts.yml").split("- alert: ")[1:]
    for block in blocks:
        assert re.search(r"severity: (critical|warning)", block), block
        assert "summary:" in block and "description:" in block, block


@pytest.mark.parametrize("name,expr", _alert_rules())
def test_alert_reads_only_exported_metrics(ops_run: OpsRun, name: str, expr: str) -> None:
    exported = exported_series_names(ops_run.scrape()) | PROMETHEUS_SERIES
    used = promql_metric_names(expr)
    assert used, f"{name}: no metric found in {expr!r}"
    assert used <= exported, f"{name} reads series the server does not export: {sorted(used - exported)}"
