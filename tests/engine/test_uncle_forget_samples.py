"""Records-level forgetting for ``uncle``: ``sample_forgetting``, ``forget_samples`` and retained training data.

Split digits (sklearn, scaled to [0, 1], ``[n, 1, 8, 8]``), three task-incremental tasks of two
classes each, 70/30 train/held-out split. Digits are easy: a model answers samples it never saw
as well as the ones it trained on, so accuracy on clean samples says nothing about membership.
The samples to forget, S, are therefore *mislabeled* records: 10% of task ``a``'s training samples
with their two labels swapped. A model can answer S with its training labels only by having
memorized S, and a model that never saw S answers it like unseen held-out samples with the same
swap (near 0%). Task ``a`` trains 40 epochs, long enough to memorize S: 96% before forgetting on an
AMD EPYC, 79% on an Intel Xeon (the CPUs' kernels round differently and the trajectories part; at 60
and 80 epochs the Xeon gave 96% and 83%), against 7-8% for the never-seen samples with the same swap.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from server.engine.protocol import (
    LearnOptions,
    Report,
    TaskData,
    UnknownTaskError,
    UnlearnedTaskError,
    no_progress,
)
from server.engine.uncle import UncleStrategy, build_uncle

from .conformance import serialized

CLASSES = {"a": (3, 8), "b": (1, 7), "c": (4, 9)}
#: Long enough for task a to memorize its mislabeled samples.
MEMORIZE = LearnOptions(epochs=40, batch_size=32, learning_rate=1e-3)
OTHERS = LearnOptions(epochs=10, batch_size=32, learning_rate=1e-3)
QUICK = LearnOptions(epochs=1, batch_size=64, learning_rate=1e-3)
FORGET_SHARE = 0.1


@dataclass(frozen=True)
class Digits:
    """Task a's training data (S mislabeled), S, and every task's clean held-out samples."""

    train: dict[str, TaskData]  # what each task learns (a: S mislabeled)
    forget: TaskData  # S, with the labels a learned it with
    kept: TaskData  # a's training data without S, in stream order
    heldout: dict[str, TaskData]  # clean held-out samples of each task
    heldout_swapped: TaskData  # a's held-out samples with the same swap as S: the never-seen level


@functools.cache
def digits() -> Digits:
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    targets = torch.tensor(labels, dtype=torch.int64)
    rng = np.random.default_rng(0)
    train, heldout = {}, {}
    for task, classes in CLASSES.items():
        order = torch.from_numpy(rng.permutation(np.flatnonzero(np.isin(labels, classes))))
        n = int(0.7 * len(order))
        train[task] = TaskData(inputs[order[:n]], targets[order[:n]])
        heldout[task] = TaskData(inputs[order[n:]], targets[order[n:]])
    low, high = CLASSES["a"]
    swap = torch.arange(10)
    swap[low], swap[high] = high, low
    a = train["a"]
    n_forget = int(FORGET_SHARE * len(a))
    labels_a = torch.cat([swap[a.labels[:n_forget]], a.labels[n_forget:]])
    train["a"] = TaskData(a.inputs, labels_a)
    return Digits(
        train=train,
        forget=TaskData(a.inputs[:n_forget], labels_a[:n_forget]),
        kept=TaskData(a.inputs[n_forget:], labels_a[n_forget:]),
        heldout=heldout,
        heldout_swapped=TaskData(heldout["a"].inputs, swap[heldout["a"].labels]),
    )


def build(**options: Any) -> UncleStrategy:
    return build_uncle(
        backbone="mlp", input_shape=(1, 8, 8), num_classes=10, device=torch.device("cpu"), seed=0, **options
    )


def accuracy(strategy: UncleStrategy, task: str, data: TaskData, *, allow_unlearned: bool = False) -> float:
    logits = strategy.predictor().predict(task, data.inputs, allow_unlearned=allow_unlearned)
    return 100.0 * (logits.argmax(dim=1) == data.labels).float().mean().item()


def measure(strategy: UncleStrategy) -> dict[str, float]:
    d = digits()
    return {
        "S": accuracy(strategy, "a", d.forget),
        "heldout_swapped": accuracy(strategy, "a", d.heldout_swapped),
        **{task: accuracy(strategy, task, d.heldout[task]) for task in CLASSES},
    }


def restored(strategy: UncleStrategy) -> UncleStrategy:
    """A fresh strategy that loaded ``strategy``'s state (to change without touching the shared scenario)."""
    copy = build(retain_training_data=True)
    copy.load_state_dict(serialized(strategy.state_dict()))
    return copy


@dataclass
class Scenario:
    """learn a (S mislabeled), b, c with retained data; forget S."""

    strategy: UncleStrategy
    learned: dict[str, Report]
    before: dict[str, float]
    after: dict[str, float]
    version_before: int
    slots_before: dict[str, int]
    predictor_before: Any
    parameters_before: Any
    report: Report


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    d = digits()
    strategy = build(retain_training_data=True)
    learned = {
        task: strategy.learn(task, d.train[task], MEMORIZE if task == "a" else OTHERS, no_progress, {})
        for task in CLASSES
    }
    before = measure(strategy)
    predictor = strategy.predictor()
    parameters = predictor.parameters_for("a")  # generated and cached in the old snapshot
    version, slots = strategy.version, strategy.task_slots()
    report = strategy.forget_samples({"a": d.kept}, no_progress, {})
    return Scenario(strategy, learned, before, measure(strategy), version, slots, predictor, parameters, report)


# --------------------------------------------------------------------------- retained data


def test_learn_hands_the_server_its_very_data_only_when_retaining(scenario: Scenario) -> None:
    for task, report in scenario.learned.items():
        assert report.retain is digits().train[task], task
    plain = build(width=32)
    assert plain.learn("a", digits().kept, QUICK, no_progress, {}).retain is None


def test_without_retained_data_the_reason_names_both_alternatives() -> None:
    strategy = build(width=32)
    strategy.learn("a", digits().kept, QUICK, no_progress, {})
    reason = strategy.sample_forgetting()
    assert reason is not None
    assert "unlearn the whole task" in reason and "training.retain_training_data = true" in reason
    version = strategy.version
    with pytest.raises(ValueError) as raised:
        strategy.forget_samples({"a": digits().forget}, no_progress, {})
    assert str(raised.value) == reason
    assert strategy.version == version
    assert build(retain_training_data=True).sample_forgetting() is None


# --------------------------------------------------------------------------- the main scenario


def test_the_forgotten_samples_answer_like_unseen_data(scenario: Scenario) -> None:
    before, after = scenario.before, scenario.after
    # Before: S was memorized; unseen samples with the same swap are answered with their true class.
    assert before["S"] >= 70.0, before
    assert before["S"] - before["heldout_swapped"] >= 60.0, before
    # After: S is answered like the unseen samples, as by a model that never saw it.
    assert abs(after["S"] - after["heldout_swapped"]) <= 10.0, after
    assert after["S"] <= 20.0, after


def test_the_task_keeps_its_name_and_its_skill(scenario: Scenario) -> None:
    strategy, after = scenario.strategy, scenario.after
    assert after["a"] >= 90.0, after  # clean held-out samples of a, served under its name
    slots = strategy.task_slots()
    assert slots["a"] not in scenario.slots_before.values()  # a new embedding slot...
    assert {t: s for t, s in slots.items() if t != "a"} == {t: s for t, s in scenario.slots_before.items() if t != "a"}
    tasks = strategy.state_dict()["tasks"]
    old, new = tasks[scenario.slots_before["a"]], tasks[slots["a"]]
    assert old["name"] == new["name"] == "a"
    assert old["unlearned"] and old["method"] == "noise-align"  # ...the old one unlearned, as unlearn does
    assert not new["unlearned"] and new["samples"] == len(digits().kept)
    assert new["options"] == MEMORIZE.as_dict() and new["retained"]  # relearned with a's own options


def test_the_other_tasks_move_little(scenario: Scenario) -> None:
    changes = {task: abs(scenario.after[task] - scenario.before[task]) for task in ("b", "c")}
    assert max(changes.values()) <= 3.0, (scenario.before, scenario.after)
    assert sum(changes.values()) <= 5.0, (scenario.before, scenario.after)


def test_one_operation_one_version(scenario: Scenario) -> None:
    metrics = scenario.report.metrics
    assert scenario.strategy.version == scenario.version_before + 1
    assert scenario.report.retain is None
    assert metrics["tasks_relearned"] == 1 and metrics["samples_relearned"] == len(digits().kept)
    assert metrics["unlearn_seconds"] > 0 and metrics["relearn_seconds"] > 0
    assert metrics["burn_in_steps"] == 100 and metrics["fresh_start_steps"] == 100
    assert scenario.strategy.describe()["burn_in"] == pytest.approx(90.0)  # annealed, as by an unlearn


def test_no_snapshot_serves_the_old_network_after_the_commit(scenario: Scenario) -> None:
    fresh = scenario.strategy.predictor()
    assert fresh is not scenario.predictor_before and fresh.version == scenario.predictor_before.version + 1
    old, new = scenario.parameters_before, fresh.parameters_for("a")
    assert any(not torch.equal(new[name], value) for name, value in old.items())
    # The new snapshot serves what the new slot generates: the same as a strategy restored from the state.
    inputs = digits().heldout["a"].inputs
    assert torch.equal(fresh.predict("a", inputs), restored(scenario.strategy).predictor().predict("a", inputs))


# --------------------------------------------------------------------------- state, cancelling, unlearning


def test_state_round_trip_keeps_the_remapped_task(scenario: Scenario) -> None:
    strategy = scenario.strategy
    copy = restored(strategy)
    assert copy.version == strategy.version and copy.task_slots() == strategy.task_slots()
    d = digits()
    for task in CLASSES:
        expected = strategy.predictor().predict(task, d.heldout[task].inputs)
        assert torch.equal(copy.predictor().predict(task, d.heldout[task].inputs), expected), task


def test_a_state_saved_before_options_and_retention_were_recorded_still_loads(scenario: Scenario) -> None:
    state = serialized(scenario.strategy.state_dict())
    tasks = state["tasks"]
    assert isinstance(tasks, list)
    state["tasks"] = [{k: v for k, v in t.items() if k not in ("options", "retained")} for t in tasks]
    old = build(retain_training_data=True)
    old.load_state_dict(state)
    assert old.task_slots() == scenario.strategy.task_slots()  # the name -> slot mapping is part of every state
    inputs = digits().heldout["a"].inputs
    assert torch.equal(old.predictor().predict("a", inputs), scenario.strategy.predictor().predict("a", inputs))
    with pytest.raises(ValueError, match="not retained"):  # its data may not all be on the server
        old.forget_samples({"b": digits().train["b"]}, no_progress, {})


def test_cancelling_changes_nothing(scenario: Scenario) -> None:
    strategy = restored(scenario.strategy)
    predictor, state = strategy.predictor(), strategy.state_dict()
    d = digits()
    logits = {task: predictor.predict(task, d.heldout[task].inputs) for task in CLASSES}
    seen: list[float] = []

    def cancel(fraction: float, message: str) -> None:
        seen.append(fraction)
        if message.startswith("epoch"):  # relearning: the unlearn and the fresh start have run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        strategy.forget_samples({"a": d.kept}, cancel, {})
    assert seen == sorted(seen) and 0.3 < seen[-1] < 1.0
    assert strategy.version == state["version"] and strategy.task_slots() == state["slots"]
    assert strategy.predictor() is predictor
    after = strategy.state_dict()
    assert after["tasks"] == state["tasks"] and after["burn_in"] == state["burn_in"]
    for name, value in state["hypernetwork"].items():
        assert torch.equal(after["hypernetwork"][name], value), name
    assert len(after["embeddings"]) == len(state["embeddings"])
    rebuilt = restored(strategy)  # a new snapshot of the restored state answers as before
    for task in CLASSES:
        assert torch.equal(rebuilt.predictor().predict(task, d.heldout[task].inputs), logits[task]), task


def test_unlearning_the_remapped_task_unlearns_its_current_network(scenario: Scenario) -> None:
    strategy = restored(scenario.strategy)
    d = digits()
    slot = strategy.task_slots()["a"]
    other = accuracy(strategy, "b", d.heldout["b"])
    strategy.unlearn("a", "", no_progress, {})
    assert strategy.task_slots()["a"] == slot and strategy.state_dict()["tasks"][slot]["unlearned"]
    with pytest.raises(UnlearnedTaskError):
        strategy.predictor().predict("a", d.heldout["a"].inputs)
    forgotten = accuracy(strategy, "a", d.heldout["a"], allow_unlearned=True)  # an auditor's view still works
    assert forgotten <= 75.0, forgotten  # two classes: chance is 50
    assert abs(accuracy(strategy, "b", d.heldout["b"]) - other) <= 3.0
    with pytest.raises(UnlearnedTaskError):
        strategy.forget_samples({"a": d.kept}, no_progress, {})


# --------------------------------------------------------------------------- mechanics


def test_several_tasks_at_once_and_again_and_refusals() -> None:
    d = digits()
    strategy = build(retain_training_data=True, width=32, burn_in=10, burn_in_min=5)
    for task in ("a", "b"):
        strategy.learn(task, d.train[task], QUICK, no_progress, {})
    version = strategy.version
    for kept, error in (
        ({"z": d.kept}, UnknownTaskError),
        ({"a": TaskData(d.kept.inputs[:0], d.kept.labels[:0])}, ValueError),
        ({"a": TaskData(d.kept.inputs[:, :, :4], d.kept.labels)}, ValueError),
        ({}, ValueError),
    ):
        with pytest.raises(error):
            strategy.forget_samples(kept, no_progress, {})
    assert strategy.version == version and strategy.task_slots() == {"a": 0, "b": 1}

    fractions: list[float] = []
    half_b = TaskData(d.train["b"].inputs[::2], d.train["b"].labels[::2])
    report = strategy.forget_samples(
        {"b": half_b, "a": d.kept}, lambda fraction, _message: fractions.append(fraction), {}
    )
    assert strategy.version == version + 1 and strategy.task_slots() == {"a": 2, "b": 3}  # in learned order
    assert report.metrics["tasks_relearned"] == 2 and report.metrics["samples_relearned"] == len(d.kept) + len(half_b)
    assert report.metrics["burn_in_steps"] == 10 + 9  # the burn-in anneals after each unlearn
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    strategy.forget_samples({"a": TaskData(d.kept.inputs[::2], d.kept.labels[::2])}, no_progress, {})
    assert strategy.version == version + 2 and strategy.task_slots() == {"a": 4, "b": 3}
    tasks = strategy.state_dict()["tasks"]
    assert [t["name"] for t in tasks] == ["a", "b", "a", "b", "a"]
    assert [t["unlearned"] for t in tasks] == [True, True, True, False, False]
    assert accuracy(strategy, "a", d.heldout["a"]) >= 60.0  # learned again (one quick epoch)
    assert dataclasses.asdict(QUICK) == tasks[4]["options"]
