"""Strategy conformance suite: the properties every strategy must have (DESIGN.md section 8).

Every strategy in the registry (``server.engine.registry.STRATEGIES``) must have at least one
conformance class; ``test_conformance_coverage.py`` fails for a registered strategy that has none.
A conformance class subclasses :class:`StrategyConformance` in a ``test_*.py`` module of
``tests/engine``, is named ``Test...``, and says which registered strategy it tests; the strategy is
then built through the registry, as the server builds it::

    class TestFinetuneCNNConformance(StrategyConformance):
        strategy_name = "finetune"
        backbone = "cnn"
        build_options = {"width": 8}

The other class attributes (learn options, tolerances) can be overridden per strategy, each with
its reason. The data is real: sklearn's bundled digits scaled to [0, 1], shape ``[n, 1, 8, 8]``,
split into two-class tasks with a held-out probe set each. Task-incremental strategies are asked
with the task name, class-incremental ones with ``task=None``. Replaying strategies get their
retained data back as ``replay``, as the server would pass it.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from server.engine import metrics
from server.engine.protocol import (
    LearnOptions,
    Predictor,
    Report,
    Strategy,
    TaskData,
    TemporaryLearning,
    UnknownTaskError,
    UnlearnedTaskError,
    no_progress,
    supports_temporary,
)
from server.engine.registry import build_strategy

INPUT_SHAPE: tuple[int, ...] = (1, 8, 8)
NUM_CLASSES = 10
#: Task name → its classes. Names contain a dot on purpose: task names are client-chosen strings.
TASK_CLASSES: dict[str, tuple[int, ...]] = {"digits.01": (0, 1), "digits.23": (2, 3), "digits.45": (4, 5)}
TASK_A, TASK_B, TASK_C = TASK_CLASSES


@dataclass(frozen=True)
class DigitsTask:
    """One task of the digits stream: training samples and a held-out probe set."""

    train: TaskData
    probe: TaskData


@functools.cache
def digits_tasks(probe_fraction: float = 0.25) -> dict[str, DigitsTask]:
    """Split sklearn's digits into the tasks of :data:`TASK_CLASSES` (deterministic)."""
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
    targets = torch.tensor(labels, dtype=torch.int64)
    rng = np.random.default_rng(0)
    tasks = {}
    for name, classes in TASK_CLASSES.items():
        indices = rng.permutation(np.flatnonzero(np.isin(labels, classes)))
        n_probe = int(len(indices) * probe_fraction)
        probe, train = torch.from_numpy(indices[:n_probe]), torch.from_numpy(indices[n_probe:])
        tasks[name] = DigitsTask(
            train=TaskData(inputs[train], targets[train]), probe=TaskData(inputs[probe], targets[probe])
        )
    return tasks


@dataclass
class ProgressRecorder:
    """A ``Progress`` that records every report and can raise after ``fail_after`` calls."""

    fail_after: int | None = None
    calls: list[tuple[float, str]] = field(default_factory=list)

    def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("cancelled by the test")


class Harness:
    """Drives a strategy the way the worker does: keeps retained data and passes it as replay."""

    def __init__(self, strategy: Strategy, options: LearnOptions) -> None:
        self.strategy = strategy
        self.options = options
        self.retained: dict[str, TaskData] = {}

    def learn(self, task: str, progress: ProgressRecorder | None = None) -> Report:
        report = self.strategy.learn(
            task, digits_tasks()[task].train, self.options, progress or no_progress, dict(self.retained)
        )
        if report.retain is not None and self.strategy.needs_replay:
            self.retained[task] = report.retain
        return report

    def unlearn(self, task: str, method: str | None = None) -> Report:
        self.retained.pop(task, None)  # the server purges before the strategy ever sees replay again
        chosen = self.strategy.unlearn_methods[0] if method is None else method
        return self.strategy.unlearn(task, chosen, no_progress, dict(self.retained))

    def logits(self, task: str, *, allow_unlearned: bool = False, predictor: Predictor | None = None) -> torch.Tensor:
        """Logits ``[n, C]`` of the task's probe set."""
        predictor = predictor or self.strategy.predictor()
        name = task if self.strategy.task_incremental else None
        return predictor.predict(name, digits_tasks()[task].probe.inputs, allow_unlearned=allow_unlearned)

    def accuracy(self, task: str, *, allow_unlearned: bool = False) -> float:
        return metrics.accuracy(self.logits(task, allow_unlearned=allow_unlearned), digits_tasks()[task].probe.labels)


def serialized(state: Mapping[str, object]) -> dict[str, object]:
    """Round-trip ``state`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


class StrategyConformance:
    """Tests every strategy must pass. Subclass it (as ``Test...``) and set :attr:`strategy_name`."""

    #: The registry name of the strategy under test (a key of ``server.engine.registry.STRATEGIES``).
    strategy_name: ClassVar[str]
    #: Backbone the strategy is built with.
    backbone: ClassVar[str] = "mlp"
    #: The strategy's own builder options (``build_strategy(..., options=...)``); empty = its defaults.
    build_options: ClassVar[Mapping[str, Any]] = {}
    #: Training options for every learn (small, for speed).
    options = LearnOptions(epochs=5, batch_size=32, learning_rate=1e-3, seed=0)
    #: Seed of the strategies the suite builds.
    seed = 0
    #: Probe accuracy (percent) each task must reach right after it is learned.
    min_accuracy = 90.0
    #: Unlearning must lower the forgotten task's probe accuracy, as measured with ``allow_unlearned``,
    #: by at least this (percentage points). ``None``: the strategy only promises that the task can no
    #: longer be predicted (``UnlearnedTaskError``) and that the ``allow_unlearned`` answer changed.
    min_forget_drop: float | None = 20.0
    #: Largest change in the retained task's probe accuracy an unlearn may cause (spill, points).
    max_spill = 5.0
    #: Largest change of any finite logit of the retained task an unlearn may cause; None skips the check.
    max_retained_logit_change: float | None = 1e-5
    #: Whether a learn that raises (e.g. cancelled through progress) must leave the strategy unchanged.
    atomic_learn = True

    def make_strategy(self, seed: int) -> Strategy:
        """Return a fresh strategy for ``INPUT_SHAPE`` and ``NUM_CLASSES`` seeded with ``seed``.

        Builds :attr:`strategy_name` through the registry, as the server does, on the CPU.
        """
        return build_strategy(
            self.strategy_name,
            backbone=self.backbone,
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            device=torch.device("cpu"),
            seed=seed,
            options=self.build_options,
        )

    def harness(self, seed: int | None = None) -> Harness:
        return Harness(self.make_strategy(self.seed if seed is None else seed), self.options)

    # -- protocol -------------------------------------------------------------------------------

    def test_satisfies_the_protocol(self) -> None:
        strategy = self.make_strategy(self.seed)
        assert isinstance(strategy, Strategy)
        assert strategy.name == self.strategy_name, "a strategy reports the name it is registered under"
        for flag in (strategy.task_incremental, strategy.needs_replay, supports_temporary(strategy)):
            assert isinstance(flag, bool)
        assert strategy.unlearn_methods and all(isinstance(m, str) and m for m in strategy.unlearn_methods)
        assert strategy.version == 0
        assert strategy.parameter_count() > 0
        assert isinstance(strategy.predictor(), Predictor)

    # -- learning -------------------------------------------------------------------------------

    def test_learns_real_data(self) -> None:
        h = self.harness()
        for expected_version, task in enumerate((TASK_A, TASK_B), start=1):
            progress = ProgressRecorder()
            report = h.learn(task, progress)
            assert h.strategy.version == expected_version
            accuracy = h.accuracy(task)
            assert accuracy >= self.min_accuracy, f"{task}: probe accuracy {accuracy:.1f}% after learning"
            assert all(isinstance(v, float) and math.isfinite(v) for v in report.metrics.values()), report.metrics
            fractions = [fraction for fraction, _ in progress.calls]
            assert fractions, "learn never reported progress"
            assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
            assert fractions[-1] == pytest.approx(1.0)

    def test_predict_output_contract(self) -> None:
        h = self.harness()
        h.learn(TASK_A)
        predictor = h.strategy.predictor()
        assert predictor.version == h.strategy.version
        n = len(digits_tasks()[TASK_A].probe)
        logits = h.logits(TASK_A, predictor=predictor)
        assert logits.shape == (n, NUM_CLASSES)
        assert logits.dtype == torch.float32 and logits.device.type == "cpu"
        assert not torch.isnan(logits).any()
        if h.strategy.task_incremental:
            seen = torch.zeros(NUM_CLASSES, dtype=torch.bool)
            seen[list(TASK_CLASSES[TASK_A])] = True
            assert torch.isneginf(logits[:, ~seen]).all(), "unseen classes must have -inf logits"
            assert torch.isfinite(logits[:, seen]).all()
        with pytest.raises(ValueError):
            predictor.predict(TASK_A if h.strategy.task_incremental else None, torch.zeros(2, 3, 8, 8))

    def test_deterministic_under_a_seed(self) -> None:
        first, second = self.harness(), self.harness()
        for h in (first, second):
            h.learn(TASK_A)
            h.learn(TASK_B)
        for task in (TASK_A, TASK_B):
            assert torch.equal(first.logits(task), second.logits(task)), f"{task}: same seed, different predictions"

    # -- state ----------------------------------------------------------------------------------

    def test_state_dict_round_trip_continues_exactly(self) -> None:
        original = self.harness()
        original.learn(TASK_A)
        original.learn(TASK_B)
        original.unlearn(TASK_A)
        state = original.strategy.state_dict()
        expected = {task: original.logits(task, allow_unlearned=True) for task in (TASK_A, TASK_B)}
        original.learn(TASK_C)  # must not leak into the state taken before

        restored = self.harness(seed=self.seed + 1)  # the state, not the constructor, decides
        restored.strategy.load_state_dict(serialized(state))
        restored.retained = {t: d for t, d in original.retained.items() if t != TASK_C}
        assert restored.strategy.version == state["version"]
        for task, logits in expected.items():
            assert torch.equal(restored.logits(task, allow_unlearned=True), logits), f"{task} changed in round trip"

        # A restart continues exactly: the restored strategy learns C like the original did.
        restored.learn(TASK_C)
        assert restored.strategy.version == original.strategy.version
        for task in (TASK_A, TASK_B, TASK_C):
            assert torch.equal(
                restored.logits(task, allow_unlearned=True), original.logits(task, allow_unlearned=True)
            ), f"{task}: restored strategy diverged from the original"

    def test_failed_learn_changes_nothing(self) -> None:
        if not self.atomic_learn:
            pytest.skip("strategy does not promise atomic learn")
        h = self.harness()
        h.learn(TASK_A)
        version, logits = h.strategy.version, h.logits(TASK_A)
        with pytest.raises(RuntimeError, match="cancelled"):
            h.learn(TASK_B, ProgressRecorder(fail_after=2))
        assert h.strategy.version == version
        assert torch.equal(h.logits(TASK_A), logits)
        if h.strategy.task_incremental:
            with pytest.raises(UnknownTaskError):
                h.logits(TASK_B)
        h.learn(TASK_B)  # and the strategy still works
        assert h.accuracy(TASK_B) >= self.min_accuracy

    # -- unlearning -----------------------------------------------------------------------------

    def test_unlearn_forgets_the_task_and_spares_the_others(self) -> None:
        h = self.harness()
        h.learn(TASK_A)
        h.learn(TASK_B)
        forget_before, retain_before = h.accuracy(TASK_A), h.accuracy(TASK_B)
        forgotten_logits, retained_logits = h.logits(TASK_A), h.logits(TASK_B)
        version = h.strategy.version

        report = h.unlearn(TASK_A)
        assert h.strategy.version == version + 1
        assert all(isinstance(v, float) and math.isfinite(v) for v in report.metrics.values()), report.metrics

        assert not torch.equal(h.logits(TASK_A, allow_unlearned=True), forgotten_logits)
        if self.min_forget_drop is not None:
            forget_after = h.accuracy(TASK_A, allow_unlearned=True)
            assert forget_after <= forget_before - self.min_forget_drop, (
                f"forget accuracy {forget_before:.1f}% -> {forget_after:.1f}%"
            )
        spill = metrics.spill({TASK_B: retain_before}, {TASK_B: h.accuracy(TASK_B)}, TASK_A, [TASK_A, TASK_B])
        assert spill <= self.max_spill
        if self.max_retained_logit_change is not None:
            after = h.logits(TASK_B)
            finite = torch.isfinite(retained_logits)
            assert torch.equal(finite, torch.isfinite(after))
            change = (after[finite] - retained_logits[finite]).abs().max().item()
            assert change <= self.max_retained_logit_change

    def test_unknown_and_unlearned_tasks_are_refused(self) -> None:
        h = self.harness()
        h.learn(TASK_A)
        h.learn(TASK_B)
        with pytest.raises(ValueError):
            h.strategy.unlearn(TASK_A, "no-such-method", no_progress, {})
        h.unlearn(TASK_A)
        if not h.strategy.task_incremental:
            return
        predictor = h.strategy.predictor()
        probe = digits_tasks()[TASK_A].probe.inputs
        with pytest.raises(UnknownTaskError):
            predictor.predict("never-learned", probe)
        with pytest.raises(UnknownTaskError):
            predictor.predict("never-learned", probe, allow_unlearned=True)
        with pytest.raises(UnlearnedTaskError):
            predictor.predict(TASK_A, probe)
        with pytest.raises(ValueError):
            predictor.predict(None, probe)
        with pytest.raises(UnlearnedTaskError):
            h.strategy.unlearn(TASK_A, h.strategy.unlearn_methods[0], no_progress, {})
        with pytest.raises(UnknownTaskError):
            h.strategy.unlearn("never-learned", h.strategy.unlearn_methods[0], no_progress, {})

    # -- export (the optional ``network`` verb) ------------------------------------------------

    def test_network_answers_as_predict(self) -> None:
        h = self.harness()
        if getattr(h.strategy.predictor(), "network", None) is None:
            pytest.skip(f"{self.strategy_name}'s predictor has no network verb (cannot be exported)")
        h.learn(TASK_A)
        h.learn(TASK_B)
        predictor = h.strategy.predictor()
        incremental = h.strategy.task_incremental
        for task in (TASK_A, TASK_B) if incremental else (None,):
            network = predictor.network(task)  # type: ignore[attr-defined]
            assert isinstance(network, torch.nn.Module) and not network.training
            assert all(t.device.type == "cpu" for t in network.state_dict().values())
            assert all(p.dtype == torch.float32 and not p.requires_grad for p in network.parameters())
            probe = digits_tasks()[task or TASK_A].probe.inputs
            expected = predictor.predict(task, probe)
            with torch.no_grad():
                assert torch.equal(network(probe), expected), f"{task}: the network answers otherwise than predict"
                for parameter in network.parameters():  # a private copy: changing it changes nothing served
                    parameter.add_(1.0)
            assert torch.equal(predictor.predict(task, probe), expected)
        with pytest.raises(ValueError):
            predictor.network(None if incremental else TASK_A)  # type: ignore[attr-defined]
        if not incremental:
            return
        with pytest.raises(UnknownTaskError):
            predictor.network("never-learned")  # type: ignore[attr-defined]
        h.unlearn(TASK_A)
        with pytest.raises(UnlearnedTaskError):
            h.strategy.predictor().network(TASK_A)  # type: ignore[attr-defined]

    # -- concurrency ----------------------------------------------------------------------------

    def test_predictor_is_an_immutable_snapshot_under_concurrent_use(self) -> None:
        h = self.harness()
        h.learn(TASK_A)
        predictor = h.strategy.predictor()
        expected = h.logits(TASK_A, predictor=predictor)
        stop = threading.Event()
        errors: list[BaseException] = []
        calls = [0] * 8

        def serve(slot: int) -> None:
            try:
                while not stop.is_set() or calls[slot] == 0:
                    if not torch.equal(h.logits(TASK_A, predictor=predictor), expected):
                        raise AssertionError("a published snapshot changed while the strategy trained")
                    calls[slot] += 1
            except BaseException as error:  # reported in the main thread
                errors.append(error)

        threads = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in range(len(calls))]
        for thread in threads:
            thread.start()
        try:
            h.learn(TASK_B)  # the worker keeps training while predictions are served
            h.unlearn(TASK_A)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not errors, errors
        assert all(calls), calls
        assert predictor.version < h.strategy.version
        if h.strategy.task_incremental:
            with pytest.raises(UnknownTaskError):
                predictor.predict(TASK_B, digits_tasks()[TASK_B].probe.inputs)

    # -- temporary learning (the optional TemporaryLearning capability) -------------------------

    #: Probe accuracy (percent) a temporary task must reach through Predict while it is temporary.
    min_temporary_accuracy = 90.0
    #: Largest drop of the committed task's probe accuracy from its temporary answer (points).
    max_commit_drop = 5.0

    def temporary_harness(self) -> Harness:
        h = self.harness()
        if not supports_temporary(h.strategy):
            pytest.skip(f"strategy {self.strategy_name!r} has no temporary learning")
        return h

    def test_temporary_learning_never_touches_the_main_model(self) -> None:
        """Learn A; learn B temporarily; Predict answers B; forgetting B gives back A's model bit for bit."""
        h = self.temporary_harness()
        strategy = h.strategy
        assert isinstance(strategy, TemporaryLearning)
        h.learn(TASK_A)
        main_before = main_tensors(strategy.state_dict())
        logits_a = h.logits(TASK_A)
        version = strategy.version
        report = strategy.learn_temporary(TASK_B, digits_tasks()[TASK_B].train, self.options, no_progress)
        assert report.retain is digits_tasks()[TASK_B].train, "the server keeps a temporary task's data"
        assert strategy.version == version + 1
        assert strategy.temporary_tasks() == (TASK_B,)
        assert_same_tensors(main_tensors(strategy.state_dict()), main_before)
        assert h.accuracy(TASK_B) >= self.min_temporary_accuracy
        if strategy.task_incremental:
            assert torch.equal(h.logits(TASK_A), logits_a), "the other tasks are answered by the main model"
        with pytest.raises(ValueError, match=r"temporary|already"):
            h.learn(TASK_B)

        forgotten = strategy.forget_temporary(TASK_B, no_progress)
        assert forgotten.metrics["unlearn_seconds"] < 1.0
        assert strategy.temporary_tasks() == ()
        assert_same_tensors(main_tensors(strategy.state_dict()), main_before)
        assert torch.equal(h.logits(TASK_A), logits_a), "A's answers are bit-identical to before B"
        if strategy.task_incremental:
            with pytest.raises((UnknownTaskError, UnlearnedTaskError)):
                h.logits(TASK_B)

    def test_side_networks_survive_a_state_round_trip(self) -> None:
        h = self.temporary_harness()
        strategy = h.strategy
        assert isinstance(strategy, TemporaryLearning)
        h.learn(TASK_A)
        strategy.learn_temporary(TASK_B, digits_tasks()[TASK_B].train, self.options, no_progress)
        expected = {task: h.logits(task) for task in (TASK_A, TASK_B)}
        restored = self.make_strategy(self.seed + 1)
        restored.load_state_dict(serialized(strategy.state_dict()))
        assert isinstance(restored, TemporaryLearning)
        assert restored.temporary_tasks() == (TASK_B,)
        assert restored.version == strategy.version
        for task, logits in expected.items():
            assert torch.equal(Harness(restored, self.options).logits(task), logits)

    def test_failed_temporary_learn_changes_nothing(self) -> None:
        h = self.temporary_harness()
        strategy = h.strategy
        assert isinstance(strategy, TemporaryLearning)
        h.learn(TASK_A)
        before, version = main_tensors(strategy.state_dict()), strategy.version
        with pytest.raises(RuntimeError, match="cancelled"):
            strategy.learn_temporary(TASK_B, digits_tasks()[TASK_B].train, self.options, ProgressRecorder(3))
        assert strategy.version == version and strategy.temporary_tasks() == ()
        assert_same_tensors(main_tensors(strategy.state_dict()), before)

    def test_commit_distills_the_side_network_into_the_main_model(self) -> None:
        h = self.temporary_harness()
        strategy = h.strategy
        assert isinstance(strategy, TemporaryLearning)
        h.learn(TASK_A)
        data = digits_tasks()[TASK_B].train
        strategy.learn_temporary(TASK_B, data, self.options, no_progress)
        temporary = h.accuracy(TASK_B)
        version = strategy.version
        report = strategy.commit_temporary(TASK_B, data, no_progress, dict(h.retained))
        assert strategy.version == version + 1, "a commit is one operation"
        assert strategy.temporary_tasks() == ()
        assert report.metrics["distill_weight"] > 0
        if report.retain is not None and strategy.needs_replay:
            h.retained[TASK_B] = report.retain
        assert h.accuracy(TASK_B) >= temporary - self.max_commit_drop
        # Now a permanent task: it is unlearned the ordinary way.
        h.unlearn(TASK_B)


def main_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a strategy state but its side networks, by path (the main model's part)."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: object, path: str) -> None:
        if isinstance(value, torch.Tensor):
            found[path] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if key != "side_networks":
                    walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}")

    walk(state, "")
    return found


def assert_same_tensors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Same paths, and every tensor equal bit for bit."""
    assert actual.keys() == expected.keys()
    different = [path for path in expected if not torch.equal(actual[path], expected[path])]
    assert not different, f"main-model tensors changed: {different[:5]}"
