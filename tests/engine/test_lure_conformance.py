"""The ``lure`` strategy against the strategy conformance suite.

What applies unchanged: protocol, real learning, output contract, determinism, exact state round
trip, atomic learn, refusal of unknown methods, immutable snapshots under concurrent use. One
tolerance differs: ``exact`` unlearning of a class-incremental mega-batch retrains the shared
network on the remaining stream, so the retained task's logits move (its accuracy may not: the
spill bound stays); ``max_retained_logit_change`` is therefore not checked.
"""

from __future__ import annotations

from typing import ClassVar

from server.engine.protocol import LearnOptions

from .conformance import StrategyConformance


class TestLureMLPConformance(StrategyConformance):
    strategy_name = "lure"
    options = LearnOptions(epochs=5, batch_size=32, learning_rate=0.05, seed=0)
    max_retained_logit_change = None  # exact unlearning retrains the shared network (see module docstring)


class TestLureCNNConformance(StrategyConformance):
    """The CNN has BatchNorm: eval-mode snapshots, buffers restored after importance scoring."""

    strategy_name = "lure"
    backbone = "cnn"
    build_options: ClassVar[dict[str, int]] = {"width": 8}
    options = LearnOptions(epochs=6, batch_size=32, learning_rate=0.05, seed=0)
    max_retained_logit_change = None
