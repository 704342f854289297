"""GetModel reads the live model: a strategy that grows is reported at its current size."""

from __future__ import annotations

from pathlib import Path

from server.app import App
from tests.fakes import GrowingStrategy, factory
from tests.support import digits, make_config, running_app


def test_get_model_reports_the_parameters_of_the_model_now(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}")
    with running_app(config, strategy_factory=factory(App(config).build_strategy, GrowingStrategy)) as server:
        c, worker = server.client, server.app.worker
        assert worker is not None
        assert c.model().parameters == worker.strategy.parameter_count()
        before = c.model().parameters
        c.wait(c.learn("a", *digits([0, 1]), epochs=1).id)
        inner = worker.strategy.inner.parameter_count()  # type: ignore[attr-defined]
        after = c.model().parameters
        assert after == inner + GrowingStrategy.GROWTH != before
