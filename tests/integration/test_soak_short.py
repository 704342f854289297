"""A short soak in the default suite: learn/unlearn cycles under Predict load leave nothing behind.

Asserts the invariants of ``benchmarks/soak.py``, not its times: no failed or out-of-order
Predict, no leaked file descriptors, the data directory back to its baseline files (only the
checkpoint's name may change), every soak task UNLEARNED and an intact audit chain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import FD_SLACK, checkpoints_of, soak, without_checkpoints

CYCLES = 15


@pytest.mark.timeout(300)
def test_short_soak_leaves_nothing_behind(tmp_path: Path) -> None:
    report = soak(tmp_path, CYCLES, forget_probe_ops=0, predict_threads=2)

    assert report.predict_calls > 0
    assert report.predict_failures == []
    assert report.version_regressions == []
    assert report.fds_end <= report.fds_warm + FD_SLACK, (report.fds_warm, report.fds_end)
    assert without_checkpoints(report.end_files) == without_checkpoints(report.baseline_files)
    assert len(checkpoints_of(report.end_files)) == 1
    assert report.tasks_not_unlearned == []
    assert report.audit_problem is None
    # forget_probe_ops = 0: an unlearned task's probe set goes with its other files, at once.
    assert max(report.probe_files) == min(report.probe_files)
