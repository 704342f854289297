"""Forgetting where a user meets it: the README tour, split and permuted digits, on ``lethe serve`` as deployed.

Every run is a fresh server process at the defaults a user gets (``uncle``, the default width, epochs,
torch thread count and verification settings; SQLite in a temporary data directory; ``--no-auth``; port
0), changed only by ``model.seed`` and, in the slow sweep, ``model.torch_threads`` (the issue saw thread
scheduling decide whether the tour forgot). Each unlearn must succeed *verified* by the server, and,
independently of the server's verdict, Predict with ``allow_unlearned`` on every sample of the forgotten
task (its training data included) must have balanced accuracy within 5 points of chance, while the
other tasks keep their accuracy.

The default suite runs the tour for three seeds; ``make test-slow`` runs seeds 0-9 with 1 and 2 torch
threads, split digits (5 tasks of 2 classes, two unlearned) and permuted digits (4 tasks, one unlearned).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from client import LetheClient, pb
from client.datasets import Dataset, load_digits
from tests.support import balanced_accuracy, deployed_server

#: Points the forgotten task's balanced accuracy may lie from chance, on its own samples.
CHANCE_BOUND = 5.0
#: Points a retained task's accuracy on its own samples may lose across the unlearns.
RETAIN_BOUND = 3.0

Tasks = dict[str, Dataset]


def _split_tasks(count: int) -> Tasks:
    """``count`` tasks of two digit classes each: ``digits-0-1``, ``digits-2-3``, ..."""
    digits = load_digits()
    return {f"digits-{2 * i}-{2 * i + 1}": digits.select([2 * i, 2 * i + 1]) for i in range(count)}


def _permuted_tasks(count: int) -> Tasks:
    """``count`` tasks of all ten digit classes, each under its own pixel permutation (seed = index)."""
    digits = load_digits()
    return {f"permuted-{i}": digits.permute_pixels(i) for i in range(count)}


def _forget_summary(job: pb.Job) -> str:
    """The unlearn job's state, message and verification metrics, for a failure message."""
    metrics = {k: round(v, 2) for k, v in sorted(job.metrics.items()) if k.startswith("forget")}
    return f"{pb.JobState.Name(job.state)} {job.message!r} {metrics}"


def _accuracy(client: LetheClient, task: str, data: Dataset) -> float:
    """Percent of ``data`` the served model classifies right as ``task``."""
    return float(100.0 * np.mean(client.predict(task, data.inputs).classes == data.labels))


def _forgotten_balanced_accuracy(client: LetheClient, task: str, data: Dataset) -> float:
    """Balanced accuracy (percent) of the unlearned ``task`` on ``data``, asked with ``allow_unlearned``."""
    return balanced_accuracy(data.labels, client.predict(task, data.inputs, allow_unlearned=True).classes)


def _learn(client: LetheClient, tasks: Tasks) -> dict[str, float]:
    """Learn every task in order; return each one's accuracy on all its samples after the last learn."""
    for name, data in tasks.items():
        job = client.wait(client.learn(name, data.inputs, data.labels).id)
        assert job.metrics["task_accuracy"] >= 90, (name, dict(job.metrics))
    return {name: _accuracy(client, name, data) for name, data in tasks.items()}


def _unlearn_verified(client: LetheClient, task: str, data: Dataset) -> pb.Job:
    """Unlearn ``task``: the job succeeds verified and its own samples are at chance (balanced accuracy)."""
    job = client.wait(client.unlearn(task, reason="right to be forgotten").id)
    summary = _forget_summary(job)
    measured = _assert_at_chance(client, task, data, summary)
    print(f"{task}: balanced accuracy {measured:.1f}% on its samples; {summary}")  # shown with -rA or on failure
    assert job.state == pb.SUCCEEDED and job.metrics["forget_verified"] == 1.0, summary
    return job


def _assert_at_chance(client: LetheClient, task: str, data: Dataset, summary: str = "") -> float:
    """The forgotten ``task`` answers its own samples within :data:`CHANCE_BOUND` points of chance; return
    its balanced accuracy."""
    chance = 100.0 / len(data.classes)
    measured = _forgotten_balanced_accuracy(client, task, data)
    assert abs(measured - chance) <= CHANCE_BOUND, (
        f"{task}: balanced accuracy {measured:.1f}% on its {len(data.labels)} samples, chance {chance:.1f}%; {summary}"
    )
    return measured


def _assert_retained(client: LetheClient, tasks: Tasks, before: dict[str, float], forgotten: Sequence[str]) -> None:
    """Every task not in ``forgotten`` is within :data:`RETAIN_BOUND` points of its accuracy ``before``."""
    after = {name: _accuracy(client, name, data) for name, data in tasks.items() if name not in forgotten}
    lost = {name: round(before[name] - accuracy, 2) for name, accuracy in after.items()}
    assert all(points <= RETAIN_BOUND for points in lost.values()), f"points lost {lost}; before {before}"


def _run(tmp_path: Path, tasks: Tasks, forget: Sequence[str], *settings: str) -> None:
    """Learn ``tasks`` on a fresh deployed server, unlearn ``forget`` one after the other, check everything."""
    with deployed_server(tmp_path / "data", *settings) as server:
        client = server.client
        before = _learn(client, tasks)
        for task in forget:
            _unlearn_verified(client, task, tasks[task])
        for task in forget:  # an earlier unlearn still holds after the later ones
            _assert_at_chance(client, task, tasks[task])
        _assert_retained(client, tasks, before, forget)


def _tour(tmp_path: Path, *settings: str) -> None:
    """The README tour: learn ``digits-0-1`` and ``digits-2-3`` (all their digits), unlearn ``digits-0-1``."""
    tasks = _split_tasks(2)
    with deployed_server(tmp_path / "data", *settings) as server:
        client = server.client
        _learn(client, tasks)
        _unlearn_verified(client, "digits-0-1", tasks["digits-0-1"])
        kept = _accuracy(client, "digits-2-3", tasks["digits-2-3"])
        assert kept >= 95.0, f"digits-2-3 predicts {kept:.1f}% of its samples after the unlearn"


@pytest.mark.parametrize("seed", [0, 1])  # seeds 0-9 at 1 and 2 threads: the slow test below
def test_readme_tour_forgets_to_chance(tmp_path: Path, seed: int) -> None:
    _tour(tmp_path, f"model.seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", range(10))
def test_readme_tour_forgets_for_every_seed_and_thread_count(tmp_path: Path, seed: int, threads: int) -> None:
    # Threads pinned on purpose: the issue saw the thread count decide whether the tour forgot.
    _tour(tmp_path, f"model.seed={seed}", f"model.torch_threads={threads}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_digits_forget_two_of_five_tasks(tmp_path: Path, seed: int) -> None:
    tasks = _split_tasks(5)
    _run(tmp_path, tasks, ["digits-0-1", "digits-4-5"], f"model.seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_digits_forget_one_of_four_tasks(tmp_path: Path, seed: int) -> None:
    _run(tmp_path, _permuted_tasks(4), ["permuted-1"], f"model.seed={seed}")
