"""One real server that ran a small learn/unlearn sequence, shared by the operations tests."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from client import pb
from tests.support import Running, digits, make_config, running_app

#: The reason given with the unlearn; the report must show it.
UNLEARN_REASON = "customer 4711 asked to be forgotten (ticket GDPR-17)"


@dataclass
class OpsRun:
    """A running server after learn a, learn b, unlearn a, learn c, and predictions on b."""

    running: Running
    jobs: dict[str, pb.Job]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.running.app.ports.metrics}/metrics"

    def scrape(self) -> str:
        """The server's /metrics body."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())


def run_sequence(running: Running) -> dict[str, pb.Job]:
    """learn a (0,1), learn b (2,3), unlearn a, learn c (4,5), predict b: every metric gets a value."""
    client = running.client
    jobs = {
        "learn a": client.wait(client.learn("a", *digits([0, 1])).id),
        "learn b": client.wait(client.learn("b", *digits([2, 3])).id),
        "unlearn a": client.wait(client.unlearn("a", reason=UNLEARN_REASON).id),
        "learn c": client.wait(client.learn("c", *digits([4, 5])).id),
    }
    inputs, _ = digits([2, 3])
    for start in range(0, 40, 10):
        client.predict("b", inputs[start : start + 10])
    return jobs


@pytest.fixture(scope="session")
def ops_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsRun]:
    """The shared server (finetune on digits, 3 epochs per task, no auth)."""
    tmp = tmp_path_factory.mktemp("ops")
    config = make_config(tmp / "data", f"sqlite:///{tmp / 'db.sqlite'}", **{"training.epochs": 3})
    with running_app(config) as running:
        yield OpsRun(running, run_sequence(running))
