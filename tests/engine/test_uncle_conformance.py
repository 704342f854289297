"""The ``uncle`` strategy against the strategy conformance suite.

Everything applies unchanged except one tolerance: unlearning trains the shared hypernetwork (only
the regularizer holds the other tasks' generated parameters in place), so the retained task's
logits move slightly; ``max_retained_logit_change`` is not checked, the spill bound is.
"""

from __future__ import annotations

import torch

from server.engine.protocol import Strategy
from server.engine.uncle import build_uncle

from .conformance import INPUT_SHAPE, NUM_CLASSES, StrategyConformance

CPU = torch.device("cpu")


class TestUncleMLPConformance(StrategyConformance):
    max_retained_logit_change = None  # see the module docstring

    def make_strategy(self, seed: int) -> Strategy:
        return build_uncle(backbone="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=seed)


class TestUncleCNNConformance(StrategyConformance):
    """The CNN has BatchNorm: per-task statistics, eval-mode snapshots."""

    max_retained_logit_change = None

    def make_strategy(self, seed: int) -> Strategy:
        return build_uncle(
            backbone="cnn", width=8, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=seed
        )
