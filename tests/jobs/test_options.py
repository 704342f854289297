"""One options path: a Learn header's zeros become the configuration's values, then the strategy's own,
once, at submission; the job row stores exactly what runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from client import pb
from server.app import App
from server.engine.protocol import LearnOptions
from server.jobs import JobEvents, JobService, LearnStream, LearnSubmission, QueueLimits, ServingState
from server.storage import JobRepository, make_session_factory
from tests.support import digits, make_config, running_app

#: Leave every training default to the strategy (FAST sets epochs and batch size).
STRATEGY_DEFAULTS = {"training.epochs": 0, "training.batch_size": 0, "training.learning_rate": 0}


def _stored_options(app: App, job_id: str) -> dict[str, Any]:
    assert app.engine is not None
    with make_session_factory(app.engine)() as session:
        job = JobRepository(session).get(job_id)
    assert job is not None
    return job.options


def test_a_lure_server_stores_the_header_then_lures_own_defaults(tmp_path: Path) -> None:
    """lure's own epochs (10), batch (64) and learning rate (0.1) reach the job through the server."""
    config = make_config(
        tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **{"model.strategy": "lure", **STRATEGY_DEFAULTS}
    )
    with running_app(config) as server:
        c = server.client
        job = c.learn("mb0", *digits([0, 1]), epochs=1)
        stored = _stored_options(server.app, job.id)
        assert LearnOptions.from_dict(stored) == LearnOptions(
            epochs=1, batch_size=64, learning_rate=0.1, holdout_fraction=0.2, temporary=False, seed=0
        )
        done = c.wait(job.id)  # and it runs with them
        assert done.state == pb.SUCCEEDED and done.metrics["probe_samples"] == round(0.2 * len(digits([0, 1])[1]))


@pytest.mark.parametrize("strategy", ["finetune", "uncle"])
def test_a_server_at_defaults_stores_the_strategys_defaults(tmp_path: Path, strategy: str) -> None:
    config = make_config(
        tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **{"model.strategy": strategy, **STRATEGY_DEFAULTS}
    )
    with running_app(config) as server:
        c = server.client
        job = c.learn("a", *digits([0, 1]))
        stored = LearnOptions.from_dict(_stored_options(server.app, job.id))
        assert (stored.epochs, stored.batch_size, stored.learning_rate) == (20, 32, 1e-3)
        assert stored.holdout_fraction == 0.2  # the configured one (training.holdout_fraction)
        assert c.wait(job.id).state == pb.SUCCEEDED


@pytest.mark.parametrize("strategy,batch_size", [("lure", 64), ("finetune", 32), ("uncle", 32)])
def test_configured_training_values_override_the_strategys_defaults(
    tmp_path: Path, strategy: str, batch_size: int
) -> None:
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'lethe.db'}",
        **{"model.strategy": strategy, **STRATEGY_DEFAULTS, "training.epochs": 3, "training.learning_rate": 0.02},
    )
    app = App(config)
    defaults = app.learn_defaults(app.build_strategy())
    assert (defaults.epochs, defaults.batch_size, defaults.learning_rate) == (3, batch_size, 0.02)
    assert (defaults.holdout_fraction, defaults.seed, defaults.temporary) == (0.2, config.model.seed, False)


def test_learn_options_round_trip_through_the_job_row(session_factory: sessionmaker[Session], tmp_path: Path) -> None:
    """``temporary`` and every number survive the row; the metadata stored beside them is not an option."""
    options = LearnOptions(epochs=3, batch_size=16, learning_rate=0.25, holdout_fraction=0.3, temporary=True, seed=7)
    assert LearnOptions.from_dict(options.as_dict()) == options
    assert LearnOptions.from_dict({**options.as_dict(), "mode": "x", "metadata": {"k": "v"}}) == options
    assert LearnOptions.from_dict({"epochs": 4}) == LearnOptions(epochs=4)  # missing keys are zero
    jobs = JobService(session_factory, tmp_path / "data", JobEvents(), ServingState(), QueueLimits(10, 10))
    jobs.mark_ready()
    x, y = digits([0, 1])
    submission = LearnSubmission(task="t", idempotency_key="", options=options, metadata={"source": "test"})
    with LearnStream(jobs, submission) as stream:
        stream.append(x, y, [])
        job = stream.submit("tester", ended_early=lambda: False)
    stored = jobs.get_job(job.id).options
    assert stored["metadata"] == {"source": "test"}
    assert LearnOptions.from_dict(stored) == options


def test_the_configured_seed_is_the_seed_of_every_job(tmp_path: Path) -> None:
    """A Learn header has no seed: a job's seed is ``model.seed`` (as App.learn_defaults says, and as the
    worker used before the options path was rebuilt)."""
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **{"model.seed": 3})
    app = App(config)
    assert app.learn_defaults(app.build_strategy()).seed == 3
    with running_app(config) as server:
        c = server.client
        job = c.learn("a", *digits([0, 1]), epochs=1)
        assert LearnOptions.from_dict(_stored_options(server.app, job.id)).seed == 3
        assert c.wait(job.id).state == pb.SUCCEEDED
