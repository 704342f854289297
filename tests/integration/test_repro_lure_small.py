"""A small LURE reproduction through the gRPC API: real learning on the digits, exact unlearning = retraining.

The full version is ``python -m benchmarks.repro_lure`` (8 mega-batches, 4 resets x 3 replay modes,
5 seeds, with and without label noise); this one streams 4 mega-batches once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from benchmarks.repro_lure import Settings, Stream, make_stream, server_overrides
from client import LetheClient, pb
from tests.support import make_config, running_app

MEGABATCHES = 4
FORGET = 1
SETTINGS = Settings(backbone="mlp", width=64, epochs=20, batch_size=32, learning_rate=0.1)


@pytest.fixture(scope="module")
def stream() -> Stream:
    """The digits in 4 stratified mega-batches and a fixed, stratified 20% test set."""
    return make_stream(seed=0, megabatches=MEGABATCHES)


@contextmanager
def lure_server(tmp_path: Path, name: str) -> Iterator[LetheClient]:
    """A fresh in-process lure server (mlp, SNIP reset, full replay) on port 0."""
    config = make_config(
        tmp_path / name / "data",
        f"sqlite:///{tmp_path / name}.sqlite",
        **server_overrides(SETTINGS, "lure", "full", seed=0),
    )
    with running_app(config) as server:
        yield server.client


def learn(client: LetheClient, stream: Stream, i: int) -> pb.Job:
    """Learn mega-batch ``i`` and wait for it."""
    return client.wait(client.learn(f"mb{i}", stream.inputs[i], stream.labels[i]).id)


def test_lure_stream_learns_and_exact_unlearning_equals_retraining(tmp_path: Path, stream: Stream) -> None:
    with lure_server(tmp_path, "unlearned") as client:
        errors = []
        for i in range(MEGABATCHES):
            job = learn(client, stream, i)
            assert job.metrics["train_accuracy"] > 90.0
            errors.append(int(np.sum(client.predict(None, stream.test_inputs).classes != stream.test_labels)))
        accuracy = 1 - errors[-1] / len(stream.test_labels)
        assert accuracy >= 0.9, f"test accuracy {accuracy:.1%} after the stream (10 classes, chance 10%)"
        assert sum(errors) < 0.25 * MEGABATCHES * len(stream.test_labels)  # CER: few errors along the stream
        forget = client.wait(client.unlearn(f"mb{FORGET}", reason="repro", method="exact").id)
        assert forget.metrics["replayed_megabatches"] == MEGABATCHES - 1 - FORGET
        unlearned = client.predict(None, stream.test_inputs)

    # A server that never receives mb1's data. The worker's train/probe split of a Learn is seeded by
    # the job's queue position (seq), so mb1's Learn is queued and cancelled before it runs: the later
    # mega-batches keep the seqs they had above and are split identically.
    with lure_server(tmp_path, "retrained") as client:
        for i in range(MEGABATCHES):
            if i == FORGET:
                continue
            if i == FORGET - 1:
                running = client.learn(f"mb{i}", stream.inputs[i], stream.labels[i])
                placeholder = client.learn(f"mb{FORGET}", stream.inputs[FORGET], stream.labels[FORGET])
                assert client.cancel(placeholder.id).state == pb.CANCELLED
                client.wait(running.id)
            else:
                learn(client, stream, i)
        retrained = client.predict(None, stream.test_inputs)

    np.testing.assert_array_equal(unlearned.classes, retrained.classes)
    assert np.array_equal(unlearned.outputs, retrained.outputs), "exact unlearning must equal retraining bit for bit"


def test_exact_unlearning_equals_retraining_with_a_different_job_history(tmp_path: Path, stream: Stream) -> None:
    with lure_server(tmp_path, "unlearned") as client:
        for i in range(MEGABATCHES):
            learn(client, stream, i)
        client.wait(client.unlearn(f"mb{FORGET}", method="exact").id)
        unlearned = client.predict(None, stream.test_inputs).outputs
    with lure_server(tmp_path, "retrained") as client:
        for i in range(MEGABATCHES):
            if i != FORGET:
                learn(client, stream, i)
        retrained = client.predict(None, stream.test_inputs).outputs
    assert np.array_equal(unlearned, retrained)
