"""The ``lure`` strategy against the strategy conformance suite.

What applies unchanged: protocol, real learning, output contract, determinism, exact state round
trip, atomic learn, refusal of unknown methods, immutable snapshots under concurrent use. One
tolerance differs: ``exact`` unlearning of a class-incremental mega-batch retrains the shared
network on the remaining stream, so the retained task's logits move (its accuracy may not: the
spill bound stays); ``max_retained_logit_change`` is therefore not checked.
"""

from __future__ import annotations

import torch

from server.engine.lure import build_lure
from server.engine.protocol import LearnOptions, Strategy

from .conformance import INPUT_SHAPE, NUM_CLASSES, StrategyConformance

CPU = torch.device("cpu")


class TestLureMLPConformance(StrategyConformance):
    options = LearnOptions(epochs=5, batch_size=32, learning_rate=0.05, seed=0)
    max_retained_logit_change = None  # exact unlearning retrains the shared network (see module docstring)

    def make_strategy(self, seed: int) -> Strategy:
        return build_lure(backbone="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=seed)


class TestLureCNNConformance(StrategyConformance):
    """The CNN has BatchNorm: eval-mode snapshots, buffers restored after importance scoring."""

    options = LearnOptions(epochs=6, batch_size=32, learning_rate=0.05, seed=0)
    max_retained_logit_change = None

    def make_strategy(self, seed: int) -> Strategy:
        return build_lure(
            backbone="cnn", width=8, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=seed
        )
