"""Per-task series: released when a task is no longer measured, so the cap never starves new tasks."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from server.telemetry import Telemetry

ACCURACY, RELAPSE = "lethe_task_accuracy_ratio", "lethe_task_relapse_ratio"


def _value(t: Telemetry, name: str, task: str) -> float | None:
    return t.registry.get_sample_value(name, {"task": task})


def test_a_task_whose_probe_set_is_purged_loses_its_accuracy_series() -> None:
    t = Telemetry(CollectorRegistry())
    t.record_accuracies({"kept": 90.0, "forgotten": 12.0}, learned=["kept"], unlearned=["forgotten"])
    assert _value(t, ACCURACY, "forgotten") == 0.12
    assert t.registry.get_sample_value("lethe_forget_accuracy_ratio") == 0.12
    # forget_probe_ops reached: its probe set is purged, the next evaluation no longer measures it.
    t.record_accuracies({"kept": 91.0}, learned=["kept"], unlearned=["forgotten"])
    assert _value(t, ACCURACY, "forgotten") is None
    assert _value(t, ACCURACY, "kept") == 0.91
    assert math.isnan(t.registry.get_sample_value("lethe_forget_accuracy_ratio") or 0.0)


def test_slots_freed_by_tasks_that_left_go_to_new_tasks() -> None:
    t = Telemetry(CollectorRegistry(), max_task_series=2)
    t.record_accuracies({"a": 90.0, "b": 80.0}, learned=["a", "b"], unlearned=[])
    t.record_accuracies({"a": 90.0, "b": 80.0, "c": 70.0}, learned=["a", "b", "c"], unlearned=[])
    assert _value(t, ACCURACY, "c") is None  # over the cap
    assert t.registry.get_sample_value("lethe_retain_accuracy_ratio") == 0.8  # RA is not capped
    t.record_accuracies({"c": 70.0, "d": 60.0}, learned=["c", "d"], unlearned=[])  # a and b left
    assert (_value(t, ACCURACY, "a"), _value(t, ACCURACY, "b")) == (None, None)
    assert (_value(t, ACCURACY, "c"), _value(t, ACCURACY, "d")) == (0.7, 0.6)


def test_relapse_series_are_released_and_share_the_cap_with_accuracy() -> None:
    t = Telemetry(CollectorRegistry(), max_task_series=2)
    t.record_relapse({"a": 2.0, "b": 4.0})
    assert (_value(t, RELAPSE, "a"), _value(t, RELAPSE, "b")) == (0.02, 0.04)
    assert t.registry.get_sample_value("lethe_max_relapse_ratio") == 0.04
    t.record_accuracies({"c": 50.0}, learned=["c"], unlearned=[])
    assert _value(t, ACCURACY, "c") is None  # a and b hold both slots, in another gauge
    t.record_relapse({"b": 1.0})  # a is no longer measured
    assert _value(t, RELAPSE, "a") is None and _value(t, RELAPSE, "b") == 0.01
    assert t.registry.get_sample_value("lethe_max_relapse_ratio") == 0.01
    t.record_accuracies({"c": 50.0}, learned=["c"], unlearned=[])
    assert _value(t, ACCURACY, "c") == 0.5  # a's slot went to c
    t.record_relapse({})
    assert _value(t, RELAPSE, "b") is None and t.registry.get_sample_value("lethe_max_relapse_ratio") == 0.0


def test_a_task_holding_a_slot_may_have_a_series_in_every_gauge() -> None:
    """The cap counts tasks, not series: a task with an accuracy series also gets its relapse series."""
    t = Telemetry(CollectorRegistry(), max_task_series=1)
    t.record_accuracies({"a": 40.0}, learned=[], unlearned=["a"])
    t.record_relapse({"a": 2.0})
    assert _value(t, ACCURACY, "a") == 0.4
    assert _value(t, RELAPSE, "a") == 0.02
