"""Verified forgetting end to end (DESIGN.md section 9): a real server on port 0, real SQLite.

Every unlearn measures the forgotten task against its reference; an unverified one still succeeds
(the data is purged) but says so in its message, the Task, the audit trail and a Prometheus counter;
while unverified, the worker asks the strategy's ``forget_more`` for more, up to a bound.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from client import LetheClient, pb
from client.cli import main as lethe
from server.app import App
from server.config import Config
from server.engine.protocol import Predictor, Progress, Report, Strategy, TaskData
from tests.support import Running, digits, make_config, running_app

UNCLE = {"model.strategy": "uncle", "training.epochs": 5}


def _config(tmp_path: Path, **overrides: Any) -> Config:
    return make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", **overrides)


def _learn_two(client: LetheClient) -> None:
    for name, classes in (("digits-0-1", [0, 1]), ("digits-2-3", [2, 3])):
        inputs, labels = digits(classes)
        job = client.wait(client.learn(name, inputs, labels).id)
        assert job.state == pb.SUCCEEDED and job.metrics["task_accuracy"] >= 90


def _unverified_counter(server: Running) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.app.ports.metrics}/metrics", timeout=10).read().decode()
    found = re.search(r"^lethe_unverified_unlearns_total (\S+)$", body, re.MULTILINE)
    assert found, "lethe_unverified_unlearns_total is not exported"
    return float(found.group(1))


def _check_consistent(m: Mapping[str, float], tolerance: float = 5.0) -> None:
    """The forget_* metrics agree with each other and with the rule of docs/metrics.md."""
    reference = m["forget_reference"]
    excess = 0.0
    for suffix, gap in (("", "forget_gap_probe"), ("_members", "forget_gap_members")):
        measure, low, high = (m[f"forget_balanced_accuracy{suffix}"], m[f"forget_accuracy{suffix}_low"],
                              m[f"forget_accuracy{suffix}_high"])  # fmt: skip
        assert 0.0 <= low <= measure <= high <= 100.0
        assert m[gap] == pytest.approx(measure - reference)
        # Chance (task-incremental) is exact: the measure itself counts; an estimated reference
        # counts only beyond the interval.
        exact = "forget_reference_classes" in m
        excess = max(excess, abs(measure - reference) if exact else max(0.0, low - reference, reference - high))
    assert m["forget_gap"] == pytest.approx(max(abs(m["forget_gap_probe"]), abs(m["forget_gap_members"])))
    assert m["forget_excess"] == pytest.approx(excess)
    assert m["forget_tolerance"] == tolerance
    assert m["forget_verified"] == float(m["forget_excess"] <= tolerance)


def test_an_unlearn_that_does_not_forget_is_reported_unverified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_app(_config(tmp_path, **UNCLE)) as server:
        c = server.client
        _learn_two(c)
        assert not c.task("digits-0-1").HasField("forget_verified")  # not applicable while learned
        assert _unverified_counter(server) == 0.0
        capsys.readouterr()
        # Method "none" only marks the task unlearned: an ablation the worker must never strengthen.
        assert lethe(["unlearn", "digits-0-1", "--method", "none", "--server", server.target]) == 0
        printed = capsys.readouterr().out
        job = c.jobs()[-1]
        assert job.kind == pb.UNLEARN and job.state == pb.SUCCEEDED  # the data is purged all the same
        assert job.message.startswith("unlearned, forgetting NOT verified: ")
        m = job.metrics
        assert m["forget_verified"] == 0.0 and m["forget_attempts"] == 1.0  # no forget_more for "none"
        assert "forget_more_seconds" not in m
        assert m["forget_reference"] == 50.0 and m["forget_reference_classes"] == 2.0
        assert m["forget_balanced_accuracy"] >= 90.0 and m["forget_balanced_accuracy_members"] >= 90.0
        _check_consistent(m)
        assert "reference 50.0% = chance for 2 classes" in printed and "NOT verified" in printed
        assert re.search(r"MIA \d+\.\d% \(null 95% \d+-\d+%, p [01]\.\d\d, 72\+72 samples\)", printed), printed

        task = c.task("digits-0-1")
        assert task.state == pb.UNLEARNED and task.HasField("forget_verified") and task.forget_verified is False
        assert not c.task("digits-2-3").HasField("forget_verified")
        events = [e for e in c.audit_events(task="digits-0-1") if e.action == "unlearn.unverified"]
        assert len(events) == 1 and events[0].job_id == job.id
        details = json.loads(events[0].details_json)
        assert details["metrics"]["forget_verified"] == 0.0 and "reference 50.0%" in details["why"]
        assert _unverified_counter(server) == 1.0

        capsys.readouterr()
        assert lethe(["tasks", "--server", server.target]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
        assert rows["digits-0-1"][-1] == "NO" and rows["digits-2-3"][-1] == "-"


def test_noise_align_reports_every_verification_metric(tmp_path: Path) -> None:
    with running_app(_config(tmp_path, **UNCLE)) as server:
        c = server.client
        _learn_two(c)
        job = c.wait(c.unlearn("digits-0-1", reason="right to be forgotten").id)
        assert job.state == pb.SUCCEEDED
        m = job.metrics
        assert m["forget_reference"] == 50.0 and m["forget_reference_classes"] == 2.0
        assert m["forget_samples"] == 72.0 and m["forget_samples_members"] == 72.0  # holdout 0.2 of 360
        _check_consistent(m)
        # Either verified, or the worker used every attempt the bound allows (uncle has forget_more).
        assert 1.0 <= m["forget_attempts"] <= 3.0
        assert m["forget_verified"] == 1.0 or m["forget_attempts"] == 3.0
        verified = bool(m["forget_verified"])
        assert job.message == "succeeded" if verified else job.message.startswith("unlearned, forgetting NOT")
        assert c.task("digits-0-1").forget_verified is verified
        # The MIA comes with its null interval and sample sizes.
        assert m["mia_known"] == 1.0 and m["mia_members"] == m["mia_nonmembers"] == 72.0
        assert m["mia_null_low"] < 50.0 < m["mia_null_high"] and 0.0 < m["mia_p_value"] <= 1.0
        assert 0.0 <= m["mia"] <= 100.0


# ------------------------------------------------------------ escalation with a named fake strategy


class _ForgottenPredictor:
    """The inner predictor, except that fully forgotten tasks answer their first class for everything."""

    def __init__(self, inner: Predictor, forgotten: frozenset[str], version: int) -> None:
        self._inner, self._forgotten, self.version = inner, forgotten, version

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        logits = self._inner.predict(task, inputs, allow_unlearned=allow_unlearned)
        if task in self._forgotten:
            known = ~torch.isinf(logits[0])
            constant = torch.where(known, torch.zeros_like(logits[0]), logits[0])
            constant[int(known.nonzero()[0])] = 1.0  # one class for everything: balanced accuracy = chance
            return constant.expand_as(logits).clone()
        return logits


class StubbornStrategy:
    """``finetune`` whose unlearn forgets nothing until ``forget_more`` has been called ``needed`` times.

    ``needed = 0`` never forgets. Each ``forget_more`` call is a committed operation (version bump).
    """

    def __init__(self, inner: Strategy, needed: int) -> None:
        self.inner, self.needed = inner, needed
        self.calls: list[tuple[str, int, bool]] = []
        self._forgotten: set[str] = set()
        self._extra_versions = 0

    def __getattr__(self, name: str) -> Any:  # everything else is the inner strategy's
        return getattr(self.inner, name)

    @property
    def version(self) -> int:
        return int(self.inner.version) + self._extra_versions

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        self._extra_versions += 1
        return Report(metrics={"stubborn": 1.0})

    def forget_more(self, task: str, attempt: int, progress: Progress, *, final: bool = False) -> Report | None:
        self.calls.append((task, attempt, final))
        self._extra_versions += 1
        if self.needed and len(self.calls) >= self.needed:
            self._forgotten.add(task)
        return Report(metrics={"forget_more_attempt": float(attempt)})

    def predictor(self) -> Predictor:
        return _ForgottenPredictor(self.inner.predictor(), frozenset(self._forgotten), self.version)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "extra": self._extra_versions, "forgotten": sorted(self._forgotten)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._extra_versions, self._forgotten = int(state["extra"]), set(state["forgotten"])


class StubbornApp(App):
    """The real server with :class:`StubbornStrategy` around the configured (finetune) strategy."""

    def __init__(self, config: Config, needed: int) -> None:
        super().__init__(config, registry=CollectorRegistry())
        self.needed = needed

    def build_strategy(self) -> Strategy:
        return StubbornStrategy(super().build_strategy(), self.needed)  # type: ignore[return-value]


@contextlib.contextmanager
def _stubborn_server(config: Config, needed: int) -> Iterator[tuple[StubbornApp, LetheClient]]:
    app = StubbornApp(config, needed)
    ports = app.start()
    client = LetheClient(f"127.0.0.1:{ports.grpc}", retries=3, timeout=30)
    try:
        yield app, client
    finally:
        client.close()
        app.stop(grace=5)


@pytest.mark.parametrize(("needed", "verified", "attempts"), [(2, True, 3), (0, False, 3)])
def test_the_worker_keeps_forgetting_until_verified_or_the_bound(
    tmp_path: Path, needed: int, verified: bool, attempts: int
) -> None:
    with _stubborn_server(_config(tmp_path), needed) as (app, c):
        _learn_two(c)
        before = c.model().version
        job = c.wait(c.unlearn("digits-0-1").id)
        assert job.state == pb.SUCCEEDED
        strategy = app.worker.strategy  # type: ignore[union-attr]
        assert isinstance(strategy, StubbornStrategy)
        # forget_more is called with attempts 1, 2 (the bound of 3 operations), the last one final.
        assert strategy.calls == [("digits-0-1", 1, False), ("digits-0-1", 2, True)]
        m = job.metrics
        assert m["forget_attempts"] == attempts and m["forget_verified"] == float(verified)
        assert m["forget_more_seconds"] >= 0.0
        assert job.model_version == before + attempts  # every attempt is a committed operation
        _check_consistent(m)
        assert c.task("digits-0-1").forget_verified is verified
        assert any(e.action == "unlearn.unverified" for e in c.audit_events(task="digits-0-1")) is not verified
        if verified:
            assert m["forget_balanced_accuracy"] == 50.0 and m["forget_balanced_accuracy_members"] == 50.0
        else:
            assert job.message.startswith("unlearned, forgetting NOT verified") and "after 3 attempts" in job.message
            assert not math.isnan(m["forget_excess"]) and m["forget_excess"] > 5.0


def test_a_bound_of_one_attempt_never_asks_for_more(tmp_path: Path) -> None:
    with _stubborn_server(_config(tmp_path, **{"training.forget_max_attempts": 1}), 1) as (app, c):
        _learn_two(c)
        job = c.wait(c.unlearn("digits-0-1").id)
        assert app.worker.strategy.calls == []  # type: ignore[union-attr]
        assert job.metrics["forget_attempts"] == 1.0 and job.metrics["forget_verified"] == 0.0
