"""Property-based fuzzing of the gRPC surface: random request sequences never get INTERNAL or UNKNOWN.

Hypothesis draws sequences of Learn streams (valid and invalid task names, random dtype enum values
including unknown ones, random shapes and byte strings, random labels and sample ids), Unlearn,
Predict, PredictStream, GetJob, WatchJob, CancelJob and the list calls, in random order, against one
module-scoped server. Every answer must be OK or a deliberate status; afterwards the server is still
healthy, answers a valid Predict, and its audit chain verifies. Derandomized, so CI runs the same examples.

A second property is about timing rather than content: a client that cancels its Learn (or unlearns
its task) the moment it is accepted races the worker's claim of the job, and must get one consistent
story whoever wins.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import LetheError, pb
from client.audit import verify_chain
from protos import lethe_pb2_grpc as pb_grpc
from protos.tensors import to_tensor
from tests.crash_harness import BACKENDS, health_status, module_database_url, unaccounted_files, wait_for
from tests.support import Running, digits, make_config, running_app

#: Examples per backend; with a few RPCs each, the module stays well under a minute.
EXAMPLES = {"sqlite": 60, "postgresql": 60}
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
X, Y = digits([0, 1, 2, 3])
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8, pb.UINT8: 1, pb.INT64: 8}
NUMPY = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.FLOAT64: "<f8", pb.UINT8: "u1", pb.INT64: "<i8"}


@dataclass
class FuzzEnv:
    running: Running
    stub: pb_grpc.LetheStub
    data_dir: Path
    database_url: str
    job_ids: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    urls = module_database_url(request.param, tmp)
    url = next(urls)
    overrides = {"training.epochs": 1, "limits.max_stream_samples": 400, "limits.max_predict_samples": 64}
    try:
        with running_app(make_config(tmp / "data", url, **overrides)) as running:
            running.client.wait(running.client.learn("seed", X[:100], Y[:100]).id)
            with grpc.insecure_channel(running.target) as channel:
                env = FuzzEnv(running, pb_grpc.LetheStub(channel), tmp / "data", url)
                env.calls["backend"] = EXAMPLES[request.param]
                yield env
    finally:
        urls.close()


# --------------------------------------------------------------------------- strategies
VALID_NAMES = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,12}", fullmatch=True)
HOSTILE_NAMES = st.sampled_from(
    ["", "../x", "a/b", "a\\b", "a\x00", "abc\n", "é", "任务", "-x", ".", "x" * 129, "seed", " "]
)
#: A few names that learn, unlearn and predict calls share, so tasks really change state.
POOL = st.sampled_from(["fuzz-0", "fuzz-1", "fuzz-2", "fuzz-3"])
NAMES = st.one_of(POOL, VALID_NAMES, HOSTILE_NAMES, st.text(max_size=20))
#: The fixture's task ``seed`` must stay predictable: nothing unlearns it.
UNLEARN_NAMES = NAMES.filter(lambda name: name != "seed")
DTYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99, -1, 2**31 - 1])
DIMS = st.one_of(st.integers(-3, 12), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]))
SHAPES = st.one_of(
    st.builds(lambda n: [n, 1, 8, 8], st.integers(-2, 12)),
    st.lists(DIMS, max_size=6),
    st.builds(lambda n, d: [n, 1, 8, d], st.integers(0, 6), DIMS),
)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Random tensors: real digits in a random dtype, right-sized random bytes, or anything at all."""
    kind = draw(st.sampled_from(["digits", "sized", "raw"]))
    if kind == "digits":
        dtype = draw(st.sampled_from(sorted(NUMPY)))
        n = draw(st.integers(1, 12))
        start = draw(st.integers(0, len(X) - n))
        data = X[start : start + n]
        if dtype == pb.UINT8:
            data = (data * 255).astype(np.uint8)
        return pb.Tensor(dtype=dtype, shape=[n, 1, 8, 8], data=data.astype(NUMPY[dtype]).tobytes())
    dtype = draw(DTYPES)
    shape = draw(SHAPES)
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    size = count * ITEMSIZE.get(dtype, 4)
    if kind == "sized" and 0 <= size <= 8 * 64 * 8:
        data = draw(st.binary(min_size=size, max_size=size))  # random bit patterns: NaN, inf, subnormals, ...
    else:
        data = draw(st.binary(max_size=512))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def label_tensors(draw: st.DrawFn, inputs: pb.Tensor) -> pb.Tensor:
    """Labels mostly of the right count, values mostly in range."""
    n = inputs.shape[0] if inputs.shape and 0 <= inputs.shape[0] <= 64 else draw(st.integers(0, 8))
    if draw(st.integers(0, 4)) == 0:
        return pb.Tensor(dtype=draw(DTYPES), shape=draw(st.lists(DIMS, max_size=2)), data=draw(st.binary(max_size=64)))
    count = n if draw(st.integers(0, 5)) else draw(st.integers(0, 12))
    values = draw(st.lists(st.integers(-2, 11) | st.integers(0, 3), min_size=count, max_size=count))
    return pb.Tensor(dtype=pb.INT64, shape=[count], data=np.asarray(values, dtype="<i8").tobytes())


@st.composite
def chunks(draw: st.DrawFn) -> pb.LearnRequest:
    if draw(st.integers(0, 15)) == 0:
        return pb.LearnRequest()  # neither header nor chunk
    inputs = draw(tensors())
    labels = draw(label_tensors(inputs))
    ids: list[str] = []
    if draw(st.integers(0, 5)) == 0:
        ids = draw(st.lists(st.text(max_size=5), max_size=8))
    return pb.LearnRequest(chunk=pb.SampleChunk(inputs=inputs, labels=labels, sample_ids=ids))


@st.composite
def plausible_learns(draw: st.DrawFn) -> list[pb.LearnRequest]:
    """A Learn that mostly passes validation: valid name, default options, digits with in-range labels."""
    task = draw(st.one_of(POOL, VALID_NAMES))
    header = pb.LearnHeader(
        task=task, epochs=draw(st.sampled_from([0, 1, 2])), batch_size=draw(st.sampled_from([0, 1, 3]))
    )
    messages = [pb.LearnRequest(header=header)]
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 12))
        start = draw(st.integers(0, len(X) - n))
        dtype = draw(st.sampled_from([pb.FLOAT32, pb.FLOAT64, pb.FLOAT16, pb.UINT8]))
        inputs = X[start : start + n]
        if dtype == pb.UINT8:
            inputs = (inputs * 255).astype(np.uint8)
        values = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
        chunk = pb.SampleChunk(
            inputs=pb.Tensor(dtype=dtype, shape=[n, 1, 8, 8], data=inputs.astype(NUMPY[dtype]).tobytes()),
            labels=pb.Tensor(dtype=pb.INT64, shape=[n], data=np.asarray(values, dtype="<i8").tobytes()),
        )
        messages.append(pb.LearnRequest(chunk=chunk))
    return messages


@st.composite
def headers(draw: st.DrawFn) -> pb.LearnRequest:
    header = pb.LearnHeader(
        task=draw(NAMES),
        idempotency_key=draw(st.sampled_from(["", "k1", "k2"]) | st.text(max_size=8)),
        mode=draw(st.sampled_from([0, 0, 0, 1, 5])),
        epochs=draw(st.sampled_from([0, 0, 1, 2, 10_001, 2**32 - 1])),
        batch_size=draw(st.sampled_from([0, 0, 1, 7, 65_537])),
        learning_rate=draw(st.sampled_from([0.0, 0.0, 1e-3, -1.0, math.nan, math.inf, 50.0])),
        holdout_fraction=draw(st.sampled_from([0.0, 0.0, 0.3, 0.95, -0.1, math.nan])),
        metadata=draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
    )
    return pb.LearnRequest(header=header)


JOB_IDS = st.one_of(
    st.integers(0, 30).map(lambda i: f"#{i}"),  # the i-th job id seen so far, resolved when run
    st.just("0" * 32),
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    st.text(max_size=40),
)
PREDICT = st.builds(
    lambda task, inputs, probs, allow: ("predict", pb.PredictRequest(task=task, inputs=inputs, **probs, **allow)),
    st.one_of(st.just("seed"), NAMES),
    tensors(),
    st.sampled_from([{}, {"return_probabilities": True}]),
    st.sampled_from([{}, {}, {"allow_unlearned": True}]),
)
UNLEARNS = st.builds(
    lambda task, method, reason, key: (
        "unlearn",
        pb.UnlearnRequest(task=task, method=method, reason=reason, idempotency_key=key),
    ),
    UNLEARN_NAMES,
    st.sampled_from(["", "delete-head", "exact", "scrub"]) | st.text(max_size=6),
    st.text(max_size=10) | st.just("r" * 4097),
    st.sampled_from(["", "k1", "u1"]) | st.text(max_size=300),
)
PLAUSIBLE_UNLEARNS = st.builds(
    lambda task, method, reason: ("unlearn", pb.UnlearnRequest(task=task, method=method, reason=reason)),
    POOL,
    st.sampled_from(["", "delete-head"]),
    st.sampled_from(["", "customer request", "line one\nline two"]),
)
OPERATIONS_BY_KIND: dict[str, st.SearchStrategy[tuple[str, Any]]] = {
    "plausible_unlearn": PLAUSIBLE_UNLEARNS,
    "plausible_learn": plausible_learns().map(lambda messages: ("learn", messages)),
    "hostile_learn": st.builds(
        lambda header, body, where: ("learn", _arrange(header, body, where)),
        headers(),
        st.lists(chunks(), max_size=3),
        st.sampled_from(["first", "first", "first", "last", "twice", "none"]),
    ),
    "unlearn": UNLEARNS,
    "predict": PREDICT,
    "predict_stream": st.lists(PREDICT.map(lambda op: op[1]), max_size=3).map(lambda rs: ("predict_stream", rs)),
    # One kind each (not one kind sampling among them), so the uniform choice of kinds reaches all three.
    "get_job": st.tuples(st.just("get_job"), JOB_IDS),
    "cancel_job": st.tuples(st.just("cancel_job"), JOB_IDS),
    "watch_job": st.tuples(st.just("watch_job"), JOB_IDS),
    "list_jobs": st.builds(
        lambda state, task, after, limit: (
            "list_jobs",
            pb.ListJobsRequest(state=state, task=task, after_seq=after, limit=limit),
        ),
        st.integers(-1, 7),
        st.just("") | NAMES,
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 1, 1000, 1001, 2**32 - 1]),
    ),
    "list_tasks": st.builds(lambda state: ("list_tasks", pb.ListTasksRequest(state=state)), st.integers(-1, 7)),
    "get_task": st.builds(lambda name: ("get_task", pb.GetTaskRequest(name=name)), NAMES),
    "audit": st.builds(
        lambda after, limit, task: (
            "audit",
            pb.ListAuditEventsRequest(after_seq=after, limit=limit, task=task),
        ),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 5, 1001]),
        st.just("") | NAMES,
    ),
    "evaluations": st.builds(
        lambda after, limit: ("evaluations", pb.ListEvaluationsRequest(after_job_seq=after, limit=limit)),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 5, 1001]),
    ),
    "model": st.just(("model", pb.GetModelRequest())),
}
#: Learn and Predict twice as often as the rest: they carry the tensors.
KINDS = [*OPERATIONS_BY_KIND, "plausible_learn", "hostile_learn", "predict", "unlearn"]


def _arrange(header: pb.LearnRequest, body: list[pb.LearnRequest], where: str) -> list[pb.LearnRequest]:
    """Put the header first (mostly), last, twice, or nowhere."""
    return {
        "first": [header, *body],
        "last": [*body, header],
        "twice": [header, *body, header],
        "none": body,
    }[where]


# --------------------------------------------------------------------------- running operations
def _job_id(env: FuzzEnv, value: str) -> str:
    if value.startswith("#") and value[1:].isdigit():
        return env.job_ids[int(value[1:]) % len(env.job_ids)] if env.job_ids else "f" * 32
    return value


def run(env: FuzzEnv, operation: tuple[str, Any]) -> None:
    """Send one operation; fail on INTERNAL or UNKNOWN; remember the ids of the jobs it created."""
    name, payload = operation
    stub = env.stub
    env.calls[name] = env.calls.get(name, 0) + 1
    try:
        if name == "learn":
            env.job_ids.append(stub.Learn(iter(payload), timeout=30).id)
        elif name == "unlearn":
            env.job_ids.append(stub.Unlearn(payload, timeout=30).id)
        elif name == "predict":
            stub.Predict(payload, timeout=30)
        elif name == "predict_stream":
            list(stub.PredictStream(iter(payload), timeout=30))
        elif name == "get_job":
            stub.GetJob(pb.GetJobRequest(id=_job_id(env, payload)), timeout=30)
        elif name == "cancel_job":
            stub.CancelJob(pb.GetJobRequest(id=_job_id(env, payload)), timeout=30)
        elif name == "watch_job":
            list(stub.WatchJob(pb.GetJobRequest(id=_job_id(env, payload)), timeout=1))
        elif name == "list_jobs":
            stub.ListJobs(payload, timeout=30)
        elif name == "list_tasks":
            stub.ListTasks(payload, timeout=30)
        elif name == "get_task":
            stub.GetTask(payload, timeout=30)
        elif name == "audit":
            stub.ListAuditEvents(payload, timeout=30)
        elif name == "evaluations":
            stub.ListEvaluations(payload, timeout=30)
        else:
            stub.GetModel(payload, timeout=30)
        env.calls["ok"] = env.calls.get("ok", 0) + 1
    except grpc.RpcError as exc:
        code = exc.code()
        assert code not in FORBIDDEN, f"{name} -> {code.name}: {exc.details()}\n{payload}"
        env.calls[code.name] = env.calls.get(code.name, 0) + 1


def test_random_request_sequences_never_get_internal_or_unknown(fuzz_env: FuzzEnv) -> None:
    @settings(
        max_examples=fuzz_env.calls["backend"],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(order=st.randoms(use_true_random=True), data=st.data())
    def sequence(order: random.Random, data: st.DataObject) -> None:
        # The kinds in a uniform random order (hypothesis' own choices favour the first alternatives),
        # each operation's content drawn by hypothesis.
        for kind in [order.choice(KINDS) for _ in range(order.randint(1, 8))]:
            run(fuzz_env, data.draw(OPERATIONS_BY_KIND[kind], label=kind))
        spool = fuzz_env.data_dir / "spool"
        assert not list(spool.glob("*.partial")), "a finished Learn call left a partial spool file"

    sequence()
    # The fuzzer reached every kind of call, and some calls got through validation.
    assert {"learn", "unlearn", "predict", "get_job", "cancel_job", "watch_job", "list_jobs"} <= set(fuzz_env.calls)
    assert fuzz_env.calls.get("ok", 0) > 0 and fuzz_env.calls.get("INVALID_ARGUMENT", 0) > 0


def test_server_is_healthy_after_fuzzing(fuzz_env: FuzzEnv) -> None:
    client = fuzz_env.running.client
    assert health_status(fuzz_env.running.target, "") == 1
    assert health_status(fuzz_env.running.target) == 1
    wait_for(
        lambda: all(j.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED) for j in client.jobs(limit=1000)),
        120,
        "the fuzzed jobs to finish",
        interval=0.2,
    )
    jobs = client.jobs(limit=1000)
    assert pb.LEARN in {j.kind for j in jobs if j.state == pb.SUCCEEDED}  # the fuzzer got through
    # An accepted job never fails (a cancel or unlearn racing the worker's claim is serialized by row locks).
    failed = [(j.task, j.message) for j in client.jobs(state=pb.FAILED, limit=1000)]
    assert not failed, failed
    prediction = client.predict("seed", X[:32])
    # Logits of the task's own classes (0-3) are finite; the other classes are masked to -inf.
    assert prediction.outputs.shape == (32, 10) and np.isfinite(prediction.outputs[:, :4]).all()
    assert set(prediction.classes) <= {0, 1, 2, 3}
    assert verify_chain(client.audit_events()) is None
    assert not list((fuzz_env.data_dir / "spool").glob("*.partial"))
    # Every byte on disk is accounted for: the files are exactly the live rows and the newest checkpoint.
    assert unaccounted_files(fuzz_env.data_dir, fuzz_env.database_url) == {}


@pytest.mark.parametrize("how", ["cancel", "unlearn"])
def test_cancel_and_unlearn_racing_the_worker_are_consistent(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, how: str
) -> None:
    """Learn, then at once cancel it (or unlearn its task) while the idle worker claims it: one story only."""
    with running_app(make_config(tmp_path / "data", database_url, **{"training.epochs": 1})) as running:
        client = running.client
        told: dict[str, str] = {}
        for i in range(20):
            job = client.learn(f"race-{i}", X[:40], Y[:40])
            try:
                if how == "cancel":
                    told[job.id] = pb.JobState.Name(client.cancel(job.id).state)
                else:
                    answer = client.unlearn(f"race-{i}")
                    told[job.id] = "CANCELLED" if "never reached" in answer.message else "QUEUED"
            except LetheError as exc:
                assert exc.code == grpc.StatusCode.FAILED_PRECONDITION, exc.message
                told[job.id] = "RUNNING"  # the worker was first: too late to cancel
        worker = running.app.worker
        assert worker is not None
        wait_for(
            lambda: worker.current_job is None and not client.jobs(state=pb.QUEUED, limit=1000),
            120,
            "the worker to go idle",
        )
        time.sleep(0.5)
        final = {j.id: pb.JobState.Name(j.state) for j in client.jobs(limit=1000) if j.kind == pb.LEARN}
        stories = {job_id: (said, final[job_id]) for job_id, said in told.items()}
        wrong = {k: v for k, v in stories.items() if v[0] == "CANCELLED" and v[1] != "CANCELLED"}
        assert not wrong, f"told CANCELLED, but the job then ran: {wrong}"
        assert all(v[1] in ("SUCCEEDED", "CANCELLED") for v in stories.values()), stories
        events = client.audit_events()
        for job_id in told:
            endings = [
                e.action
                for e in events
                if e.job_id == job_id and e.action in ("learn.succeeded", "learn.failed", "job.cancelled")
            ]
            assert len(endings) == 1, f"job {job_id} ended {endings}"
        assert unaccounted_files(tmp_path / "data", database_url) == {}


@pytest.mark.slow_on_postgres
def test_an_accepted_unlearn_is_never_undone_by_a_finishing_job(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> None:
    """Unlearn a task while another job finishes: from the moment the Unlearn returns, Predict refuses the task."""
    rng = random.Random(2)
    config = make_config(tmp_path / "data", database_url, **{"training.epochs": 1, "model.torch_threads": 1})
    with running_app(config) as running, grpc.insecure_channel(running.target) as channel:
        client, stub = running.client, pb_grpc.LetheStub(channel)
        served: list[str] = []
        for i in range(30):
            client.wait(client.learn(f"victim-{i}", X[:60], Y[:60]).id)
            other = client.learn(f"other-{i}", X[100:200], Y[100:200])
            time.sleep(rng.uniform(0, 0.08))  # land the unlearn anywhere in the other job, its finish included
            client.unlearn(f"victim-{i}")
            for _ in range(20):
                try:
                    stub.Predict(pb.PredictRequest(task=f"victim-{i}", inputs=to_tensor(X[:2])), timeout=30)
                    served.append(f"victim-{i}")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            client.wait(other.id)
        assert not served, f"tasks predicted after their unlearn was accepted: {sorted(set(served))}"
