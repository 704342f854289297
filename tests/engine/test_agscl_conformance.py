"""The ``agscl`` strategy against the strategy conformance suite.

What differs, each with its reason:

* Learn options: 10 epochs instead of 5. The second task (digits 2 vs 3) is learned while the
  first task's nodes are held in place and reached exactly the suite's 90 % after 5 epochs (97 %
  after 10): no margin.
* ``max_retained_logit_change``: 1e-3 instead of 1e-5. Data-free unlearning releases the nodes no
  other task activates *on its training data*; on the retained task's probe samples such a node
  may still fire a little, so its logits can move by that little (4e-5 measured).
"""

from __future__ import annotations

from typing import ClassVar

from server.engine.protocol import LearnOptions

from .conformance import StrategyConformance

_OPTIONS = LearnOptions(epochs=10, batch_size=32, learning_rate=1e-3, seed=0)


class TestAgsclMLPConformance(StrategyConformance):
    """The default configuration: ``mlp`` with capacity (growth and pruning) on."""

    strategy_name = "agscl"
    options = _OPTIONS
    max_retained_logit_change = 1e-3


class TestAgsclMLPFixedWidthConformance(StrategyConformance):
    """Without capacity (fixed width)."""

    strategy_name = "agscl"
    build_options: ClassVar[dict[str, str]] = {"capacity": "off"}
    options = _OPTIONS
    max_retained_logit_change = 1e-3


class TestAgsclCNNConformance(StrategyConformance):
    """The CNN has BatchNorm: per-task statistics, eval-mode snapshots, channels as nodes."""

    strategy_name = "agscl"
    backbone = "cnn"
    build_options: ClassVar[dict[str, int]] = {"width": 8}
    options = _OPTIONS
    max_retained_logit_change = 1e-3
