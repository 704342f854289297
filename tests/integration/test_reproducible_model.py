"""The same configuration, seed and request sequence give a bit-identical model across fresh servers.

Runs ``lethe serve`` as deployed: fresh processes at the defaults (``uncle``, default width, default torch
thread count, SQLite in a temporary data directory, ``--no-auth``, port 0). The issue's failure: with the
default threads, the backward of advanced indexing in the hypernetwork accumulated with parallel atomic
adds, so two fresh servers trained different models. The servers run concurrently, so their threads also
compete for the cores (scheduling differs between them), which is what a model must not depend on.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client import LetheClient, pb
from client.datasets import load_digits
from tests.support import DeployedServer, start_deployed, stop_deployed

#: Learn two tasks, unlearn the first, learn a third: every kind of operation, and a learn after an unlearn.
SEQUENCE: tuple[tuple[str, str], ...] = (
    ("learn", "digits-0-1"),
    ("learn", "digits-2-3"),
    ("unlearn", "digits-0-1"),
    ("learn", "digits-4-5"),
)
#: Epochs of each learn: every step of every epoch is a chance to diverge, and one differing bit fails the test;
#: fewer than the default 20 keeps three concurrent servers on two cores within CI's time.
EPOCHS = 5


@dataclass(frozen=True)
class Served:
    """What one server ended with: probabilities per task on the fixed batch, and its jobs' metrics."""

    probabilities: dict[str, np.ndarray]
    metrics: list[dict[str, float]]

    @property
    def train_losses(self) -> list[float]:
        """``train_loss`` of every learn job, in order."""
        return [m["train_loss"] for m in self.metrics if "train_loss" in m]


def _classes(task: str) -> list[int]:
    """``digits-2-3`` -> ``[2, 3]``."""
    return [int(c) for c in task.split("-")[1:]]


def _fixed_batch() -> np.ndarray:
    """Every ninth digit of all ten classes: 200 samples, the same on every call."""
    return load_digits().inputs[::9]


def _run_sequence(client: LetheClient) -> Served:
    """Run :data:`SEQUENCE`; return the probabilities every task serves (the unlearned one with
    ``allow_unlearned``) on :func:`_fixed_batch` and every job's metrics."""
    metrics = []
    for operation, task in SEQUENCE:
        if operation == "learn":
            data = load_digits().select(_classes(task))
            job = client.wait(client.learn(task, data.inputs, data.labels, epochs=EPOCHS).id)
        else:
            job = client.wait(client.unlearn(task, reason="right to be forgotten").id)
        assert job.state == pb.SUCCEEDED, job.message
        metrics.append(dict(job.metrics))
    batch = _fixed_batch()
    tasks = {task for _, task in SEQUENCE}
    probabilities = {
        task: client.predict(task, batch, probabilities=True, allow_unlearned=True).outputs for task in sorted(tasks)
    }
    return Served(probabilities, metrics)


def _on_fresh_servers(tmp_path: Path, seeds: Sequence[int]) -> list[Served]:
    """Start one fresh deployed server per seed, run :data:`SEQUENCE` on all of them at once."""
    servers: list[DeployedServer] = []
    try:
        with ThreadPoolExecutor(len(seeds)) as pool:
            starting = [pool.submit(start_deployed, tmp_path / f"server-{i}", f"model.seed={seed}")
                        for i, seed in enumerate(seeds)]  # fmt: skip
            servers = [future.result() for future in starting]
            return list(pool.map(lambda server: _run_sequence(server.client), servers))
    finally:
        for server in servers:
            stop_deployed(server)


def _timing_free(metrics: dict[str, float]) -> dict[str, float]:
    """A job's metrics without the wall-clock durations."""
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def test_two_fresh_servers_serve_bit_identical_probabilities(tmp_path: Path) -> None:
    first, second, other_seed = _on_fresh_servers(tmp_path, [0, 0, 1])

    assert first.probabilities.keys() == second.probabilities.keys() == {"digits-0-1", "digits-2-3", "digits-4-5"}
    for task, probabilities in first.probabilities.items():
        assert probabilities.dtype == np.float32 and probabilities.shape == (200, 10)
        assert probabilities.tobytes() == second.probabilities[task].tobytes(), task
    assert len(first.train_losses) == 3
    assert first.train_losses == second.train_losses
    assert [_timing_free(m) for m in first.metrics] == [_timing_free(m) for m in second.metrics]

    # The negative control: the comparison can fail; another seed serves another model.
    for task, probabilities in first.probabilities.items():
        assert not np.array_equal(probabilities, other_seed.probabilities[task]), task
    assert first.train_losses != other_seed.train_losses
