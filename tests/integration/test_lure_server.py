"""The class-incremental LURE strategy served end to end: mega-batches in, one output space out."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from client import LetheError, pb
from client.datasets import load_digits
from tests.support import make_config, running_app


def test_lure_megabatch_stream_and_exact_unlearning(tmp_path: Path) -> None:
    train, test = load_digits().split(0.8, seed=0)
    parts = np.array_split(np.random.default_rng(0).permutation(len(train)), 3)
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{
            "model.strategy": "lure",
            "model.options.replay": "full",
            "training.epochs": 6,
            "training.learning_rate": 0.05,
        },
    )
    with running_app(config) as server:
        client = server.client
        cers = []
        for i, part in enumerate(parts):
            done = client.wait(client.learn(f"mb{i}", train.inputs[part], train.labels[part]).id)
            assert done.metrics["test_accuracy"] > 20 and {"ece", "generalization_gap"} <= set(done.metrics)
            cers.append(done.metrics["cer"])
        assert cers == sorted(cers) and cers[0] > 0  # cumulative errors over the stream
        rows = client.evaluations()
        probe_sizes = {t.name: round(t.samples * 0.2) for t in client.tasks()}
        last = rows[-1]
        errors = sum((1 - last.accuracies[t] / 100) * probe_sizes[t] for t in last.accuracies)
        assert abs((cers[-1] - cers[-2]) - errors) < 1.0  # CER grows by the last job's misclassified probes
        info = client.model()
        assert info.strategy == "lure" and not info.task_incremental and info.unlearn_methods[0] == "exact"
        before = client.predict(None, test.inputs)
        assert np.mean(before.classes == test.labels) > 0.8  # real learning over 10 classes (chance 10%)
        with pytest.raises(LetheError) as named:
            client.predict("mb0", test.inputs[:4])
        assert named.value.code == grpc.StatusCode.INVALID_ARGUMENT and "class-incremental" in named.value.message
        forget = client.wait(client.unlearn("mb1", reason="source withdrew consent").id)
        assert forget.metrics["replayed_megabatches"] >= 1 and "spill" in forget.metrics
        after = client.predict(None, test.inputs)
        assert after.model_version == before.model_version + 1
        assert np.mean(after.classes == test.labels) > 0.75  # retrained without mb1, still learned
        assert client.task("mb1").state == pb.UNLEARNED
        retained = [f for f in (tmp_path / "data" / "retained").iterdir()]
        assert len(retained) == 2  # mb1's retained mega-batch was purged


def test_a_failed_unlearn_can_be_retried_and_the_task_stays_unpredictable(tmp_path: Path) -> None:
    data = load_digits()
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{"model.strategy": "lure", "model.options.replay": "buffer:50", "training.epochs": 2},
    )
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("mb0", data.inputs[:600], data.labels[:600]).id)
        c.wait(c.learn("mb1", data.inputs[600:1200], data.labels[600:1200]).id)
        failed = c.wait(c.unlearn("mb1", method="exact").id, check=False)
        assert failed.state == pb.FAILED and "full" in failed.message  # exact needs every mega-batch's data
        assert c.task("mb1").state == pb.UNLEARNING
        retried = c.wait(c.unlearn("mb1", method="approximate").id)
        assert retried.state == pb.SUCCEEDED and c.task("mb1").state == pb.UNLEARNED
        with pytest.raises(LetheError) as again:
            c.unlearn("mb1")
        assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
