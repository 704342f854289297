"""The ``uncle`` strategy on real data: permuted digits, mlp backbone (cnn where BatchNorm matters).

Each permuted-digits task is sklearn's digits (scaled to [0, 1], ``[n, 1, 8, 8]``) with a fixed
pixel permutation, all ten classes, 80/20 train/probe split. The main scenario (learn three tasks,
unlearn the middle one, learn a fourth) runs once per module and its measurements are asserted by
several tests. The conformance suite runs in ``test_uncle_conformance.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from dataclasses import dataclass, field
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
from server.engine.training import derive_seed
from server.engine.uncle import UNLEARN_METHODS, UncleStrategy, build_uncle

from .conformance import serialized

CPU = torch.device("cpu")
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
PERMUTED = ("perm.0", "perm.1", "perm.2", "perm.3")
OPTIONS = LearnOptions(epochs=5, batch_size=32, learning_rate=1e-3)
#: Options of the small, fast operations used where learning quality is not what is tested.
QUICK = LearnOptions(epochs=1, batch_size=64, learning_rate=1e-3)


@dataclass(frozen=True)
class Split:
    train: TaskData
    probe: TaskData


@functools.cache
def permuted_digits() -> dict[str, Split]:
    """The permuted-digits tasks: task i permutes the 64 pixels with a fixed permutation (task 0: none)."""
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32)  # [n, 64]
    targets = torch.tensor(labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(targets)))
    n_train = int(0.8 * len(targets))
    train, probe = order[:n_train], order[n_train:]
    tasks = {}
    for i, name in enumerate(PERMUTED):
        pixels = torch.arange(64) if i == 0 else torch.from_numpy(np.random.default_rng(100 + i).permutation(64))
        permuted = inputs[:, pixels].reshape(-1, *INPUT_SHAPE)
        tasks[name] = Split(TaskData(permuted[train], targets[train]), TaskData(permuted[probe], targets[probe]))
    return tasks


@functools.cache
def small_digits(classes: tuple[int, ...] = tuple(range(10)), limit: int = 400) -> Split:
    """A small unpermuted digits task restricted to ``classes`` (for fast mechanics tests)."""
    full = permuted_digits()["perm.0"]

    def pick(data: TaskData) -> TaskData:
        keep = torch.isin(data.labels, torch.tensor(classes)).nonzero().squeeze(1)[:limit]
        return TaskData(data.inputs[keep], data.labels[keep])

    return Split(pick(full.train), pick(full.probe))


def build(backbone: str = "mlp", seed: int = 0, **options: Any) -> UncleStrategy:
    return build_uncle(
        backbone=backbone,
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        device=CPU,
        seed=seed,
        **options,
    )


def accuracy(
    strategy: UncleStrategy, task: str, probe: TaskData | None = None, *, allow_unlearned: bool = True
) -> float:
    """Probe accuracy in percent (unlearned tasks evaluated as an auditor would)."""
    probe = probe or permuted_digits()[task].probe
    logits = strategy.predictor().predict(task, probe.inputs, allow_unlearned=allow_unlearned)
    return 100.0 * (logits.argmax(dim=1) == probe.labels).float().mean().item()


def accuracies(strategy: UncleStrategy) -> dict[str, float]:
    return {task: accuracy(strategy, task) for task in strategy.task_slots()}


# --------------------------------------------------------------------------- the main scenario


@dataclass
class Scenario:
    """learn perm.0, perm.1, perm.2; unlearn perm.1 (noise-align); learn perm.3."""

    strategy: UncleStrategy
    after_learning: dict[str, float] = field(default_factory=dict)  # each task right after its learn
    before_unlearn: dict[str, float] = field(default_factory=dict)
    after_unlearn: dict[str, float] = field(default_factory=dict)
    after_next_learn: dict[str, float] = field(default_factory=dict)
    learn_reports: dict[str, Report] = field(default_factory=dict)
    unlearn_report: Report = field(default_factory=Report)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    result = Scenario(build())
    strategy, tasks = result.strategy, permuted_digits()
    for task in PERMUTED[:3]:
        result.learn_reports[task] = strategy.learn(task, tasks[task].train, OPTIONS, no_progress, {})
        result.after_learning[task] = accuracy(strategy, task)
    result.before_unlearn = accuracies(strategy)
    result.unlearn_report = strategy.unlearn("perm.1", "noise-align", no_progress, {})
    result.after_unlearn = accuracies(strategy)
    task = PERMUTED[3]
    result.learn_reports[task] = strategy.learn(task, tasks[task].train, OPTIONS, no_progress, {})
    result.after_learning[task] = accuracy(strategy, task)
    result.after_next_learn = accuracies(strategy)
    return result


def test_learns_every_permuted_task(scenario: Scenario) -> None:
    for task, value in scenario.after_learning.items():
        assert value >= 85.0, f"{task}: {value:.1f}% right after learning"
    for task, report in scenario.learn_reports.items():
        assert report.metrics["train_accuracy"] >= 85.0, (task, report.metrics)
        assert report.metrics["samples"] == len(permuted_digits()[task].train)
        assert report.metrics["learn_seconds"] > 0
    assert scenario.learn_reports["perm.0"].metrics["regularized_tasks"] == 0
    assert scenario.learn_reports["perm.2"].metrics["regularized_tasks"] == 2


def test_learning_new_tasks_keeps_the_old_ones(scenario: Scenario) -> None:
    for task in ("perm.0", "perm.1"):
        drop = scenario.after_learning[task] - scenario.before_unlearn[task]
        assert drop <= 3.0, f"{task} lost {drop:.1f} points while later tasks were learned"


def test_noise_align_forgets_the_task_without_data(scenario: Scenario) -> None:
    assert scenario.before_unlearn["perm.1"] >= 85.0
    assert scenario.after_unlearn["perm.1"] <= 25.0, scenario.after_unlearn
    metrics = scenario.unlearn_report.metrics
    assert metrics["burn_in_steps"] == 100
    assert metrics["unlearn_seconds"] > 0
    assert scenario.strategy.describe()["burn_in"] == pytest.approx(90.0)  # annealed x0.9


def test_unlearning_spills_little_onto_the_retained_tasks(scenario: Scenario) -> None:
    changes = {t: abs(scenario.after_unlearn[t] - scenario.before_unlearn[t]) for t in ("perm.0", "perm.2")}
    assert max(changes.values()) <= 3.0, changes
    assert sum(changes.values()) <= 5.0, changes  # spill, DESIGN.md section 5


def _learn_three_and_unlearn_the_middle(**options: Any) -> dict[str, Any]:
    """width 64 (36 chunks: 3 tasks' 108 rows fit the output layer's 513 unknowns per column)."""
    strategy = build(width=64, burn_in=30, **options)
    tasks = permuted_digits()
    for task in PERMUTED[:3]:
        strategy.learn(task, tasks[task].train, QUICK, no_progress, {})
    before = {task: strategy.raw_parameters(task) for task in PERMUTED[:3]}
    accuracy_before = accuracies(strategy)
    report = strategy.unlearn("perm.1", "noise-align", no_progress, {})
    moved = {t: float((strategy.raw_parameters(t) - raw).norm() / raw.norm()) for t, raw in before.items()}
    return {"strategy": strategy, "moved": moved, "accuracy_before": accuracy_before, "report": report}


@pytest.mark.parametrize("refit", [True, False])
def test_the_refit_output_layer_leaves_the_other_networks_in_place(refit: bool) -> None:
    # The paper's penalty update, which moves the other networks enough to see what the refit undoes.
    run = _learn_three_and_unlearn_the_middle(refit_head=refit, unlearn_update="penalty")
    moved, strategy = run["moved"], run["strategy"]
    assert moved["perm.1"] >= 0.3, moved  # the forgotten network was pulled toward noise...
    if refit:  # ...and the others generate what they did: not one probe prediction changes
        assert moved["perm.0"] <= 1e-3 and moved["perm.2"] <= 1e-3, moved
        assert all(accuracies(strategy)[t] == run["accuracy_before"][t] for t in ("perm.0", "perm.2"))
        assert run["report"].metrics["refit_residual"] <= 1e-3, run["report"].metrics
    else:  # ...and without the refit the burn-in moved them too
        assert moved["perm.0"] >= 3e-3 and moved["perm.2"] >= 3e-3, moved


def test_the_projected_burn_in_forgets_while_the_others_barely_move_even_without_the_refit() -> None:
    projected = _learn_three_and_unlearn_the_middle(refit_head=False)
    penalty = _learn_three_and_unlearn_the_middle(refit_head=False, unlearn_update="penalty")
    moved = projected["moved"]
    assert moved["perm.1"] >= 0.3, moved
    assert accuracy(projected["strategy"], "perm.1") <= 30.0
    for task in ("perm.0", "perm.2"):
        assert moved[task] <= 2e-3, moved  # first-order zero: only the energy left free and the ReLUs' curvature
        assert moved[task] <= penalty["moved"][task] / 3, (moved, penalty["moved"])
    assert "regularization_loss" not in projected["report"].metrics  # no penalty term was evaluated


def test_the_refit_is_skipped_when_not_one_task_fits_the_output_layer() -> None:
    data = small_digits().train
    fits = build(width=64)  # 36 chunks of 256
    too_many = build(width=64, chunk_size=8)  # 1,122 chunks of 8: more rows per task than 513 unknowns
    assert too_many.describe()["chunks"] > 513
    for strategy, refits in ((fits, True), (too_many, False)):
        strategy.learn("a", data, QUICK, no_progress, {})
        report = strategy.learn("b", data, QUICK, no_progress, {})
        assert ("refit_residual" in report.metrics) == refits, report.metrics
        unlearned = strategy.unlearn("a", "noise-align", no_progress, {})
        assert ("refit_residual" in unlearned.metrics) == refits, unlearned.metrics


def test_an_unlearned_task_does_not_relapse_when_another_is_learned(scenario: Scenario) -> None:
    assert scenario.after_next_learn["perm.1"] <= 25.0, scenario.after_next_learn
    assert abs(scenario.after_next_learn["perm.1"] - scenario.after_unlearn["perm.1"]) <= 5.0
    for task in ("perm.0", "perm.2"):
        assert scenario.after_next_learn[task] >= scenario.before_unlearn[task] - 3.0, scenario.after_next_learn


def test_unlearned_task_is_refused_unless_allowed(scenario: Scenario) -> None:
    predictor = scenario.strategy.predictor()
    probe = permuted_digits()["perm.1"].probe.inputs
    with pytest.raises(UnlearnedTaskError):
        predictor.predict("perm.1", probe)
    assert predictor.predict("perm.1", probe, allow_unlearned=True).shape == (len(probe), NUM_CLASSES)
    with pytest.raises(UnknownTaskError):
        predictor.predict("perm.9", probe, allow_unlearned=True)
    with pytest.raises(ValueError):
        predictor.predict(None, probe)
    with pytest.raises(UnlearnedTaskError):
        scenario.strategy.unlearn("perm.1", "", no_progress, {})
    with pytest.raises(UnknownTaskError):
        scenario.strategy.unlearn("perm.9", "", no_progress, {})
    with pytest.raises(ValueError, match="unknown unlearn method"):
        scenario.strategy.unlearn("perm.0", "forget-harder", no_progress, {})


# --------------------------------------------------------------------------- state


def test_restart_continues_bit_identically() -> None:
    # cnn: the state must also carry the per-task BatchNorm statistics.
    a, b, c = small_digits((0, 1, 2, 3)), small_digits((4, 5, 6)), small_digits((7, 8, 9))
    options = {"width": 4, "burn_in": 5, "burn_in_min": 2}

    uninterrupted = build("cnn", **options)
    uninterrupted.learn("a", a.train, QUICK, no_progress, {})
    uninterrupted.learn("b", b.train, QUICK, no_progress, {})
    uninterrupted.unlearn("a", "", no_progress, {})
    uninterrupted.learn("c", c.train, QUICK, no_progress, {})

    first = build("cnn", **options)
    first.learn("a", a.train, QUICK, no_progress, {})
    first.learn("b", b.train, QUICK, no_progress, {})
    first.unlearn("a", "", no_progress, {})
    state = serialized(first.state_dict())
    restarted = build("cnn", seed=7, **options)  # the state decides, seed included
    restarted.load_state_dict(state)
    assert restarted.version == 3 and restarted.describe()["burn_in"] == pytest.approx(4.5)
    restarted.learn("c", c.train, QUICK, no_progress, {})

    assert restarted.version == uninterrupted.version == 4
    for task, split in {"a": a, "b": b, "c": c}.items():
        expected = uninterrupted.predictor().predict(task, split.probe.inputs, allow_unlearned=True)
        actual = restarted.predictor().predict(task, split.probe.inputs, allow_unlearned=True)
        assert torch.equal(actual, expected), task


def test_load_refuses_a_different_configuration() -> None:
    state = build(beta=0.01).state_dict()
    with pytest.raises(ValueError, match="beta"):
        build().load_state_dict(state)
    with pytest.raises(ValueError, match="not an uncle state"):
        build().load_state_dict({"format": "lethe.finetune/1"})
    unknown = build().state_dict()
    with pytest.raises(ValueError, match="color"):
        build().load_state_dict({**unknown, "config": {**unknown["config"], "color": "red"}})


def test_a_state_saved_before_an_option_existed_loads_with_the_configured_value() -> None:
    old = build(unlearn_update="penalty", unlearn_learning_rate=1e-3)
    old.learn("a", small_digits().train, QUICK, no_progress, {})
    state = old.state_dict()
    predates = ("unlearn_update", "projection_energy", "burn_in_chunks", "projected_output_layer")
    state["config"] = {key: value for key, value in state["config"].items() if key not in predates}
    restored = build(unlearn_update="penalty", unlearn_learning_rate=1e-3)
    restored.load_state_dict(state)
    assert torch.equal(restored.raw_parameters("a"), old.raw_parameters("a"))
    with pytest.raises(ValueError, match="unlearn_learning_rate"):  # an option it does hold must still match
        build().load_state_dict(state)


# --------------------------------------------------------------------------- serving


def test_generated_parameters_are_cached_per_task_and_version() -> None:
    strategy = build()
    data = small_digits()
    strategy.learn("a", data.train, QUICK, no_progress, {})
    predictor = strategy.predictor()
    assert strategy.predictor() is predictor  # same version, same snapshot
    first = predictor.parameters_for("a")
    assert predictor.parameters_for("a") is first
    logits = predictor.predict("a", data.probe.inputs)

    # Concurrent first requests of a fresh snapshot all get the one generated set.
    strategy.learn("b", data.train, QUICK, no_progress, {})
    fresh = strategy.predictor()
    assert fresh is not predictor and fresh.version == predictor.version + 1
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(fresh.parameters_for("a"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 6 and all(item is seen[0] for item in seen)
    assert seen[0] is not first
    # The old snapshot is untouched by the new learn.
    assert predictor.parameters_for("a") is first
    assert torch.equal(predictor.predict("a", data.probe.inputs), logits)
    # Threads share each task's module: concurrent predictions equal a lone one.
    lone = {task: fresh.predict(task, data.probe.inputs) for task in ("a", "b")}
    mismatches: list[str] = []

    def hammer(task: str) -> None:
        for _ in range(20):
            if not torch.equal(fresh.predict(task, data.probe.inputs), lone[task]):
                mismatches.append(task)

    threads = [threading.Thread(target=hammer, args=("ab"[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_unseen_classes_are_masked_and_never_predicted() -> None:
    strategy = build()
    data = small_digits((0, 1, 2, 3, 4))
    strategy.learn("low", data.train, QUICK, no_progress, {})
    logits = strategy.predictor().predict("low", data.probe.inputs)
    assert torch.isneginf(logits[:, 5:]).all() and torch.isfinite(logits[:, :5]).all()
    assert int(logits.argmax(dim=1).max()) <= 4


def test_batchnorm_statistics_are_kept_per_task_and_used_in_eval_mode() -> None:
    strategy = build("cnn", width=4)
    a, b = small_digits((0, 1, 2, 3, 4)), small_digits((5, 6, 7, 8, 9))
    strategy.learn("a", a.train, QUICK, no_progress, {})
    statistics_a = strategy.state_dict()["buffers"][0]
    strategy.learn("b", b.train, QUICK, no_progress, {})
    buffers = strategy.state_dict()["buffers"]
    for name, value in statistics_a.items():
        assert torch.equal(buffers[0][name], value), f"learning b changed a's {name}"
    running_means = [name for name in statistics_a if name.endswith("running_mean")]
    assert running_means and any(not torch.equal(buffers[0][n], buffers[1][n]) for n in running_means)
    # Eval mode: a sample's logits do not depend on the rest of the batch.
    predictor = strategy.predictor()
    batch = predictor.predict("a", a.probe.inputs)
    single = predictor.predict("a", a.probe.inputs[:1])
    assert torch.allclose(batch[:1], single, atol=1e-5)
    # Unlearning resets the task's statistics: they were computed from its data.
    strategy.unlearn("a", "discard-embedding", no_progress, {})
    for name, value in strategy.state_dict()["buffers"][0].items():
        if name.endswith("running_mean"):
            assert torch.equal(value, torch.zeros_like(value)), name
        elif name.endswith("running_var"):
            assert torch.equal(value, torch.ones_like(value)), name


# --------------------------------------------------------------------------- learning mechanics


def test_progress_is_reported_per_step_and_cancelling_changes_nothing() -> None:
    strategy = build()
    data = small_digits()
    calls: list[float] = []
    strategy.learn("a", data.train, QUICK, lambda fraction, _message: calls.append(fraction), {})
    steps = -(-len(data.train) // QUICK.batch_size)
    assert len(calls) == steps and calls == sorted(calls) and calls[-1] == pytest.approx(1.0)

    state = strategy.state_dict()

    def cancel(fraction: float, message: str) -> None:
        if fraction > 0.3:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        strategy.learn("b", data.train, QUICK, cancel, {})
    with pytest.raises(RuntimeError):
        strategy.unlearn("a", "noise-align", cancel, {})
    after = strategy.state_dict()
    assert after["version"] == state["version"] == 1 and after["tasks"] == state["tasks"]
    for name, value in state["hypernetwork"].items():
        assert torch.equal(after["hypernetwork"][name], value), name


def test_subsampled_regularization_bounds_the_step_and_still_protects() -> None:
    strategy = build(max_regularized_tasks=1)
    tasks = permuted_digits()
    for task in PERMUTED[:2]:
        strategy.learn(
            task, tasks[task].train, LearnOptions(epochs=3, batch_size=32, learning_rate=1e-3), no_progress, {}
        )
    before = accuracy(strategy, "perm.0")
    report = strategy.learn("perm.2", tasks["perm.2"].train, QUICK, no_progress, {})
    assert report.metrics["regularized_tasks"] == 2 and report.metrics["regularized_per_step"] == 1
    assert accuracy(strategy, "perm.0") >= before - 5.0


def test_chunk_budget_estimates_the_whole_distance_without_bias() -> None:
    strategy = build(regularized_networks=0.1)
    data = small_digits().train
    for task in ("a", "b", "c"):
        strategy.learn(task, data, QUICK, no_progress, {})
    bank = strategy._target_bank(exclude=-1)
    moved = strategy._trainable_copy(train_chunks=True)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        exact = (moved(bank.embeddings) - strategy._hypernetwork(bank.embeddings)).square().sum(1).mean()
        generator = torch.Generator().manual_seed(0)
        estimates = torch.stack([strategy._regularization(moved, bank, generator) for _ in range(2000)])
    budget = strategy._pairs_per_step(bank)
    assert budget == math.ceil(0.1 * strategy._hypernetwork.num_chunks) < 3 * strategy._hypernetwork.num_chunks
    # Unbiased: the mean of many small-budget estimates is the exact distance (standard error ~1%).
    assert float(estimates.mean()) == pytest.approx(float(exact), rel=0.05)
    assert float(estimates.std()) > 0.05 * float(exact)  # ...and they really are random samples
    # With a budget that covers every pair the estimate is the exact distance.
    strategy.config = dataclasses.replace(strategy.config, regularized_networks=10.0)
    with torch.no_grad():
        value = strategy._regularization(moved, bank, generator)
    assert float(value) == pytest.approx(float(exact), rel=1e-4)


def test_chunk_embeddings_are_trained() -> None:
    data = small_digits()
    for policy, trained_on_second in (("always", True), ("first-task", False)):
        strategy = build(chunk_embedding_training=policy)
        initial = strategy.state_dict()["hypernetwork"]["chunk_embeddings"]
        strategy.learn("a", data.train, QUICK, no_progress, {})
        after_first = strategy.state_dict()["hypernetwork"]["chunk_embeddings"]
        assert not torch.equal(after_first, initial), policy
        strategy.learn("b", data.train, QUICK, no_progress, {})
        after_second = strategy.state_dict()["hypernetwork"]["chunk_embeddings"]
        assert (not torch.equal(after_second, after_first)) is trained_on_second, policy


def test_learning_a_live_task_again_continues_it_and_an_unlearned_name_starts_afresh() -> None:
    strategy = build(burn_in=5, burn_in_min=1)
    low, high = small_digits((0, 1, 2)), small_digits((3, 4))
    strategy.learn("t", low.train, QUICK, no_progress, {})
    strategy.learn("t", high.train, QUICK, no_progress, {})
    assert strategy.task_slots() == {"t": 0}
    logits = strategy.predictor().predict("t", high.probe.inputs)
    assert torch.isfinite(logits[:, :5]).all() and torch.isneginf(logits[:, 5:]).all()  # classes united
    assert strategy.state_dict()["tasks"][0]["samples"] == len(low.train) + len(high.train)

    strategy.unlearn("t", "", no_progress, {})
    strategy.learn("t", low.train, QUICK, no_progress, {})
    assert strategy.task_slots() == {"t": 1}  # a new embedding; the old one stays, unlearned and guarded
    tasks = strategy.state_dict()["tasks"]
    assert [task["unlearned"] for task in tasks] == [True, False]
    strategy.predictor().predict("t", low.probe.inputs)  # live again: no UnlearnedTaskError


# --------------------------------------------------------------------------- unlearning methods


@pytest.fixture(scope="module")
def two_tasks() -> dict[str, Any]:
    """A strategy that learned two small tasks, as a state to start each method from."""
    strategy = build(burn_in=10, burn_in_min=2, burn_in_decay=0.5)
    strategy.learn("a", small_digits((0, 1, 2, 3, 4)).train, QUICK, no_progress, {})
    strategy.learn("b", small_digits((5, 6, 7, 8, 9)).train, QUICK, no_progress, {})
    return strategy.state_dict()


def _from(state: dict[str, Any], **options: Any) -> UncleStrategy:
    """A strategy restored from ``state``, with ``options`` changed (they must not change its structure)."""
    strategy = build(burn_in=10, burn_in_min=2, burn_in_decay=0.5, **options)
    strategy.load_state_dict({**state, "config": {**state["config"], **options}})
    return strategy


def test_every_method_is_accepted_and_noise_align_is_the_default() -> None:
    assert UNLEARN_METHODS[0] == "noise-align"
    assert set(UNLEARN_METHODS) == {"noise-align", "discard-embedding", "norm-reduce", "fixed-noise", "none"}
    assert build().unlearn_methods == UNLEARN_METHODS


@pytest.mark.parametrize("update", ["projected", "penalty"])
def test_unlearning_optimizes_phi_only(two_tasks: dict[str, Any], update: str) -> None:
    strategy = _from(two_tasks, unlearn_update=update)
    embeddings = [e.clone() for e in strategy.state_dict()["embeddings"]]
    report = strategy.unlearn("a", "", no_progress, {})
    state = strategy.state_dict()
    assert report.metrics["burn_in_steps"] == 10
    for before, after in zip(embeddings, state["embeddings"], strict=True):
        assert torch.equal(before, after), "task embeddings are not optimized while unlearning"
    changed = {
        name for name, value in state["hypernetwork"].items() if not torch.equal(value, two_tasks["hypernetwork"][name])
    }
    assert {"trunk.0.weight", "head.weight"} <= changed
    # The projected update edits layers only; the chunk embeddings are inputs of every task's rows.
    assert ("chunk_embeddings" in changed) == (update == "penalty")


def test_none_marks_the_task_unlearned_and_changes_nothing_else(two_tasks: dict[str, Any]) -> None:
    strategy = _from(two_tasks)
    probe = small_digits((0, 1, 2, 3, 4)).probe.inputs
    before = strategy.predictor().predict("a", probe)
    report = strategy.unlearn("a", "none", no_progress, {})
    assert report.metrics["burn_in_steps"] == 0
    with pytest.raises(UnlearnedTaskError):
        strategy.predictor().predict("a", probe)
    assert torch.equal(strategy.predictor().predict("a", probe, allow_unlearned=True), before)
    assert strategy.describe()["burn_in"] == 10  # no burn-in ran, nothing annealed


def test_discard_embedding_replaces_only_the_embedding(two_tasks: dict[str, Any]) -> None:
    strategy = _from(two_tasks)
    probe_b = small_digits((5, 6, 7, 8, 9)).probe.inputs
    retained = strategy.predictor().predict("b", probe_b)
    strategy.unlearn("a", "discard-embedding", no_progress, {})
    state = strategy.state_dict()
    assert not torch.equal(state["embeddings"][0], two_tasks["embeddings"][0])
    assert torch.equal(strategy.predictor().predict("b", probe_b), retained)  # φ untouched: no spill at all
    assert strategy.describe()["burn_in"] == 10


def test_norm_reduce_and_fixed_noise_move_the_output_toward_their_targets(two_tasks: dict[str, Any]) -> None:
    norms = {}
    for method in ("norm-reduce", "fixed-noise"):
        strategy = _from(two_tasks)
        before = strategy.raw_parameters("a")
        report = strategy.unlearn("a", method, no_progress, {})
        after = strategy.raw_parameters("a")
        assert report.metrics["burn_in_steps"] == 10
        norms[method] = (before.norm().item(), after.norm().item())
        if method == "fixed-noise":
            # The fixed draw is the same for every strategy of a seed: measure the distance to it.
            fixed = torch.Generator().manual_seed(derive_seed(0, "fixed-noise"))
            z = torch.randn(before.numel(), generator=fixed)
            assert (after - z).norm() < (before - z).norm()
    assert norms["norm-reduce"][1] < norms["norm-reduce"][0]


def test_burn_in_anneals_to_its_minimum() -> None:
    strategy = build(burn_in=10, burn_in_decay=0.5, burn_in_min=3)
    data = small_digits((0, 1))
    for task in "abcd":
        strategy.learn(task, data.train, QUICK, no_progress, {})
    steps = [strategy.unlearn(task, "", no_progress, {}).metrics["burn_in_steps"] for task in "abc"]
    assert steps == [10, 5, 3]
    assert strategy.unlearn("d", "discard-embedding", no_progress, {}).metrics["burn_in_steps"] == 0
    assert strategy.describe()["burn_in"] == 3


# --------------------------------------------------------------------------- sizes and options


def test_sizes_are_reported() -> None:
    strategy = build()
    sizes = strategy.describe()
    assert sizes["target_parameters"] == 85_002  # mlp 64-256-256-10
    assert sizes["hypernetwork_to_target_ratio"] == pytest.approx(sizes["hypernetwork_parameters"] / 85_002)
    strategy.learn("a", small_digits().train, QUICK, no_progress, {})
    assert strategy.parameter_count() == sizes["hypernetwork_parameters"] + 32  # plus one task embedding


def test_builder_reports_every_invalid_option_at_once() -> None:
    with pytest.raises(ValueError) as error:
        build(
            gamma=0,
            burn_in_min=500,
            chunk_embedding_training="sometimes",
            lr_milestones=(0.9, 0.5),
            unlearn_update="exact",
            projection_energy=1.0,
            burn_in_chunks=0,
        )
    for option in (
        "gamma",
        "burn_in_min",
        "chunk_embedding_training",
        "lr_milestones",
        "unlearn_update",
        "projection_energy",
        "burn_in_chunks",
    ):
        assert option in str(error.value)


# --------------------------------------------------------------------------- longer measurements


@pytest.mark.slow
def test_relapse_guard_keeps_an_unlearned_task_forgotten_when_a_similar_one_is_learned() -> None:
    """Learn A, learn B, unlearn A, then learn A's very data under a new name: does A come back?"""
    tasks = permuted_digits()
    options = LearnOptions(epochs=3, batch_size=32, learning_rate=1e-3)
    relapse = {}
    for guard in (True, False):
        values = []
        for seed in (0, 1):
            strategy = build(seed=seed, relapse_guard=guard)
            strategy.learn("A", tasks["perm.0"].train, options, no_progress, {})
            strategy.learn("B", tasks["perm.1"].train, options, no_progress, {})
            strategy.unlearn("A", "", no_progress, {})
            at_unlearn = accuracy(strategy, "A", tasks["perm.0"].probe)
            strategy.learn("A-again", tasks["perm.0"].train, options, no_progress, {})
            strategy.learn("C", tasks["perm.2"].train, options, no_progress, {})
            values.append(abs(accuracy(strategy, "A", tasks["perm.0"].probe) - at_unlearn))
        relapse[guard] = float(np.mean(values))
    assert relapse[True] <= 5.0, relapse
    assert relapse[True] <= relapse[False], relapse
