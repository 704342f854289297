"""Per-task metric series through the commit phase: a task that left gives its slot to new tasks.

The unit tests of :class:`server.telemetry.Telemetry` (tests/unit/test_telemetry_series.py) check the
release itself; these check what the commit phase hands it, job after job, on a real job context.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from server.storage import DataFileKind, DataFileRepository, TaskRepository
from tests.jobs.harness import Harness, make_harness

ACCURACY, RELAPSE = "lethe_task_accuracy_ratio", "lethe_task_relapse_ratio"


def _series(h: Harness, name: str, task: str) -> float | None:
    return h.ctx.telemetry.registry.get_sample_value(name, {"task": task})


def _probe_live(h: Harness, task: str) -> bool:
    with h.session() as session:
        return bool(DataFileRepository(session).live(task=task, kind=DataFileKind.PROBE))


def test_the_accuracy_series_of_a_purged_probe_set_goes_at_the_next_evaluation(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    h = make_harness(session_factory, tmp_path, forget_probe_ops=1)
    h.learn("a", [0, 1])
    h.learn("b", [2, 3])
    h.run(h.submit_unlearn("a").id)
    assert _series(h, ACCURACY, "a") is not None and _probe_live(h, "a")  # FA is measured on it
    h.learn("c", [4, 5])  # the first operation after the unlearn: a's probe set is purged by it
    assert not _probe_live(h, "a")
    h.learn("d", [6, 7])  # evaluated without a's probe set
    assert _series(h, ACCURACY, "a") is None
    assert all(_series(h, ACCURACY, t) is not None for t in ("b", "c", "d"))


def test_a_forgotten_task_no_longer_measured_gives_its_slot_to_a_new_task(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """``telemetry.max_task_series`` = 3: once a is unlearned and its probe set purged (relapse frozen),
    the three tasks learned after it each get an accuracy series."""
    h = make_harness(session_factory, tmp_path, forget_probe_ops=1, max_task_series=3)
    h.learn("a", [0, 1])
    h.run(h.submit_unlearn("a").id)
    h.learn("b", [2, 3])  # the first operation after the unlearn: relapse measured, a's probe set purged
    assert not _probe_live(h, "a")
    h.learn("c", [4, 5])
    h.learn("d", [6, 7])
    with h.session() as session:
        task = TaskRepository(session).get("a")
    assert task is not None and task.relapse is not None  # frozen; GetTask still reports it
    assert [t for t in ("b", "c", "d") if _series(h, ACCURACY, t) is None] == []
    assert (_series(h, ACCURACY, "a"), _series(h, RELAPSE, "a")) == (None, None)
