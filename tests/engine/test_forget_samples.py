"""Records-level forgetting in the engine: ``forget_samples``, ``sample_forgetting``, ``rollback_predictor``.

The property under test is exactness: forgetting some samples of live tasks leaves the model bit for
bit what the same strategy holds after learning the reduced stream from the start. The data is real
(sklearn digits scaled to [0, 1], ``[n, 1, 8, 8]``, 10 classes) cut into seven chunks of 150 samples
``m1 .. m7``; a small :class:`Server` stands in for the worker: it keeps ``Report.retain``, passes it
back as ``replay``, and after a records forgetting keeps what remains of the affected tasks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from server.engine.finetune import FinetuneStrategy, build_finetune
from server.engine.lure import LurePredictor, LureStrategy, build_lure
from server.engine.protocol import LearnOptions, Report, TaskData, no_progress

from .conformance import serialized

CPU = torch.device("cpu")
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
CHUNK = 150
STREAM = ("m1", "m2", "m3", "m4", "m5", "m6")
LURE_OPTIONS = LearnOptions(epochs=2, batch_size=64, learning_rate=0.05, seed=3)
FINETUNE_OPTIONS = LearnOptions(epochs=2, batch_size=32, learning_rate=1e-3, seed=3)


@dataclass(frozen=True)
class Digits:
    chunks: dict[str, TaskData]
    test: torch.Tensor  # [n, 1, 8, 8], held out from every chunk


@functools.cache
def digits() -> Digits:
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
    targets = torch.tensor(labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    chunks = {}
    for k in range(7):
        index = order[k * CHUNK : (k + 1) * CHUNK]
        chunks[f"m{k + 1}"] = TaskData(inputs[index], targets[index])
    return Digits(chunks, inputs[order[7 * CHUNK : 7 * CHUNK + 250]])


@functools.cache
def reduced(name: str) -> TaskData:
    """Chunk ``name`` without some of its samples, the rest in stream order.

    ``m2`` loses every 10th sample; ``m4`` every 7th and every sample of class 9 (so a task can lose
    a class); any other chunk its first 20.
    """
    data = digits().chunks[name]
    position = torch.arange(len(data))
    if name == "m2":
        keep = position % 10 != 0
    elif name == "m4":
        keep = (position % 7 != 0) & (data.labels != 9)
    else:
        keep = position >= 20
    return TaskData(data.inputs[keep], data.labels[keep])


@dataclass
class Server:
    """What the worker does around a strategy: keep retained data, pass it back as replay."""

    strategy: Any
    options: LearnOptions
    retained: dict[str, TaskData] = field(default_factory=dict)

    def learn(self, *names: str, data: Mapping[str, TaskData] | None = None) -> None:
        for name in names:
            given = (data or {}).get(name, digits().chunks[name])
            report = self.strategy.learn(name, given, self.options, no_progress, dict(self.retained))
            if self.strategy.sample_forgetting() is None:
                assert report.retain is given  # the very object: the server keeps it as the training data
            if report.retain is not None:
                self.retained[name] = report.retain

    def forget(self, kept: Mapping[str, TaskData], progress: Any = no_progress) -> Report:
        replay = {name: data for name, data in self.retained.items() if name not in kept}
        report: Report = self.strategy.forget_samples(kept, progress, replay)
        self.retained.update(kept)
        return report

    def unlearn(self, name: str) -> None:
        self.strategy.unlearn(name, "", no_progress, {k: v for k, v in self.retained.items() if k != name})
        self.retained.pop(name, None)


def _lure(seed: int = 7, **options: Any) -> LureStrategy:
    return build_lure(
        backbone="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=seed, **options
    )


def _finetune(seed: int = 7, retain: bool = True) -> FinetuneStrategy:
    return build_finetune(
        backbone="mlp",
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        device=CPU,
        seed=seed,
        retain_training_data=retain,
    )


def _assert_same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different}"


def _reduced_stream(*affected: str) -> dict[str, TaskData]:
    return {name: reduced(name) for name in affected}


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


class CancelledError(Exception):
    """What the tests' progress callbacks raise to cancel."""


def _cancel_after(calls: int) -> Any:
    seen = [0]

    def progress(fraction: float, message: str) -> None:
        seen[0] += 1
        if seen[0] > calls:
            raise CancelledError(message)

    return progress


# ---------------------------------------------------------------------------------------- lure


def _lure_predictions(strategy: LureStrategy) -> torch.Tensor:
    return strategy.predictor().predict(None, digits().test)


def _assert_same_lure(mine: LureStrategy, theirs: LureStrategy) -> None:
    _assert_same_state(mine.model.state_dict(), theirs.model.state_dict())
    assert torch.equal(_lure_predictions(mine), _lure_predictions(theirs))
    assert mine.megabatches == theirs.megabatches
    for a, b in zip(mine.state_dict()["stream"], theirs.state_dict()["stream"], strict=True):
        assert (a["before"] is None) == (b["before"] is None)
        if a["before"] is not None:
            _assert_same_state(a["before"], b["before"])


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize(("snapshot_every", "replayed"), [(1, 5), (2, 6)])
def test_lure_forgetting_samples_equals_learning_the_reduced_stream(snapshot_every: int, replayed: int) -> None:
    """snapshot_every=2 keeps snapshots before m1, m3, m5: forgetting in m2 rolls back to before m1."""
    server = Server(_lure(snapshot_every=snapshot_every), LURE_OPTIONS)
    server.learn(*STREAM)
    assert server.strategy.sample_forgetting() is None
    report = server.forget(_reduced_stream("m2", "m4"))
    assert report.metrics["replayed_megabatches"] == replayed
    assert report.metrics["unlearn_seconds"] > 0
    assert server.strategy.version == len(STREAM) + 1  # bumped once

    never = Server(_lure(snapshot_every=snapshot_every), LURE_OPTIONS)
    never.learn(*STREAM, data=_reduced_stream("m2", "m4"))
    _assert_same_lure(server.strategy, never.strategy)


@pytest.mark.usefixtures("deterministic")
def test_lure_exact_unlearning_after_forgetting_samples_is_still_exact() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn(*STREAM[:4])
    server.forget(_reduced_stream("m3"))
    server.unlearn("m2")
    never = Server(_lure(), LURE_OPTIONS)
    never.learn("m1", "m3", "m4", data=_reduced_stream("m3"))
    _assert_same_lure(server.strategy, never.strategy)


@pytest.mark.usefixtures("deterministic")
def test_lure_cancelled_forgetting_changes_nothing() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn(*STREAM[:4])
    version = server.strategy.version
    state = server.strategy.state_dict()
    predictions = _lure_predictions(server.strategy)
    replay = {name: data for name, data in server.retained.items() if name != "m2"}
    for calls in (0, 3, 40):  # at once, during the first replayed mega-batch, later
        with pytest.raises(CancelledError):
            server.strategy.forget_samples(_reduced_stream("m2"), _cancel_after(calls), replay)
        assert server.strategy.version == version
        _assert_same_state(server.strategy.model.state_dict(), state["model"])
        assert torch.equal(_lure_predictions(server.strategy), predictions)
        assert server.strategy.megabatches == STREAM[:4]
        for a, b in zip(server.strategy.state_dict()["stream"], state["stream"], strict=True):
            _assert_same_state(a["before"], b["before"])
            assert a["before_version"] == b["before_version"]
    # And the uncancelled run afterwards is exact: the cancelled ones left nothing behind.
    server.forget(_reduced_stream("m2"))
    never = Server(_lure(), LURE_OPTIONS)
    never.learn(*STREAM[:4], data=_reduced_stream("m2"))
    _assert_same_lure(server.strategy, never.strategy)


@pytest.mark.usefixtures("deterministic")
def test_lure_state_round_trip_after_forgetting_continues_exactly() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn(*STREAM[:4])
    server.forget(_reduced_stream("m2"))
    restored = Server(_lure(seed=99), LURE_OPTIONS, dict(server.retained))  # the saved seed wins
    state = serialized(server.strategy.state_dict())
    restored.strategy.load_state_dict(state)
    assert [e["before_version"] for e in restored.strategy.state_dict()["stream"]] == [0, 1, -1, -1]
    for s in (server, restored):
        s.learn("m5")
        s.forget(_reduced_stream("m3"))
    _assert_same_lure(restored.strategy, server.strategy)
    assert restored.strategy.version == server.strategy.version == 7

    never = Server(_lure(), LURE_OPTIONS)
    never.learn("m1", "m2", "m3", "m4", "m5", data=_reduced_stream("m2", "m3"))
    _assert_same_lure(server.strategy, never.strategy)


def test_lure_refuses_what_it_cannot_forget_exactly() -> None:
    buffered = Server(_lure(replay="buffer:20"), LURE_OPTIONS)
    reason = buffered.strategy.sample_forgetting()
    assert reason is not None and "replay=full" in reason and "buffer:20" in reason and "whole" in reason
    buffered.learn("m1", "m2")
    with pytest.raises(ValueError, match="replay=full"):
        buffered.strategy.forget_samples(_reduced_stream("m2"), no_progress, {})

    server = Server(_lure(), LURE_OPTIONS)
    server.learn("m1", "m2", "m3")
    server.unlearn("m3")
    m2 = digits().chunks["m2"]
    others = {"m1": server.retained["m1"]}
    cases: list[tuple[Mapping[str, TaskData], Mapping[str, TaskData], str]] = [
        ({}, server.retained, "at least one"),
        ({"m9": m2}, server.retained, "not live.*'m9'"),
        ({"m3": m2}, server.retained, "not live.*'m3'"),  # unlearned whole
        ({"m2": TaskData(m2.inputs[:0], m2.labels[:0])}, others, "no training sample of mega-batch 'm2'"),
        ({"m2": TaskData(m2.inputs, m2.labels + NUM_CLASSES)}, others, "kept data of mega-batch 'm2': labels"),
        ({"m2": reduced("m2")}, {}, "missing: 'm1'"),
    ]
    for kept, replay, message in cases:
        with pytest.raises(ValueError, match=message):
            server.strategy.forget_samples(kept, no_progress, replay)
    assert server.strategy.version == 4  # nothing changed


# ------------------------------------------------------------------------- lure rollback_predictor


def _rollback_logits(predictor: LurePredictor | None) -> torch.Tensor:
    assert predictor is not None
    return predictor.predict(None, digits().test)


def _reference(*names: str, data: Mapping[str, TaskData] | None = None, **options: Any) -> Server:
    server = Server(_lure(**options), LURE_OPTIONS)
    server.learn(*names, data=data)
    return server


@pytest.mark.usefixtures("deterministic")
def test_lure_rollback_predictor_serves_the_model_before_the_first_task() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn(*STREAM)
    strategy = server.strategy
    own = _lure_predictions(strategy)
    own_state = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    rng = torch.get_rng_state()

    predictor = strategy.rollback_predictor(["m5", "m3", "nope"])  # the first in the stream is m3
    assert predictor is not None and predictor.version == 2
    two = _reference("m1", "m2")
    assert torch.equal(_rollback_logits(predictor), _lure_predictions(two.strategy))
    initial = strategy.rollback_predictor({"m1"})
    assert initial is not None and initial.version == 0
    assert torch.equal(_rollback_logits(initial), _lure_predictions(_lure()))
    assert strategy.rollback_predictor({"nope"}) is None
    assert strategy.rollback_predictor([]) is None

    # The strategy itself is untouched, and so is the global RNG the worker's training seeds.
    assert torch.equal(torch.get_rng_state(), rng)
    assert strategy.version == len(STREAM)
    assert strategy.predictor().version == len(STREAM)
    assert torch.equal(_lure_predictions(strategy), own)
    _assert_same_state(strategy.model.state_dict(), own_state)

    # After forgetting samples of m4, the rollback point before m4 is the same model, served at v3;
    # the snapshots the replay computed after it were never served, so m5 falls back to it.
    server.forget(_reduced_stream("m4"))
    three = _reference("m1", "m2", "m3")
    for tasks in (["m4"], ["m5", "m6"]):
        predictor = strategy.rollback_predictor(tasks)
        assert predictor is not None and predictor.version == 3
        assert torch.equal(_rollback_logits(predictor), _lure_predictions(three.strategy))


@pytest.mark.usefixtures("deterministic")
def test_lure_rollback_predictor_with_sparse_snapshots_and_after_approximate_unlearning() -> None:
    server = Server(_lure(snapshot_every=2, relearn_epochs=1), LURE_OPTIONS)
    server.learn("m1", "m2", "m3", "m4")
    predictor = server.strategy.rollback_predictor({"m4"})  # snapshots before m1 and m3 only
    assert predictor is not None and predictor.version == 2
    assert torch.equal(_rollback_logits(predictor), _lure_predictions(_reference("m1", "m2").strategy))

    # Approximate unlearning of m3 hands its clean snapshot (served at v2) on to m4.
    server.strategy.unlearn("m3", "approximate", no_progress, dict(server.retained))
    predictor = server.strategy.rollback_predictor({"m4"})
    assert predictor is not None and predictor.version == 2
    assert torch.equal(_rollback_logits(predictor), _lure_predictions(_reference("m1", "m2").strategy))


def test_lure_rollback_predictor_of_a_state_without_versions_is_none() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn("m1", "m2")
    state = server.strategy.state_dict()
    del state["pending_before_version"]
    for entry in state["stream"]:
        del entry["before_version"]
    older = _lure()
    older.load_state_dict(state)
    assert older.rollback_predictor({"m2"}) is None  # no served version names the snapshots
    assert server.strategy.rollback_predictor({"m2"}) is not None


@pytest.mark.usefixtures("deterministic")
def test_lure_rollback_predictor_from_another_thread_leaves_training_deterministic() -> None:
    server = Server(_lure(), LURE_OPTIONS)
    server.learn(*STREAM[:4])
    versions: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            predictor = server.strategy.rollback_predictor({"m3"})
            assert predictor is not None
            predictor.predict(None, digits().test[:8])
            versions.append(predictor.version)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        server.forget(_reduced_stream("m2"))
        server.learn("m5")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert versions and set(versions) <= {1, 2}  # before m3: served at v2, then (after the replay) m2's v1
    never = _reference("m1", "m2", "m3", "m4", "m5", data=_reduced_stream("m2"))
    _assert_same_lure(server.strategy, never.strategy)


# ---------------------------------------------------------------------------------------- finetune


def _finetune_predictions(strategy: FinetuneStrategy, tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    predictor = strategy.predictor()
    return {task: predictor.predict(task, digits().test) for task in tasks}


def _assert_same_finetune(mine: FinetuneStrategy, theirs: FinetuneStrategy, tasks: tuple[str, ...]) -> None:
    a, b = mine.state_dict(), theirs.state_dict()
    _assert_same_state(a["trunk"], b["trunk"])
    assert a["heads"].keys() == b["heads"].keys() == set(tasks)
    for task in tasks:
        _assert_same_state(a["heads"][task], b["heads"][task])
    assert {t: a["classes"][t] for t in tasks} == {t: b["classes"][t] for t in tasks}
    assert [e["task"] for e in a["learned"]] == [e["task"] for e in b["learned"]] == list(tasks)
    for x, y in zip(a["learned"], b["learned"], strict=True):
        _assert_same_state(x["trunk_before"], y["trunk_before"])
    mine_logits, their_logits = _finetune_predictions(mine, tasks), _finetune_predictions(theirs, tasks)
    assert all(torch.equal(mine_logits[t], their_logits[t]) for t in tasks)


@pytest.mark.usefixtures("deterministic")
def test_finetune_forgetting_samples_equals_learning_the_reduced_stream() -> None:
    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn(*STREAM)
    assert server.strategy.sample_forgetting() is None
    m1_head = server.strategy.state_dict()["heads"]["m1"]
    report = server.forget(_reduced_stream("m2", "m4"))
    assert report.metrics["replayed_tasks"] == 5 and report.metrics["unlearn_seconds"] > 0
    assert server.strategy.version == len(STREAM) + 1
    _assert_same_state(server.strategy.state_dict()["heads"]["m1"], m1_head)  # earlier heads untouched

    never = Server(_finetune(), FINETUNE_OPTIONS)
    never.learn(*STREAM, data=_reduced_stream("m2", "m4"))
    _assert_same_finetune(server.strategy, never.strategy, STREAM)
    # m4 lost every sample of class 9, so the task no longer has that class.
    assert torch.isneginf(server.strategy.predictor().predict("m4", digits().test)[:, 9]).all()


@pytest.mark.usefixtures("deterministic")
def test_finetune_tasks_unlearned_whole_are_not_learned_again() -> None:
    # Unlearned after the first affected task: not replayed, so its influence on the trunk goes.
    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn("m1", "m2", "m3", "m4")
    server.unlearn("m3")
    server.forget(_reduced_stream("m2"))
    never = Server(_finetune(), FINETUNE_OPTIONS)
    never.learn("m1", "m2", "m4", data=_reduced_stream("m2"))
    _assert_same_finetune(server.strategy, never.strategy, ("m1", "m2", "m4"))

    # Learned before it: its influence is in the rollback copy and stays.
    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn("m1", "m2", "m3")
    server.unlearn("m1")
    server.forget(_reduced_stream("m2"))
    never = Server(_finetune(), FINETUNE_OPTIONS)
    never.learn("m1", "m2", "m3", data=_reduced_stream("m2"))
    never.unlearn("m1")
    _assert_same_finetune(server.strategy, never.strategy, ("m2", "m3"))


@pytest.mark.usefixtures("deterministic")
def test_finetune_cancelled_forgetting_changes_nothing() -> None:
    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn(*STREAM[:4])
    state = server.strategy.state_dict()
    predictions = _finetune_predictions(server.strategy, STREAM[:4])
    replay = {name: data for name, data in server.retained.items() if name != "m2"}
    for calls in (0, 5, 30):
        with pytest.raises(CancelledError):
            server.strategy.forget_samples(_reduced_stream("m2"), _cancel_after(calls), replay)
        now = server.strategy.state_dict()
        assert now["version"] == state["version"] and now["classes"] == state["classes"]
        _assert_same_state(now["trunk"], state["trunk"])
        for task in STREAM[:4]:
            _assert_same_state(now["heads"][task], state["heads"][task])
        for a, b in zip(now["learned"], state["learned"], strict=True):
            assert a["task"] == b["task"]
            _assert_same_state(a["trunk_before"], b["trunk_before"])
        after = _finetune_predictions(server.strategy, STREAM[:4])
        assert all(torch.equal(after[t], predictions[t]) for t in STREAM[:4])
    server.forget(_reduced_stream("m2"))
    never = Server(_finetune(), FINETUNE_OPTIONS)
    never.learn(*STREAM[:4], data=_reduced_stream("m2"))
    _assert_same_finetune(server.strategy, never.strategy, STREAM[:4])


@pytest.mark.usefixtures("deterministic")
def test_finetune_state_round_trip_after_forgetting_continues_exactly() -> None:
    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn(*STREAM[:4])
    server.forget(_reduced_stream("m3"))
    state = serialized(server.strategy.state_dict())
    restored = Server(_finetune(), FINETUNE_OPTIONS, dict(server.retained))
    restored.strategy.load_state_dict(state)
    for s in (server, restored):
        s.learn("m5")
        s.forget(_reduced_stream("m2"))
    tasks = STREAM[:5]
    _assert_same_finetune(restored.strategy, server.strategy, tasks)
    never = Server(_finetune(), FINETUNE_OPTIONS)
    never.learn(*tasks, data=_reduced_stream("m2", "m3"))
    _assert_same_finetune(server.strategy, never.strategy, tasks)

    # Without retain_training_data the trunk copies are dropped on load.
    plain = _finetune(retain=False)
    plain.load_state_dict(state)
    assert plain.state_dict()["learned"] == []


def test_finetune_refuses_what_it_cannot_forget_exactly() -> None:
    plain = Server(_finetune(retain=False), FINETUNE_OPTIONS)
    reason = plain.strategy.sample_forgetting()
    assert reason is not None and "training.retain_training_data = true" in reason and "whole task" in reason
    plain.learn("m1", "m2")
    assert plain.retained == {}  # nothing retained without the option
    with pytest.raises(ValueError, match="retain_training_data"):
        plain.strategy.forget_samples(_reduced_stream("m2"), no_progress, {})

    # A state saved without the option loads with it, but its tasks cannot be replayed.
    upgraded = _finetune()
    upgraded.load_state_dict(plain.strategy.state_dict())
    with pytest.raises(ValueError, match="'m1', 'm2' were learned without retain_training_data"):
        upgraded.forget_samples(_reduced_stream("m2"), no_progress, {"m1": digits().chunks["m1"]})

    server = Server(_finetune(), FINETUNE_OPTIONS)
    server.learn("m1", "m2", "m3")
    with pytest.raises(ValueError, match="already learned"):
        server.learn("m2")  # a task is learned in one call when its data must be replayable
    server.unlearn("m3")
    m2 = digits().chunks["m2"]
    cases: list[tuple[Mapping[str, TaskData], Mapping[str, TaskData], str]] = [
        ({}, server.retained, "at least one"),
        ({"m9": m2}, server.retained, "not live.*'m9'"),
        ({"m3": m2}, server.retained, "not live.*'m3'"),
        ({"m2": TaskData(m2.inputs[:0], m2.labels[:0])}, {}, "no training sample of task 'm2'"),
        ({"m1": reduced("m1")}, {}, "missing: 'm2'"),
    ]
    for kept, replay, message in cases:
        with pytest.raises(ValueError, match=message):
            server.strategy.forget_samples(kept, no_progress, replay)
    assert server.strategy.version == 4
    # Only the tasks from the first affected one on are needed: m1 is not replayed here.
    server.strategy.forget_samples({"m2": reduced("m2")}, no_progress, {})
    assert server.strategy.version == 5
    assert not hasattr(server.strategy, "rollback_predictor")  # task-incremental: the server refuses instead
