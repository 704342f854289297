"""Strategy ``agscl`` served end to end on both databases: learn two split-digits tasks, unlearn one, restart."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import LetheError, pb
from tests.support import balanced_accuracy, digits, make_config, running_app


def test_agscl_learns_split_digits_unlearns_one_and_restarts(tmp_path: Path, database_url: str) -> None:
    config = make_config(
        tmp_path / "data",
        database_url,
        **{"model.strategy": "agscl", "training.epochs": 10},
    )
    tasks = {"digits01": digits([0, 1]), "digits23": digits([2, 3])}
    with running_app(config) as server:
        c = server.client
        info = c.model()
        assert info.strategy == "agscl" and info.task_incremental
        assert list(info.unlearn_methods) == ["release", "amnesia"]
        parameters = info.parameters
        for name, (inputs, labels) in tasks.items():
            job = c.wait(c.learn(name, inputs, labels).id)
            assert job.state == pb.SUCCEEDED, job.message
            assert job.metrics["task_accuracy"] >= 90  # two classes, chance 50
            for key in ("free_units", "grown_units", "pruned_units"):
                assert key in job.metrics
        grown = c.model().parameters
        assert grown >= parameters  # a second head at least; grown hidden layers when free units ran out
        retained = c.task("digits01").accuracy

        forget = c.wait(c.unlearn("digits23", reason="right to be forgotten").id)
        assert forget.state == pb.SUCCEEDED, forget.message
        assert forget.metrics["forget_verified"] == 1 and forget.metrics["forget_reference"] == 50.0
        assert forget.metrics["spill"] <= 1.0  # the latest task's nodes were its own: nothing else moves
        assert "released_units" in forget.metrics and "pruned_units" in forget.metrics
        assert c.task("digits23").state == pb.UNLEARNED
        assert c.model().parameters < grown  # its head is gone (and the units it freed, if the layers had grown)
        with pytest.raises(LetheError) as refused:
            c.predict("digits23", tasks["digits23"][0][:4])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        audit = c.predict("digits23", tasks["digits23"][0], allow_unlearned=True)
        assert balanced_accuracy(tasks["digits23"][1], np.asarray(audit.classes)) == pytest.approx(50.0)
        before = c.predict("digits01", tasks["digits01"][0])
        version = c.model().version
        parameters_after = c.model().parameters
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.app.ports.metrics}/metrics", timeout=10).read().decode()
        )
        gauge = re.search(r"^lethe_model_parameters (\S+)$", body, re.MULTILINE)
        assert gauge is not None and float(gauge.group(1)) == parameters_after

    with running_app(config) as server:  # a restart loads the checkpoint, shapes included
        c = server.client
        assert c.model().version == version and c.model().parameters == parameters_after
        after = c.predict("digits01", tasks["digits01"][0])
        assert np.array_equal(np.asarray(after.classes), np.asarray(before.classes))
        assert abs(c.task("digits01").accuracy - retained) <= 1.0


def test_agscl_amnesia_uses_retained_data_and_ends_verified(tmp_path: Path) -> None:
    """Method ``amnesia`` through the API: replay of the retained data, then the server's check (and forget_more)."""
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{"model.strategy": "agscl", "training.epochs": 10, "training.retain_training_data": True},
    )
    tasks = {"digits01": digits([0, 1]), "digits23": digits([2, 3])}
    with running_app(config) as server:
        c = server.client
        for name, (inputs, labels) in tasks.items():
            assert c.wait(c.learn(name, inputs, labels).id).state == pb.SUCCEEDED
        retained = c.task("digits23").accuracy
        forget = c.wait(c.unlearn("digits01", reason="right to be forgotten", method="amnesia").id)
        assert forget.state == pb.SUCCEEDED, forget.message
        assert "ewc_loss" in forget.metrics and "replay_loss" in forget.metrics
        # Verified at chance, by the amnesia head or, failing that, by forget_more dropping it.
        assert forget.metrics["forget_verified"] == 1, forget.metrics
        assert abs(c.task("digits23").accuracy - retained) <= 3.0
