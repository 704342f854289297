"""The default strategy, UnCLE, served end to end on permuted digits: learn, forget without data, no relapse."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from client import LetheError, pb
from client.datasets import load_digits
from tests.support import make_config, running_app


def test_uncle_learns_forgets_without_data_and_does_not_relapse(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{
            "model.strategy": "uncle",
            "training.epochs": 5,
            "training.holdout_fraction": 0.2,
            "model.options.burn_in": 60,
        },
    )
    tasks = {f"perm{i}": load_digits().permute_pixels(i) for i in range(3)}
    with running_app(config) as server:
        c = server.client
        info = c.model()
        assert info.strategy == "uncle" and info.task_incremental and info.unlearn_methods[0] == "noise-align"
        for name in ("perm0", "perm1"):
            job = c.wait(c.learn(name, tasks[name].inputs, tasks[name].labels).id)
            assert job.metrics["task_accuracy"] >= 85  # 10 classes, chance is 10%
        forget = c.wait(c.unlearn("perm0", reason="right to be forgotten").id)
        assert forget.metrics["forget_accuracy_task"] <= 30  # near chance, without touching any data
        assert forget.metrics["spill"] <= 6  # the other task barely moves
        assert forget.metrics["mia_known"] == 1 and forget.metrics["mia_p_value"] > 0.01, (
            forget.metrics
        )  # no membership signal
        assert forget.metrics["forget_verified"] == 1 and forget.metrics["forget_reference"] == 10.0
        c.wait(c.learn("perm2", tasks["perm2"].inputs, tasks["perm2"].labels).id)
        task = c.task("perm0")
        assert task.state == pb.UNLEARNED and task.accuracy <= 25 and task.relapse <= 12  # not revived
        assert c.task("perm1").accuracy >= 80
        with pytest.raises(LetheError) as refused:
            c.predict("perm0", tasks["perm0"].inputs[:8])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        audit = c.predict("perm0", tasks["perm0"].inputs, allow_unlearned=True)
        assert np.mean(audit.classes == tasks["perm0"].labels) < 0.3
