"""Right-to-be-forgotten retention: probe sets live only forget_probe_ops operations after an unlearn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import digits, make_config, running_app


@pytest.mark.parametrize("ops", [0, 2])
def test_forget_probe_is_purged_after_the_configured_operations(tmp_path: Path, ops: int) -> None:
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{"training.forget_probe_ops": ops, "training.epochs": 3},
    )
    with running_app(config) as server:
        c = server.client
        for name, classes in (("a", [0, 1]), ("b", [2, 3])):
            c.wait(c.learn(name, *digits(classes)).id)
        c.wait(c.unlearn("a").id)
        probe_dir = tmp_path / "data" / "probes"
        relapse_after_unlearn = c.task("a").relapse
        for name, classes in (("c", [4, 5]), ("d", [6, 7]), ("e", [8, 9])):
            c.wait(c.learn(name, *digits(classes)).id)
            if name == "c" and ops == 2:
                assert "a" in c.evaluations()[-1].accuracies  # still measured one operation later
        last = c.evaluations()[-1]
        assert "a" not in last.accuracies  # gone from the matrix once its probe is purged
        assert len(list(probe_dir.iterdir())) == 4  # b, c, d, e
        purges = [json.loads(e.details_json) for e in c.audit_events(task="a") if e.action == "data.purged"]
        kinds = {f["kind"] for p in purges for f in p["files"]}
        assert kinds == {"probe", "member"}
        assert all(not (tmp_path / "data" / f["path"]).exists() for p in purges for f in p["files"])
        if ops == 0:
            assert math.isnan(relapse_after_unlearn) and math.isnan(c.task("a").relapse)
        else:
            assert relapse_after_unlearn == 0.0 and not math.isnan(c.task("a").relapse)
