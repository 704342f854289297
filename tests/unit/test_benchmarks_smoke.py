"""Smoke test of the benchmarks: every one runs in its ``--quick`` configuration and reports sane numbers.

No timing is asserted (performance goals live in the benchmarks themselves, DESIGN.md section 8):
only that each benchmark runs end to end against a real server and produces finite, positive values,
and that the results document is rewritten in place.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run as bench
from benchmarks.bench_ha import ALONE, BOTH, cpu_table, scaling_notes
from benchmarks.report import read_section, replace_section, section_markers, write_section
from benchmarks.timing import cpu_usage


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One ``python -m benchmarks.run --quick`` of every benchmark, into a scratch document."""
    root = tmp_path_factory.mktemp("bench")
    doc = root / "benchmarks.md"
    begin, end = section_markers("someone-else")
    ingest_begin, ingest_end = section_markers("ingest")
    doc.write_text(
        "# Benchmarks\n\nIntro kept as is.\n\n## Results\n\n"
        f"{ingest_begin}\nan old ingest result\n{ingest_end}\n\n{begin}\ntheir block, kept\n{end}\n\n"
        "## Later\n\nKept too.\n"
    )
    report = root / "results.json"
    status = bench.main(["--quick", "--doc", str(doc), "--json", str(report), "--data-dir", str(root / "data")])
    assert status == 0
    return json.loads(report.read_text()), doc.read_text()


def _numbers(comparison: dict[str, Any]) -> list[float]:
    return [comparison[side][key] for side in ("baseline", "lethe", "ratio") for key in ("median", "low", "high")]


def test_every_benchmark_reports_finite_positive_numbers(quick_run: tuple[dict[str, Any], str]) -> None:
    report, _doc = quick_run
    assert report["quick"] is True
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == set(bench.DEFAULT)
    for name, result in results.items():
        assert result["comparisons"], f"{name} reported no comparison"
        for comparison in result["comparisons"]:
            values = _numbers(comparison)
            assert all(math.isfinite(v) and v > 0 for v in values), (name, comparison["case"], values)
    goals = [c["goal"] for r in results.values() for c in r["comparisons"] if c["goal"] is not None]
    assert goals, "the issue's goals must appear in the results"


def test_ingest_breakdown_and_predict_variants(quick_run: tuple[dict[str, Any], str]) -> None:
    report, _doc = quick_run
    results = {r["name"]: r for r in report["results"]}
    (heading, _header, rows), *_ = results["ingest"]["tables"]
    assert "Where the time goes" in heading
    assert all(math.isfinite(float(row[1])) and float(row[1]) >= 0 for row in rows)
    cases = [c["case"] for c in results["predict"]["comparisons"]]
    for variant in ("Predict", "PredictStream"):
        assert any(case.endswith(f"1 thread(s): {variant}") for case in cases)
        assert any(case.endswith(f"4 thread(s): {variant}") for case in cases)
    assert any("mlp" in case for case in cases) and any("cnn" in case for case in cases)
    echo_table = next(rows for heading, _h, rows in results["predict"]["tables"] if "echo" in heading)
    assert len(echo_table) == 4  # two models x (1, 4) threads
    assert all(float(row[3].replace(",", "")) > 0 for row in echo_table)


def test_document_results_are_rewritten_in_place(quick_run: tuple[dict[str, Any], str]) -> None:
    _report, doc = quick_run
    assert doc.startswith("# Benchmarks\n\nIntro kept as is.\n\n## Results\n\n<!-- bench:ingest:begin -->")
    assert "their block, kept" in doc and "an old ingest result" not in doc
    assert doc.index("<!-- bench:ingest:begin -->") < doc.index("their block, kept") < doc.index("## Later")
    for name in (bench.MACHINE, *bench.DEFAULT):
        begin, end = section_markers(name)
        assert doc.count(begin) == 1 and doc.count(end) == 1
    assert "--quick" in doc  # quick numbers are labelled as such


def test_replace_section_rewrites_only_its_section() -> None:
    a_begin, a_end = section_markers("a")
    b_begin, b_end = section_markers("b")
    text = f"# B\n\nby hand\n\n{a_begin}\nold a\n{a_end}\n\nby hand too\n\n{b_begin}\nold b\n{b_end}\n\nend\n"
    updated = replace_section(replace_section(text, "a", "new a"), "c", "new c")
    assert "new a" in updated and "old a" not in updated
    assert updated.replace("new a", "old a").startswith(text.rstrip())  # nothing else moved
    assert updated.index("new a") < updated.index("by hand too") < updated.index("old b") < updated.index("new c")
    assert replace_section(updated, "a", "new a") == updated


def test_replace_section_rejects_damaged_markers(tmp_path: Path) -> None:
    begin, end = section_markers("a")
    with pytest.raises(ValueError, match="markers"):
        replace_section(f"# B\n{end}\n{begin}\n", "a", "x")
    with pytest.raises(ValueError, match="markers"):
        replace_section(f"# B\n{begin}\n", "a", "x")
    doc = tmp_path / "new.md"
    write_section(doc, "a", "x", title="# New")
    assert doc.read_text() == f"# New\n\n{begin}\nx\n{end}\n"
    assert read_section(doc, "a") == "x"


def test_quick_run_writes_no_document_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "DEFAULT", [])  # nothing to run: only the document logic is under test
    monkeypatch.setattr(bench, "DEFAULT_DOC", tmp_path / "benchmarks.md")
    assert bench.main(["--quick", "--data-dir", str(tmp_path / "data")]) == 0
    assert not (tmp_path / "benchmarks.md").exists()
    assert bench.main(["--data-dir", str(tmp_path / "data")]) == 0  # a full run does write it
    assert (tmp_path / "benchmarks.md").exists()


def test_scale_reports_goals_and_a_bounded_cache(quick_run: tuple[dict[str, Any], str]) -> None:
    report, _doc = quick_run
    scale = {r["name"]: r for r in report["results"]}["scale"]
    cases = [c["case"] for c in scale["comparisons"]]
    for case in ("RSS", "Predict p50, cached task", "learn step", "learn operation"):
        assert any(case in c for c in cases), case
    tables = {heading: rows for heading, _header, rows in scale["tables"]}
    goals = [row[0] for row in tables["Goals"]]
    assert any(goal.startswith("RSS growth") for goal in goals) and any("Predict p50" in goal for goal in goals)
    cache = next(rows for heading, rows in tables.items() if heading.startswith("Cache of generated networks"))
    small_budget = cache[-1]  # the largest count with the small budget: the cache evicted
    assert float(small_budget[1]) < 1 and int(small_budget[4].replace(",", "")) > 0


def test_submit_latency_reports_idle_and_unlearn_windows(quick_run: tuple[dict[str, Any], str]) -> None:
    report, _doc = quick_run
    submit = {r["name"]: r for r in report["results"]}["submit"]
    cases = [c["case"] for c in submit["comparisons"]]
    assert any("p99" in case and "RUNNING window" in case for case in cases)
    tables = {heading: rows for heading, _header, rows in submit["tables"]}
    (goal,) = tables["Goals"]
    assert "idle p99" in goal[0] and goal[2] == "≤ 2"
    latency = next(rows for heading, rows in tables.items() if heading.startswith("Learn submission latency"))
    idle, running, strategy, evaluation = latency
    assert idle[0].startswith("idle") and int(idle[1]) >= 1 and float(idle[2].replace(",", "")) > 0
    assert int(running[1]) == int(strategy[1]) + int(evaluation[1]) >= 1
    (unlearn,) = tables["Each unlearn"]
    running_s, strategy_s, evaluation_s = (float(cell) for cell in unlearn[2:5])
    assert running_s > 0 and evaluation_s >= 0 and abs(strategy_s + evaluation_s - running_s) < 0.02


def test_submit_latency_windows_follow_the_polls() -> None:
    from benchmarks.bench_submit_latency import Poll, Submission, windows
    from protos import lethe_pb2 as pb

    def poll(at: float, state: int, progress: float) -> Poll:
        return Poll(at, at + 0.01, state, progress, "")

    polls = [poll(1, pb.RUNNING, 0.0), poll(2, pb.RUNNING, 0.5), poll(3, pb.RUNNING, 1.0), poll(4, pb.RUNNING, 1.0)]
    running, evaluation = windows(0.5, [*polls, poll(5, pb.SUCCEEDED, 1.0)])
    assert running == (0.5, 5.01) and evaluation == (2.01, 5.01)  # from the reply before the final value
    assert windows(0.5, [poll(1, pb.RUNNING, 1.0), poll(5, pb.SUCCEEDED, 1.0)])[1] == (0.5, 5.01)
    with pytest.raises(ValueError, match="never saw"):
        windows(0.5, polls)
    assert Submission(1.9, 0.2).overlaps(evaluation) and not Submission(1.0, 0.5).overlaps(evaluation)


def test_records_reports_every_megabatch_and_the_goal(quick_run: tuple[dict[str, Any], str]) -> None:
    report, doc = quick_run
    records = {r["name"]: r for r in report["results"]}["records"]
    n = 6
    cases = [c["baseline_name"] for c in records["comparisons"]]
    assert cases.count("retraining without them") == n and len(cases) == 2 * n
    tables = {heading: rows for heading, _header, rows in records["tables"]}
    assert [row[0] for row in tables["Goals"]] == [f"records ÷ retraining, j = {j}" for j in range(2, n + 1)]
    per_j = next(rows for heading, rows in tables.items() if heading.startswith("Per mega-batch"))
    assert [int(row[0]) for row in per_j] == list(range(1, n + 1))
    # Forgetting samples of mega-batch j replays j..n, and reproduces retraining bit for bit.
    assert [int(row[1]) for row in per_j] == [n - j + 1 for j in range(1, n + 1)]
    assert all(row[-1] == "yes" for row in per_j)
    assert "Records-level forgetting" in doc


def test_cpu_usage_counts_a_busy_process_and_the_ha_bound_follows_from_it() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = cpu_usage([spinner.pid])
        time.sleep(1.0)
        after = cpu_usage([spinner.pid])
    finally:
        spinner.kill()
        spinner.wait()
    used = {key: after[key] - before[key] for key in before}
    assert 0.95 <= used["wall"] <= 1.5
    assert 0.6 <= used["server_cpu"] / used["wall"] <= 1.05  # one spinning core (it may be preempted)
    assert used["busy_cpu"] >= used["server_cpu"] * 0.9  # the machine was at least that busy
    assert used["client_cpu"] < 0.2  # this process slept

    cores = os.cpu_count() or 1
    alone = {"rows_per_second": 1000.0, "server_cpu": 1.0, "client_cpu": 0.5, "busy_cpu": cores * 0.75, "wall": 1.0}
    both = {"rows_per_second": 1200.0, "server_cpu": 1.5, "client_cpu": 0.5, "busy_cpu": cores * 1.0, "wall": 1.0}
    usage = {ALONE: [alone], BOTH: [both]}
    (note,) = scaling_notes(usage, "h2load")
    assert "efficiency (rows per server CPU second with the replica ÷ without) 0.80" in note  # (1200/1.5) / (1000/1)
    assert "at most 1.33×" in note and "about 1.60×" in note  # cores / (0.75 cores) ; 2 x 0.80
    heading, _columns, rows = cpu_table(usage, "h2load")
    assert [row[0] for row in rows] == [ALONE, BOTH] and rows[1][-1] == "800"
    assert note.startswith(f"h2load, against the {ALONE}: ") and "h2load" in heading
