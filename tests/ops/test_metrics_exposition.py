"""The /metrics exposition of a real server passes promtool's checks and has every documented series."""

from __future__ import annotations

import re
import subprocess

from tests.ops.conftest import OpsRun
from tests.ops.helpers import exported_series_names, read, require_tool
from tests.support import ROOT


def test_promtool_check_metrics_after_learn_and_unlearn(ops_run: OpsRun) -> None:
    promtool = require_tool("promtool", "Debian: apt-get install prometheus")
    body = ops_run.scrape()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60, check=False
    )
    # promtool exits 0 only when the exposition parses and has no lint problem (naming, units, help).
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_every_documented_metric_is_exported(ops_run: OpsRun) -> None:
    series = exported_series_names(ops_run.scrape())
    documented = set(re.findall(r"`(lethe_[a-z_]+)", read(ROOT / "docs" / "metrics.md")))
    missing = []
    for name in sorted(documented):
        # Counters are stored as <name>_total, histograms as <name>_bucket/_count/_sum.
        if not {name, f"{name}_total", f"{name}_bucket"} & series:
            missing.append(name)
    assert not missing, f"documented in docs/metrics.md but not exported: {missing}"
    assert {"lethe_ready", "lethe_worker_up", "lethe_job_queue_limit"} <= series
