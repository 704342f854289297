"""``lethe report``: an HTML report with real plots, the unlearn reasons and the purge proofs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from client import pb
from client.cli import main as lethe
from client.report import FIGURE_PIXELS, PLOTS, ReportData, collect, relapse_series, write_report
from tests.ops.conftest import UNLEARN_REASON, OpsRun
from tests.support import ROOT


def _check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == FIGURE_PIXELS, path.name
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        # A drawn chart has axes, text, lines and anti-aliasing: far more than a handful of colours.
        assert colors is None or len(colors) > 20, f"{path.name} looks blank"


def test_report_command_writes_plots_and_proofs(
    ops_run: OpsRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert lethe(["report", "--out", str(out), "--server", ops_run.running.target]) == 0
    assert "report.html" in capsys.readouterr().out
    for name, _, _ in PLOTS:
        _check_png(out / name)
    page = (out / "report.html").read_text(encoding="utf-8")
    for task in ("a", "b", "c"):
        assert f"<td>{task}</td>" in page
    assert "customer 4711 asked to be forgotten (ticket GDPR-17)" in page
    assert page.count("data:image/png;base64,") == len(PLOTS)  # self-contained
    assert "Audit chain: <span class=ok>intact</span>" in page
    # The purge proof: every file and digest of every data.purged event of the forgotten task.
    purges = [e for e in ops_run.running.client.audit_events(task="a") if e.action == "data.purged"]
    assert purges
    for event in purges:
        for f in json.loads(event.details_json)["files"]:
            assert f["sha256"] in page and f["path"] in page
    # The unlearn row shows the job's forget accuracy and MIA.
    metrics = ops_run.jobs["unlearn a"].metrics
    assert f"{metrics['forget_accuracy_task']:.2f}" in page and f"{metrics['mia']:.2f}" in page


def test_report_data_matches_the_server(ops_run: OpsRun) -> None:
    data = collect(ops_run.running.client)
    assert [u.task for u in data.unlearns] == ["a"]
    unlearn = data.unlearns[0]
    assert unlearn.reason == UNLEARN_REASON and unlearn.state == "succeeded" and unlearn.principal == "anonymous"
    assert unlearn.metric("spill") == ops_run.jobs["unlearn a"].metrics["spill"]
    assert all(p.why for p in unlearn.purges) and sum(p.bytes for p in unlearn.purges) > 0
    assert data.task_names() == ["a", "b", "c"]
    # Relapse as drawn equals the server's definition: |a at the unlearn - a now|.
    x, y = relapse_series(data)["a"]
    assert x == [3, 4] and y[0] == 0
    assert y[-1] == pytest.approx(ops_run.running.client.task("a").relapse, abs=1e-9)


def test_report_of_an_empty_server_still_has_every_plot(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    data = ReportData("test", datetime.now(UTC), pb.ModelInfo(strategy="uncle"), [], [], [])
    page = write_report(data, tmp_path).read_text()
    for name, _, _ in PLOTS:
        with Image.open(tmp_path / name) as image:
            assert image.size == FIGURE_PIXELS
    assert "No unlearn has been requested" in page


def test_report_module_imports_without_matplotlib_or_torch(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import importlib.abc, sys

            class Block(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in ("torch", "matplotlib", "server"):
                        raise ImportError(f"{name} is blocked")
                    return None

            sys.meta_path.insert(0, Block())
            """
        )
    )
    script = (
        "import sys\n"
        "import client.report\n"
        "from client.cli import build_parser\n"
        "args = build_parser().parse_args(['report', '--out', 'x'])\n"
        "print(args.out, 'matplotlib' in sys.modules)\n"
        "sys.exit(args.func(args))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == "x False"
    assert "lethe report needs matplotlib" in result.stderr


def test_operations_manual_shows_a_report_plot() -> None:
    manual = (ROOT / "docs" / "operations.md").read_text()
    assert "](img/report-accuracy.png)" in manual
    _check_png(ROOT / "docs" / "img" / "report-accuracy.png")
