"""The ``uncle`` predictor's cache of generated networks: bounded by bytes, least recently used out first.

Real torch, the default ``mlp`` backbone (2×256, 85,002 parameters: 340,008 bytes a network) and
eight 2-class digits tasks learned for one step each: what is tested is serving, not learning
quality. The budgets are chosen in networks: 1 MiB holds three.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits

from server.engine.protocol import LearnOptions, TaskData, no_progress
from server.engine.uncle import SERVING_OPTIONS, UnclePredictor, UncleStrategy, build_uncle

CPU = torch.device("cpu")
INPUT_SHAPE = (1, 8, 8)
TASKS = tuple(f"pair{i}" for i in range(8))
NETWORK_BYTES = 85_002 * 4
ONE_STEP = LearnOptions(epochs=1, batch_size=64, learning_rate=1e-3)


def build(**options: Any) -> UncleStrategy:
    return build_uncle(backbone="mlp", input_shape=INPUT_SHAPE, num_classes=10, device=CPU, seed=0, **options)


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE), torch.tensor(labels)


def pair(index: int, limit: int = 64) -> TaskData:
    """Digits of classes ``index % 5 * 2`` and the next one (the first ``limit``)."""
    inputs, labels = digits()
    first = index % 5 * 2
    keep = ((labels == first) | (labels == first + 1)).nonzero().squeeze(1)[:limit]
    return TaskData(inputs[keep], labels[keep])


@functools.cache
def _state() -> dict[str, Any]:
    strategy = build()
    for index, task in enumerate(TASKS):
        strategy.learn(task, pair(index), ONE_STEP, no_progress, {})
    return strategy.state_dict()


def served(predict_cache_mb: float) -> UnclePredictor:
    """A fresh snapshot of the eight learned tasks, with a cache of ``predict_cache_mb``."""
    strategy = build(predict_cache_mb=predict_cache_mb)
    strategy.load_state_dict(_state())
    return strategy.predictor()


@functools.cache
def probe() -> torch.Tensor:
    return digits()[0][:50]


@functools.cache
def reference() -> dict[str, torch.Tensor]:
    """Each task's logits from a snapshot that caches every network (the budget holds all eight)."""
    predictor = served(512)
    logits = {task: predictor.predict(task, probe()) for task in TASKS}
    assert predictor.cache_stats().entries == len(TASKS)
    return logits


def test_cache_never_exceeds_its_budget_and_serves_every_task_exactly() -> None:
    predictor = served(1.0)  # three networks
    budget = 2**20
    for _ in range(3):
        for task in (*TASKS, *reversed(TASKS)):
            assert torch.equal(predictor.predict(task, probe()), reference()[task])
            stats = predictor.cache_stats()
            assert stats.bytes <= budget and stats.budget_bytes == budget
            assert stats.entries <= budget // NETWORK_BYTES
            assert stats.bytes == stats.entries * NETWORK_BYTES
    stats = predictor.cache_stats()
    assert stats.evictions > 0 and stats.hits > 0
    assert stats.hits + stats.misses == 3 * 2 * len(TASKS)


def test_least_recently_used_is_evicted_first() -> None:
    predictor = served(1.0)
    a, b, c, d = TASKS[:4]
    for task in (a, b, c, a):  # a is now the most recently used; b the least
        predictor.predict(task, probe())
    assert predictor.cache_stats().hits == 1
    predictor.predict(d, probe())  # evicts b
    before = predictor.cache_stats()
    predictor.predict(a, probe())
    predictor.predict(c, probe())
    assert predictor.cache_stats().hits == before.hits + 2  # a and c stayed
    predictor.predict(b, probe())
    assert predictor.cache_stats().misses == before.misses + 1  # b had gone


def test_evicted_then_regenerated_network_is_bit_identical() -> None:
    predictor = served(1.0)
    first = predictor.parameters_for(TASKS[0])
    assert predictor.parameters_for(TASKS[0]) is first  # cached: the same object
    logits = predictor.predict(TASKS[0], probe())
    for task in TASKS[1:4]:  # three others fill the cache
        predictor.predict(task, probe())
    again = predictor.parameters_for(TASKS[0])
    assert again is not first  # it was evicted and generated anew
    assert again.keys() == first.keys()
    assert all(torch.equal(again[name], first[name]) for name in first)
    assert torch.equal(predictor.predict(TASKS[0], probe()), logits)


def test_budget_zero_caches_nothing_and_still_serves() -> None:
    predictor = served(0)
    for task in (*TASKS, *TASKS):
        assert torch.equal(predictor.predict(task, probe()), reference()[task])
    stats = predictor.cache_stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (0, 0, 0, 2 * len(TASKS))


def test_a_network_larger_than_the_budget_is_served_but_not_cached() -> None:
    predictor = served(0.25)  # 262,144 bytes < one network
    assert torch.equal(predictor.predict(TASKS[0], probe()), reference()[TASKS[0]])
    stats = predictor.cache_stats()
    assert (stats.entries, stats.bytes, stats.misses, stats.evictions) == (0, 0, 1, 0)


def test_concurrent_predicts_on_more_tasks_than_fit_match_single_threaded() -> None:
    predictor = served(1.0)
    mismatches: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def hammer(offset: int) -> None:
        try:
            barrier.wait()
            for round_ in range(4):
                for step in range(len(TASKS)):
                    task = TASKS[(offset * 3 + step * (1 + round_ % 2)) % len(TASKS)]
                    if not torch.equal(predictor.predict(task, probe()), reference()[task]):
                        mismatches.append(task)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not mismatches
    stats = predictor.cache_stats()
    assert stats.bytes <= 2**20 and stats.evictions > 0
    assert stats.hits + stats.misses == 4 * 4 * len(TASKS)


def test_concurrent_first_predicts_generate_once() -> None:
    predictor = served(1.0)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(predictor.parameters_for(TASKS[0]))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 6 and all(item is seen[0] for item in seen)
    assert predictor.cache_stats().misses == 1


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_predict_cache_mb_is_validated(value: float) -> None:
    with pytest.raises(ValueError, match="predict_cache_mb must be >= 0"):
        build(predict_cache_mb=value)


def test_a_state_saved_with_one_budget_loads_with_another() -> None:
    saved = build(predict_cache_mb=64)
    saved.learn(TASKS[0], pair(0), ONE_STEP, no_progress, {})
    state = saved.state_dict()
    assert "predict_cache_mb" in SERVING_OPTIONS and "predict_cache_mb" not in state["config"]
    for budget in (0, 1, 2048):
        restored = build(predict_cache_mb=budget)
        restored.load_state_dict(state)
        predictor = restored.predictor()
        assert torch.equal(predictor.predict(TASKS[0], probe()), saved.predictor().predict(TASKS[0], probe()))
        assert predictor.cache_stats().budget_bytes == budget * 2**20
        assert restored.config.predict_cache_mb == budget


def test_describe_reports_the_cache() -> None:
    predictor = served(1.0)
    predictor.predict(TASKS[0], probe())
    predictor.predict(TASKS[0], probe())
    described = predictor.describe()
    assert described["predict_cache_hits"] == 1 and described["predict_cache_misses"] == 1
    assert described["predict_cache_bytes"] == NETWORK_BYTES
    assert described["predict_cache_budget_bytes"] == 2**20
