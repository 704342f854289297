"""``UncleStrategy.forget_more``: the stronger forgetting the worker asks for while forgetting is unverified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from server.engine.protocol import LearnOptions, TaskData, UnlearnedTaskError, no_progress
from server.engine.uncle import UncleStrategy, build_uncle

QUICK = LearnOptions(epochs=2, batch_size=64, learning_rate=1e-3)
BURN_IN = 8


def _digits(classes: tuple[int, ...]) -> TaskData:
    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, classes)
    inputs = torch.tensor(images[keep] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return TaskData(inputs, torch.tensor(labels[keep], dtype=torch.int64))


def _learned(method: str) -> UncleStrategy:
    strategy = build_uncle(
        backbone="mlp", input_shape=(1, 8, 8), num_classes=10, device=torch.device("cpu"), seed=0, width=32,
        burn_in=BURN_IN, burn_in_min=1,
    )  # fmt: skip
    strategy.learn("a", _digits((0, 1)), QUICK, no_progress, {})
    strategy.learn("b", _digits((2, 3)), QUICK, no_progress, {})
    strategy.unlearn("a", method, no_progress, {})
    return strategy


@pytest.mark.parametrize("method", ["none", "discard-embedding"])
def test_nothing_stronger_for_an_ablation_or_a_discarded_embedding(method: str) -> None:
    strategy = _learned(method)
    version, before = strategy.version, strategy.raw_parameters("a").clone()
    assert strategy.forget_more("a", 1, no_progress, final=True) is None
    assert strategy.version == version and torch.equal(strategy.raw_parameters("a"), before)


def test_more_burn_in_then_a_fresh_embedding_each_committed() -> None:
    strategy = _learned("noise-align")
    other = strategy.raw_parameters("b").clone()
    embedding = strategy.state_dict()["embeddings"][0]
    steps: list[str] = []

    first = strategy.forget_more("a", 1, lambda fraction, message: steps.append(message), final=False)
    assert first is not None and first.metrics["burn_in_steps"] == 2 * BURN_IN
    assert first.metrics["forget_more_attempt"] == 1.0 and len(steps) == 2 * BURN_IN
    assert strategy.version == 4  # two learns, the unlearn, this attempt
    assert torch.equal(strategy.state_dict()["embeddings"][0], embedding)  # a burn-in leaves the embedding

    generated = strategy.raw_parameters("a").clone()
    final = strategy.forget_more("a", 2, no_progress, final=True)
    assert final is not None and strategy.version == 5
    assert not torch.equal(strategy.raw_parameters("a"), generated)
    # The final attempt replaces the embedding, as discard-embedding does.
    assert not torch.equal(strategy.state_dict()["embeddings"][0], embedding)
    # The other task is held in place (projected burn-in and head refit), not merely approximately.
    assert torch.allclose(strategy.raw_parameters("b"), other, atol=1e-3)


def test_an_interrupted_attempt_changes_nothing() -> None:
    strategy = _learned("noise-align")
    version, state = strategy.version, strategy.raw_parameters("a").clone()

    def cancel(fraction: float, message: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        strategy.forget_more("a", 2, cancel, final=True)
    assert strategy.version == version and torch.equal(strategy.raw_parameters("a"), state)


def test_only_an_unlearned_task_can_be_forgotten_more() -> None:
    strategy = _learned("noise-align")
    with pytest.raises(UnlearnedTaskError):
        strategy.forget_more("b", 1, no_progress, final=False)
    with pytest.raises(UnlearnedTaskError):
        strategy.forget_more("never", 1, no_progress, final=False)
