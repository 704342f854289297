"""kill -9 during a records unlearn (issue #14), restart: it completes once, and nothing is half-rewritten.

A real ``python -m server`` (lure, ``replay=full``, SQLite and PostgreSQL) learns three digits
mega-batches whose samples carry ids, then forgets ten of them spread over two mega-batches. The
server is killed either while the job computes (files rewritten, the replay running) or once its
checkpoint is written but before its commit, and restarted. After the restart the job has ended
SUCCEEDED exactly once; the ids are unknown; every live task-data file is read back and holds none
of the forgotten samples; each affected task has exactly one live file of each rewritten kind; the
data directory is exactly the live ``data_files`` rows and the newest checkpoint, with no temporary
leftovers; and the model answers bit for bit like a fresh server that learned the stream without
those samples.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from client import pb
from client.datasets import load_digits
from server.data import load_arrays
from server.data.sample_ids import SampleIdKey
from tests.crash_harness import Accepted, CrashHarness, data_dir_leftovers, unaccounted_files
from tests.support import make_config, running_app

LURE = {"model.strategy": "lure", "model.options.replay": "full", "model.torch_threads": 1}
MEGABATCHES, SIZE, EPOCHS = 3, 150, 10

Stream = list[tuple[str, np.ndarray, np.ndarray, list[str]]]


def _stream() -> tuple[Stream, np.ndarray]:
    """Three mega-batches of 150 digits with person ids, and 200 other digits to predict."""
    data = load_digits()
    order = np.random.default_rng(14).permutation(len(data.labels))
    stream = []
    for i in range(MEGABATCHES):
        part = order[i * SIZE : (i + 1) * SIZE]
        stream.append((f"mb{i}", data.inputs[part], data.labels[part], [f"person-{int(k)}" for k in part]))
    return stream, data.inputs[order[-200:]]


def _without(stream: Stream, gone: set[str]) -> Stream:
    reduced = []
    for name, x, y, ids in stream:
        keep = np.array([i not in gone for i in ids])
        reduced.append((name, x[keep], y[keep], [i for i in ids if i not in gone]))
    return reduced


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[CrashHarness]:
    args = tuple(arg for key, value in LURE.items() for arg in ("--set", f"{key}={value}"))
    h = CrashHarness(tmp_path / "data", database_url, epochs=EPOCHS, server_args=args, class_incremental=True)
    try:
        yield h
    finally:
        print(f"\nstarts took {[round(s, 1) for s in h.start_seconds]} s; at each kill: {h.kill_log}")
        h.stop()


def _kill_now(harness: CrashHarness) -> None:
    """SIGKILL at once, then the harness's bookkeeping (it reads SQL, frozen by then: no window lost)."""
    assert harness.process is not None
    harness.process.process.kill()
    harness.process.process.wait(30)  # dead before SQL is read
    harness.kill()


def _server_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("server-*.log")))


@pytest.mark.slow_on_postgres
@pytest.mark.parametrize("phase", ["compute", "commit"])
def test_kill_during_a_records_unlearn_completes_once(
    harness: CrashHarness, tmp_path: Path, database_url: str, phase: str
) -> None:
    stream, queries = _stream()
    gone = stream[0][3][:5] + stream[1][3][-5:]  # ten ids over two mega-batches: the replay starts at mb0
    client = harness.start()
    for name, x, y, ids in stream:
        job = client.learn(name, x, y, epochs=EPOCHS, sample_ids=ids)
        harness.accepted[job.id] = Accepted(job.id, job.kind, job.task)
        assert client.wait(job.id, timeout=120).state == pb.SUCCEEDED
    version = client.model().version
    assert dict(client.locate(gone).tasks) == {"mb0": 5, "mb1": 5}

    forget = client.forget_samples(gone, reason="crash test")
    harness.accepted[forget.id] = Accepted(forget.id, forget.kind, forget.task)
    if phase == "compute":
        # Its new files are recorded and written before the replay reports any progress.
        harness.wait_state(forget.id, (pb.RUNNING,), min_progress=0.3, interval=0.002)
        _kill_now(harness)
        assert not list((harness.data_dir / "checkpoints").glob(f"ckpt-*-{forget.id}-*.pt"))
    else:
        # The checkpoint of the job is written; measuring and the commit transaction follow.
        checkpoints = harness.data_dir / "checkpoints"
        deadline = time.monotonic() + 120
        while not any(  # the renamed file, not the temporary one being written
            name.startswith("ckpt-") and name.endswith(".pt") and forget.id in name for name in os.listdir(checkpoints)
        ):
            assert time.monotonic() < deadline, "the forget job wrote no checkpoint"
            time.sleep(0.001)  # measuring and committing take tens of milliseconds after the checkpoint
        _kill_now(harness)
    assert forget.id in harness.running_at_kill, harness.kill_log[-1]

    client = harness.start()
    done = client.wait(forget.id, timeout=120)
    assert done.state == pb.SUCCEEDED, done.message
    assert done.model_version == version + 1 and done.metrics["samples_forgotten"] == 10
    if phase == "commit":
        # Finished from its checkpoint, never run again. (On PostgreSQL a COMMIT already on the wire
        # when the process dies may still land after SQL was read at the kill: then it is simply done.)
        logs = _server_logs(tmp_path)
        assert f"re-queued job {forget.id}" not in logs
        finished = f"finishing job {forget.id} from its checkpoint" in logs
        assert finished or "postgresql" in database_url, logs[-2000:]
    else:
        assert f"re-queued job {forget.id}" in _server_logs(tmp_path)
    jobs = harness.check()  # every job ended once; audit chain; no spool, leftovers or unaccounted files
    assert [j.id for j in jobs if j.kind == pb.UNLEARN] == [forget.id]

    events = client.audit_events()
    assert [e.action for e in events if e.job_id == forget.id].count("unlearn.succeeded") == 1
    forgotten = [e for e in events if e.action == "samples.forgotten"]
    assert [e.job_id for e in forgotten] == [forget.id]
    details = json.loads(forgotten[0].details_json)
    assert details["samples"] == 10 and details["tasks"] == {"mb0": 5, "mb1": 5}
    assert sum(f["removed_rows"] for f in details["files"] if f["kind"] != "member") == 10
    located = client.locate(gone)
    assert dict(located.tasks) == {} and located.unknown == 10
    assert [client.task(n).samples for n in ("mb0", "mb1", "mb2")] == [SIZE - 5, SIZE - 5, SIZE]

    # Nothing half-rewritten: one live file of each kind per task, none holding a forgotten sample,
    # each affected task's files written by the forget job.
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            live = list(
                connection.execute(text("SELECT task, kind, job_id, path FROM data_files WHERE purged_at IS NULL"))
            )
    finally:
        engine.dispose()
    kinds = Counter((r[0], r[1]) for r in live if r[1] in ("retained", "probe", "member"))
    assert kinds == {(t, k): 1 for t in ("mb0", "mb1", "mb2") for k in ("retained", "probe", "member")}, kinds
    # The rewritten task files belong to the forget job (as does its checkpoint, a row of task "").
    assert {r[0] for r in live if r[2] == forget.id and r[1] != "checkpoint"} == {"mb0", "mb1"}
    data_dir = harness.data_dir
    digests = set(SampleIdKey(data_dir / "keys" / "sample-ids.key").digests(gone))
    gone_rows = {stream[0][1][k].tobytes() for k in range(5)} | {stream[1][1][-k].tobytes() for k in range(1, 6)}
    for _, kind, _, path in live:
        if kind in ("retained", "probe", "member"):
            arrays = load_arrays(data_dir / path)
            assert not digests & set(arrays["ids"].tolist()), path
            assert not gone_rows & {row.tobytes() for row in arrays["inputs"]}, path
    assert data_dir_leftovers(data_dir) == []
    assert unaccounted_files(data_dir, database_url) == {}
    after = client.predict(None, queries)

    # A fresh server that never received them answers bit for bit the same.
    fresh = make_config(tmp_path / "fresh", f"sqlite:///{tmp_path / 'fresh.db'}", **LURE)
    with running_app(fresh) as server:
        for name, x, y, ids in _without(stream, set(gone)):
            assert server.client.wait(server.client.learn(name, x, y, epochs=EPOCHS, sample_ids=ids).id).state == (
                pb.SUCCEEDED
            )
        never: Any = server.client.predict(None, queries)
    assert after.outputs.tobytes() == never.outputs.tobytes()  # bit for bit
