"""Hostile and malformed requests through a real server, on SQLite and PostgreSQL.

Every case is sent with the raw stub and must be refused with the exact status code and a message
that names the offending field and what is allowed; its ``google.rpc.Status`` details carry an
``ErrorInfo`` reason and, for INVALID_ARGUMENT, a ``BadRequest`` field violation naming the same field
(the first fragment of the case); afterwards the server still answers a valid
Predict, and nothing changed: the same tasks, jobs, audit events, model version, ``data_files``
rows, and no file left in ``spool/`` (nor any ``.partial``/``.tmp`` file) under the data directory.

One server per backend serves the whole module (small limits so the limit cases stay small); its
state is a LEARNED task ``known`` and an UNLEARNED task ``forgotten``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import pb
from protos import lethe_pb2_grpc as pb_grpc
from protos.tensors import to_tensor
from server.app import App
from tests.crash_harness import (
    BACKENDS,
    Snapshot,
    data_dir_leftovers,
    health_status,
    learn_chunk,
    learn_header,
    module_database_url,
    snapshot,
    tensor,
    wait_for,
)
from tests.fakes import SlowStrategy, factory
from tests.rich_status import status_details
from tests.support import Running, digits, make_config, running_app

LIMITS: dict[str, Any] = {
    "limits.max_stream_samples": 100,
    "limits.max_stream_bytes": 40_000,
    "limits.max_predict_samples": 64,
    "server.max_message_bytes": 256 * 1024,
    "training.epochs": 2,
}
X, Y = digits([0, 1])
X4, Y4 = X[:4], Y[:4]
SHAPE = [4, 1, 8, 8]
UNKNOWN_JOB = "0" * 32


@dataclass
class Env:
    """The module's server, a raw stub on it, and what the seed requests created."""

    running: Running
    stub: pb_grpc.LetheStub
    data_dir: Path
    known_job: str

    def snapshot(self) -> Snapshot:
        assert self.running.app.engine is not None
        return snapshot(self.running.client, self.data_dir, self.running.app.engine)

    def assert_serving(self) -> None:
        assert health_status(self.running.target) == 1  # SERVING
        prediction = self.running.client.predict("known", X[:8])
        assert prediction.outputs.shape == (8, 10) and set(prediction.classes) <= {0, 1}


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    urls = module_database_url(request.param, tmp)
    url = next(urls)
    try:
        data_dir = tmp / "data"
        with running_app(make_config(data_dir, url, **LIMITS)) as running:
            client = running.client
            known = client.wait(client.learn("known", X[:80], Y[:80], idempotency_key="known-key").id)
            x23, y23 = digits([2, 3])
            client.wait(client.learn("forgotten", x23[:80], y23[:80]).id)
            client.wait(client.unlearn("forgotten", reason="seed").id)
            with grpc.insecure_channel(running.target) as channel:
                yield Env(running, pb_grpc.LetheStub(channel), data_dir, known.id)
    finally:
        urls.close()


# --------------------------------------------------------------------------- request builders
def x_tensor(dtype: int = pb.FLOAT32, shape: list[int] | None = None, data: bytes | None = None) -> pb.Tensor:
    """Inputs: four digits encoded as ``dtype`` unless ``data`` is given."""
    if data is None:
        numpy_dtype = {pb.FLOAT32: "<f4", pb.FLOAT64: "<f8", pb.FLOAT16: "<f2", pb.INT64: "<i8", pb.UINT8: "u1"}
        data = X4.astype(numpy_dtype.get(dtype, "<f4")).tobytes()
    return tensor(dtype, SHAPE if shape is None else shape, data)


def filled(value: float, dtype: str = "<f4", n: int = 4) -> pb.Tensor:
    """Inputs of ``n`` samples, every value ``value`` (NaN, inf, ...)."""
    array = np.full((n, 1, 8, 8), value, dtype=dtype)
    return to_tensor(array)


def labels(values: list[int] | np.ndarray) -> pb.Tensor:
    return to_tensor(np.asarray(values, dtype=np.int64))


def learn(env: Env, *messages: pb.LearnRequest) -> pb.Job:
    return env.stub.Learn(iter(messages), timeout=30)


def learn_one(chunk: pb.LearnRequest, **header: Any) -> Callable[[Env], pb.Job]:
    """A Learn of a valid header (task ``fresh``) and one chunk."""
    return lambda env: learn(env, learn_header(**header), chunk)


def learn_header_only(**header: Any) -> Callable[[Env], pb.Job]:
    """A Learn whose header is the problem; a valid chunk follows."""
    return lambda env: learn(env, learn_header(**header), learn_chunk(X4, Y4), learn_chunk(X4, Y4))


def predict(**fields: Any) -> Callable[[Env], pb.PredictResponse]:
    fields.setdefault("task", "known")
    fields.setdefault("inputs", to_tensor(X4))
    return lambda env: env.stub.Predict(pb.PredictRequest(**fields), timeout=30)


def unlearn(**fields: Any) -> Callable[[Env], pb.Job]:
    fields.setdefault("task", "known")
    return lambda env: env.stub.Unlearn(pb.UnlearnRequest(**fields), timeout=30)


def commit(**fields: Any) -> Callable[[Env], pb.Job]:
    fields.setdefault("task", "known")
    return lambda env: env.stub.Commit(pb.CommitRequest(**fields), timeout=30)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    code: grpc.StatusCode
    fragments: tuple[str, ...]
    call: Callable[[Env], Any]
    #: Request fields (``Message.field``) this case attacks; every field must be attacked somewhere.
    covers: tuple[str, ...] = ()
    #: The ErrorInfo reason expected (None: any UPPER_SNAKE reason).
    reason: str | None = None
    #: Refused by gRPC itself before any Lethe code runs (message size): no details.
    by_grpc: bool = False


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NAMES = "letters, digits"  # the allowed-characters part of every task-name message

LEARN_STREAM_CASES = [
    Case("learn-empty-stream", INVALID, ("header", "empty"), lambda env: learn(env), ("LearnRequest.header",)),
    Case(
        "learn-chunk-first",
        INVALID,
        ("header", "first message"),
        lambda env: learn(env, learn_chunk(X4, Y4)),
        ("LearnRequest.chunk",),
    ),
    Case(
        "learn-header-twice",
        INVALID,
        ("header", "message 1", "only once"),
        lambda env: learn(env, learn_header(), learn_header()),
        ("LearnRequest.header",),
    ),
    Case(
        "learn-header-after-chunk",
        INVALID,
        ("header", "message 2", "only once"),
        lambda env: learn(env, learn_header(), learn_chunk(X4, Y4), learn_header()),
        ("LearnRequest.header",),
    ),
    Case(
        "learn-empty-first-message",
        INVALID,
        ("header", "first message"),
        lambda env: learn(env, pb.LearnRequest(), learn_chunk(X4, Y4)),
        ("LearnRequest.header",),
    ),
    Case(
        "learn-empty-later-message",
        INVALID,
        ("chunk", "message 2", "empty"),
        lambda env: learn(env, learn_header(), learn_chunk(X4, Y4), pb.LearnRequest()),
        ("LearnRequest.chunk",),
    ),
    Case(
        "learn-header-only",
        INVALID,
        ("chunk", "at least 2 samples", "got 0"),
        lambda env: learn(env, learn_header()),
        ("LearnRequest.chunk",),
    ),
    Case(
        "learn-one-sample",
        INVALID,
        ("chunk", "at least 2 samples", "got 1"),
        learn_one(learn_chunk(X[:1], Y[:1])),
        ("LearnRequest.chunk",),
    ),
]

INPUT_CASES = [
    Case(
        "inputs-int64",
        INVALID,
        ("chunk[1].inputs.dtype", "FLOAT32", "got INT64"),
        learn_one(learn_chunk(x_tensor(pb.INT64), Y4)),
        ("SampleChunk.inputs", "Tensor.dtype"),
    ),
    Case(
        "inputs-dtype-unspecified",
        INVALID,
        ("chunk[1].inputs.dtype", "FLOAT32", "DATA_TYPE_UNSPECIFIED"),
        learn_one(learn_chunk(x_tensor(pb.DATA_TYPE_UNSPECIFIED), Y4)),
        ("Tensor.dtype",),
    ),
    Case(
        "inputs-dtype-99",
        INVALID,
        ("chunk[1].inputs.dtype", "FLOAT32", "unknown value 99"),
        learn_one(learn_chunk(x_tensor(99), Y4)),
        ("Tensor.dtype",),
    ),
    Case(
        "inputs-dtype-negative",
        INVALID,
        ("chunk[1].inputs.dtype", "unknown value -3"),
        learn_one(learn_chunk(x_tensor(-3), Y4)),
        ("Tensor.dtype",),
    ),
    Case(
        "inputs-missing",
        INVALID,
        ("chunk[1].inputs.dtype", "DATA_TYPE_UNSPECIFIED"),
        learn_one(pb.LearnRequest(chunk=pb.SampleChunk(labels=to_tensor(Y4)))),
        ("SampleChunk.inputs",),
    ),
    Case(
        "inputs-rank-3",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]", "[4, 8, 8]"),
        learn_one(learn_chunk(x_tensor(shape=[4, 8, 8]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-rank-5",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]"),
        learn_one(learn_chunk(x_tensor(shape=[4, 1, 8, 8, 1]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-rank-0",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]", "[]"),
        learn_one(learn_chunk(x_tensor(shape=[]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-per-sample-dims",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]", "[4, 1, 16, 4]"),
        learn_one(learn_chunk(x_tensor(shape=[4, 1, 16, 4]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-zero-samples",
        INVALID,
        ("chunk[1].inputs.shape", "at least one sample"),
        learn_one(learn_chunk(tensor(pb.FLOAT32, [0, 1, 8, 8], b""), labels([]))),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-negative-samples",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]", "-4"),
        learn_one(learn_chunk(x_tensor(shape=[-4, 1, 8, 8]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-negative-inner-dim",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]"),
        learn_one(learn_chunk(x_tensor(shape=[4, 1, -8, -8]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-huge-sample-dim",
        EXHAUSTED,
        ("chunk[1].inputs.shape", "limits.max_stream_samples", str(2**40)),
        learn_one(learn_chunk(x_tensor(shape=[2**40, 1, 8, 8]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-huge-inner-dim",
        INVALID,
        ("chunk[1].inputs.shape", "[n, 1, 8, 8]"),
        learn_one(learn_chunk(x_tensor(shape=[4, 1, 8, 2**40]), Y4)),
        ("Tensor.shape",),
    ),
    Case(
        "inputs-too-few-bytes",
        INVALID,
        ("chunk[1].inputs", "1020 bytes", "needs 1024"),
        learn_one(learn_chunk(x_tensor(data=X4.tobytes()[:-4]), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-too-many-bytes",
        INVALID,
        ("chunk[1].inputs", "1025 bytes", "needs 1024"),
        learn_one(learn_chunk(x_tensor(data=X4.tobytes() + b"\0"), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-no-bytes",
        INVALID,
        ("chunk[1].inputs", "0 bytes", "needs 1024"),
        learn_one(learn_chunk(x_tensor(data=b""), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-float32-nan",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(filled(np.nan), Y4)),
        ("Tensor.data",),
        reason="NON_FINITE_INPUT",
    ),
    Case(
        "inputs-float32-inf",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(filled(np.inf), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-float64-nan",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(filled(np.nan, "<f8"), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-float64-minus-inf",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(filled(-np.inf, "<f8"), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-float64-overflows-float32",
        INVALID,
        ("chunk[1].inputs.data", "float32"),
        learn_one(learn_chunk(filled(1e300, "<f8"), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-float16-nan",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(filled(np.nan, "<f2"), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-bfloat16-nan",
        INVALID,
        ("chunk[1].inputs.data", "finite"),
        learn_one(learn_chunk(tensor(pb.BFLOAT16, SHAPE, np.full(256, 0x7FC0, "<u2").tobytes()), Y4)),
        ("Tensor.data",),
    ),
    Case(
        "inputs-nan-in-second-chunk",
        INVALID,
        ("chunk[2].inputs.data", "finite"),
        lambda env: learn(env, learn_header(), learn_chunk(X4, Y4), learn_chunk(filled(np.nan), Y4)),
        ("Tensor.data",),
    ),
]

LABEL_CASES = [
    Case(
        "labels-float32",
        INVALID,
        ("chunk[1].labels.dtype", "INT64", "got FLOAT32"),
        learn_one(learn_chunk(X4, Y4.astype(np.float32))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-uint8",
        INVALID,
        ("chunk[1].labels.dtype", "INT64", "got UINT8"),
        learn_one(learn_chunk(X4, Y4.astype(np.uint8))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-missing",
        INVALID,
        ("chunk[1].labels.dtype", "INT64", "DATA_TYPE_UNSPECIFIED"),
        learn_one(pb.LearnRequest(chunk=pb.SampleChunk(inputs=to_tensor(X4)))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-too-few",
        INVALID,
        ("chunk[1].labels.shape", "[4]", "one label per input", "[3]"),
        learn_one(learn_chunk(X4, Y4[:3])),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-too-many",
        INVALID,
        ("chunk[1].labels.shape", "[4]", "[5]"),
        learn_one(learn_chunk(X4, Y[:5])),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-rank-2",
        INVALID,
        ("chunk[1].labels.shape", "[4]", "[4, 1]"),
        learn_one(learn_chunk(X4, Y4.reshape(4, 1))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-huge-count",
        INVALID,
        ("chunk[1].labels.shape", "[4]"),
        learn_one(learn_chunk(X4, tensor(pb.INT64, [2**40], Y4.tobytes()))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-byte-length",
        INVALID,
        ("chunk[1].labels", "31 bytes", "needs 32"),
        learn_one(learn_chunk(X4, tensor(pb.INT64, [4], Y4.tobytes()[:-1]))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-negative",
        INVALID,
        ("chunk[1].labels.data", "[0, 10)", "-1"),
        learn_one(learn_chunk(X4, labels([0, 1, -1, 0]))),
        ("SampleChunk.labels",),
    ),
    Case(
        "labels-num-classes",
        INVALID,
        ("chunk[1].labels.data", "[0, 10)", "got 10"),
        learn_one(learn_chunk(X4, labels([0, 10, 1, 0]))),
        ("SampleChunk.labels",),
        reason="LABEL_OUT_OF_RANGE",
    ),
    Case(
        "labels-huge",
        INVALID,
        ("chunk[1].labels.data", "[0, 10)", str(2**62)),
        learn_one(learn_chunk(X4, labels([2**62, 0, 1, 0]))),
        ("SampleChunk.labels",),
    ),
    Case(
        "sample-ids-count",
        INVALID,
        ("chunk[1].sample_ids", "one id per sample (4)", "got 3"),
        learn_one(learn_chunk(X4, Y4, ["a", "b", "c"])),
        ("SampleChunk.sample_ids",),
    ),
    Case(
        "sample-ids-control-character",
        INVALID,
        ("chunk[1].sample_ids", "printable"),
        learn_one(learn_chunk(X4, Y4, ["a", "b\x00", "c", "d"])),
        ("SampleChunk.sample_ids",),
    ),
    Case(
        "sample-ids-empty-id",
        INVALID,
        ("chunk[1].sample_ids", "1-256"),
        learn_one(learn_chunk(X4, Y4, ["a", "", "c", "d"])),
        ("SampleChunk.sample_ids",),
    ),
    Case(
        "sample-ids-too-long",
        INVALID,
        ("chunk[1].sample_ids", "1-256"),
        learn_one(learn_chunk(X4, Y4, ["a", "b", "c", "d" * 257])),
        ("SampleChunk.sample_ids",),
    ),
]

LIMIT_CASES = [
    Case(
        "stream-over-max-samples",
        EXHAUSTED,
        ("chunk[2].inputs.shape", "limits.max_stream_samples", "100", "60 already received"),
        lambda env: learn(env, learn_header(), learn_chunk(X[:60], Y[:60]), learn_chunk(X[60:120], Y[60:120])),
        ("LearnRequest.chunk",),
    ),
    Case(
        "chunk-over-max-samples",
        EXHAUSTED,
        ("chunk[1].inputs.shape", "limits.max_stream_samples", "101 samples"),
        learn_one(learn_chunk(X[:101], Y[:101])),
        ("LearnRequest.chunk",),
    ),
    Case(
        "stream-over-max-bytes",
        EXHAUSTED,
        ("chunk", "limits.max_stream_bytes", "40000"),
        lambda env: learn(
            env,
            learn_header(),
            learn_chunk(X[:50].astype(np.float64), Y[:50]),
            learn_chunk(X[50:100].astype(np.float64), Y[50:100]),
        ),
        ("LearnRequest.chunk",),
    ),
    Case(
        "learn-message-over-max-size",
        EXHAUSTED,
        ("larger than max",),
        learn_one(learn_chunk(x_tensor(data=b"\0" * 300_000), Y4)),
        ("LearnRequest.chunk",),
        by_grpc=True,
    ),
    Case(
        "predict-message-over-max-size",
        EXHAUSTED,
        ("larger than max",),
        predict(inputs=x_tensor(data=b"\0" * 300_000)),
        ("PredictRequest.inputs",),
        by_grpc=True,
    ),
    Case(
        "predict-over-max-samples",
        EXHAUSTED,
        ("inputs.shape", "limits.max_predict_samples", "65 samples", "64"),
        predict(inputs=to_tensor(X[:65])),
        ("PredictRequest.inputs",),
        reason="TOO_MANY_SAMPLES",
    ),
    Case(
        "predict-huge-sample-dim",
        EXHAUSTED,
        ("inputs.shape", "limits.max_predict_samples"),
        predict(inputs=x_tensor(shape=[2**40, 1, 8, 8])),
        ("PredictRequest.inputs",),
    ),
]

BAD_TASK_NAMES = {
    "dot-dot-slash": "../x",
    "slash": "a/b",
    "backslash": "a\\b",
    "dot": ".",
    "dot-dot": "..",
    "leading-dash": "-x",
    "leading-space": " x",
    "nul": "a\x00b",
    "newline": "a\nb",
    "trailing-newline": "abc\n",
    "tab": "a\tb",
    "escape": "a\x1b[31m",
    "too-long": "a" * 129,
    "unicode-letter": "tâche",
    "unicode-cjk": "任务",
    "zero-width": "ta\u200bsk",
    "arabic-digits": "١٢٣",
    "emoji": "x🙂",
}

HEADER_CASES = [
    *[
        Case(f"task-{slug}", INVALID, ("header.task", NAMES), learn_header_only(task=name), ("LearnHeader.task",))
        for slug, name in BAD_TASK_NAMES.items()
    ],
    Case("task-empty", INVALID, ("header.task", "required"), learn_header_only(task=""), ("LearnHeader.task",)),
    Case(
        "task-already-learned",
        EXISTS,
        ("'known'", "already learned"),
        learn_header_only(task="known"),
        ("LearnHeader.task",),
        reason="TASK_EXISTS",
    ),
    Case(
        "task-name-of-unlearned",
        EXISTS,
        ("'forgotten'", "unlearned", "never reused"),
        learn_header_only(task="forgotten"),
        ("LearnHeader.task",),
        reason="TASK_NAME_RETIRED",
    ),
    Case(
        "idempotency-key-too-long",
        INVALID,
        ("header.idempotency_key", "256"),
        learn_header_only(idempotency_key="k" * 257),
        ("LearnHeader.idempotency_key",),
    ),
    Case(
        "idempotency-key-control-character",
        INVALID,
        ("header.idempotency_key", "printable"),
        learn_header_only(idempotency_key="key\x07"),
        ("LearnHeader.idempotency_key",),
    ),
    Case(
        "idempotency-key-of-other-task",
        PRECONDITION,
        ("idempotency_key", "known-key", "'known'"),
        learn_header_only(idempotency_key="known-key"),
        ("LearnHeader.idempotency_key",),
        reason="IDEMPOTENCY_KEY_REUSED",
    ),
    Case(
        "learning-rate-nan",
        INVALID,
        ("header.learning_rate", "(0, 10]", "nan"),
        learn_header_only(learning_rate=float("nan")),
        ("LearnHeader.learning_rate",),
    ),
    Case(
        "learning-rate-inf",
        INVALID,
        ("header.learning_rate", "(0, 10]"),
        learn_header_only(learning_rate=float("inf")),
        ("LearnHeader.learning_rate",),
    ),
    Case(
        "learning-rate-negative",
        INVALID,
        ("header.learning_rate", "(0, 10]", "-0.5"),
        learn_header_only(learning_rate=-0.5),
        ("LearnHeader.learning_rate",),
    ),
    Case(
        "learning-rate-too-big",
        INVALID,
        ("header.learning_rate", "(0, 10]"),
        learn_header_only(learning_rate=11.0),
        ("LearnHeader.learning_rate",),
    ),
    Case(
        "holdout-0.95",
        INVALID,
        ("header.holdout_fraction", "(0, 0.9)"),
        learn_header_only(holdout_fraction=0.95),
        ("LearnHeader.holdout_fraction",),
    ),
    Case(
        "holdout-negative",
        INVALID,
        ("header.holdout_fraction", "(0, 0.9)"),
        learn_header_only(holdout_fraction=-0.1),
        ("LearnHeader.holdout_fraction",),
    ),
    Case(
        "holdout-nan",
        INVALID,
        ("header.holdout_fraction", "(0, 0.9)"),
        learn_header_only(holdout_fraction=float("nan")),
        ("LearnHeader.holdout_fraction",),
    ),
    Case(
        "epochs-above-max",
        INVALID,
        ("header.epochs", "10000", "10001"),
        learn_header_only(epochs=10_001),
        ("LearnHeader.epochs",),
    ),
    Case(
        "epochs-uint32-max",
        INVALID,
        ("header.epochs", "10000"),
        learn_header_only(epochs=2**32 - 1),
        ("LearnHeader.epochs",),
    ),
    Case(
        "batch-size-above-max",
        INVALID,
        ("header.batch_size", "65536"),
        learn_header_only(batch_size=65_537),
        ("LearnHeader.batch_size",),
    ),
    Case(
        "mode-unknown",
        INVALID,
        ("header.mode", "PERMANENT or TEMPORARY", "99"),
        learn_header_only(mode=99),
        ("LearnHeader.mode",),
    ),
    Case(
        "ttl-on-a-permanent-learn",
        INVALID,
        ("header.ttl_seconds", "TEMPORARY", "5"),
        learn_header_only(ttl_seconds=5),
        ("LearnHeader.ttl_seconds",),
    ),
    Case(
        "metadata-too-many-entries",
        INVALID,
        ("header.metadata", "64 entries"),
        learn_header_only(metadata={f"k{i}": "v" for i in range(65)}),
        ("LearnHeader.metadata",),
    ),
    Case(
        "metadata-value-too-long",
        INVALID,
        ("header.metadata", "1024"),
        learn_header_only(metadata={"k": "v" * 1025}),
        ("LearnHeader.metadata",),
    ),
    Case(
        "metadata-key-too-long",
        INVALID,
        ("header.metadata", "keys 1-128"),
        learn_header_only(metadata={"k" * 129: "v"}),
        ("LearnHeader.metadata",),
    ),
    Case(
        "metadata-empty-key",
        INVALID,
        ("header.metadata", "keys 1-128"),
        learn_header_only(metadata={"": "v"}),
        ("LearnHeader.metadata",),
    ),
    Case(
        "metadata-control-characters",
        INVALID,
        ("header.metadata", "printable"),
        learn_header_only(metadata={"source": "a\x00b"}),
        ("LearnHeader.metadata",),
    ),
]

UNLEARN_CASES = [
    Case(
        "unlearn-unknown-task",
        NOT_FOUND,
        ("'nobody'", "does not exist"),
        unlearn(task="nobody"),
        ("UnlearnRequest.task",),
        reason="TASK_NOT_FOUND",
    ),
    Case("unlearn-empty-task", INVALID, ("task", "required"), unlearn(task=""), ("UnlearnRequest.task",)),
    Case("unlearn-path-task", INVALID, ("task", NAMES), unlearn(task="../known"), ("UnlearnRequest.task",)),
    Case("unlearn-newline-task", INVALID, ("task", NAMES), unlearn(task="known\n"), ("UnlearnRequest.task",)),
    Case(
        "unlearn-already-unlearned",
        PRECONDITION,
        ("'forgotten'", "already unlearned"),
        unlearn(task="forgotten"),
        ("UnlearnRequest.task",),
        reason="TASK_UNLEARNED",
    ),
    Case(
        "unlearn-unknown-method",
        INVALID,
        ("method", "delete-head", "'scrub'"),
        unlearn(method="scrub"),
        ("UnlearnRequest.method",),
    ),
    Case(
        "unlearn-method-of-other-strategy",
        INVALID,
        ("method", "delete-head", "'exact'"),
        unlearn(method="exact"),
        ("UnlearnRequest.method",),
    ),
    Case(
        "unlearn-reason-control-characters",
        INVALID,
        ("reason", "control characters"),
        unlearn(reason="because\x07\x1b[2J"),
        ("UnlearnRequest.reason",),
    ),
    Case(
        "unlearn-reason-too-long",
        INVALID,
        ("reason", "4096"),
        unlearn(reason="r" * 4097),
        ("UnlearnRequest.reason",),
    ),
    Case(
        "unlearn-key-too-long",
        INVALID,
        ("idempotency_key", "256"),
        unlearn(idempotency_key="k" * 257),
        ("UnlearnRequest.idempotency_key",),
    ),
    Case(
        "unlearn-key-control-character",
        INVALID,
        ("idempotency_key", "printable"),
        unlearn(idempotency_key="k\n"),
        ("UnlearnRequest.idempotency_key",),
    ),
    Case(
        "unlearn-key-of-a-learn",
        PRECONDITION,
        ("idempotency_key", "known-key", "learn"),
        unlearn(idempotency_key="known-key"),
        ("UnlearnRequest.idempotency_key",),
    ),
    Case(
        "unlearn-samples-without-retained-data",
        PRECONDITION,
        ("sample_ids", "training.retain_training_data = true"),
        unlearn(task="", sample_ids=["someone"]),
        ("UnlearnRequest.sample_ids",),
    ),
    Case(
        "unlearn-samples-empty-id",
        INVALID,
        ("sample_ids[1]", "printable"),
        unlearn(task="", sample_ids=["someone", ""]),
        ("UnlearnRequest.sample_ids",),
    ),
    Case(
        "locate-no-ids",
        INVALID,
        ("sample_ids", "at least one"),
        lambda env: env.stub.LocateSamples(pb.LocateSamplesRequest(), timeout=30),
        ("LocateSamplesRequest.sample_ids",),
    ),
    Case(
        "locate-id-too-long",
        INVALID,
        ("sample_ids[0]", "256"),
        lambda env: env.stub.LocateSamples(pb.LocateSamplesRequest(sample_ids=["i" * 257]), timeout=30),
        ("LocateSamplesRequest.sample_ids",),
    ),
]

PREDICT_CASES = [
    Case("predict-no-task", INVALID, ("task", "required"), predict(task=""), ("PredictRequest.task",)),
    Case("predict-path-task", INVALID, ("task", NAMES), predict(task="../known"), ("PredictRequest.task",)),
    Case(
        "predict-unknown-task",
        NOT_FOUND,
        ("'nobody'", "does not exist"),
        predict(task="nobody"),
        ("PredictRequest.task",),
    ),
    Case(
        "predict-unlearned",
        PRECONDITION,
        ("'forgotten'", "unlearned", "allow_unlearned"),
        predict(task="forgotten"),
        ("PredictRequest.task", "PredictRequest.allow_unlearned"),
    ),
    Case(
        "predict-allow-unlearned-bad-inputs",
        INVALID,
        ("inputs.data", "finite"),
        predict(task="forgotten", allow_unlearned=True, inputs=filled(np.nan)),
        ("PredictRequest.allow_unlearned",),
    ),
    Case(
        "predict-inputs-missing",
        INVALID,
        ("inputs.dtype", "DATA_TYPE_UNSPECIFIED"),
        predict(inputs=pb.Tensor()),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-int64-inputs",
        INVALID,
        ("inputs.dtype", "FLOAT32", "INT64"),
        predict(inputs=x_tensor(pb.INT64)),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-dtype-99",
        INVALID,
        ("inputs.dtype", "unknown value 99"),
        predict(inputs=x_tensor(99)),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-wrong-shape",
        INVALID,
        ("inputs.shape", "[n, 1, 8, 8]", "[4, 64]"),
        predict(inputs=x_tensor(shape=[4, 64])),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-zero-samples",
        INVALID,
        ("inputs.shape", "at least one sample"),
        predict(inputs=tensor(pb.FLOAT32, [0, 1, 8, 8], b"")),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-byte-length",
        INVALID,
        ("inputs", "bytes", "needs 1024"),
        predict(inputs=x_tensor(data=b"\0" * 1000)),
        ("PredictRequest.inputs",),
    ),
    Case("predict-nan", INVALID, ("inputs.data", "finite"), predict(inputs=filled(np.nan)), ("PredictRequest.inputs",)),
    Case(
        "predict-float64-overflow",
        INVALID,
        ("inputs.data", "float32"),
        predict(inputs=filled(-1e300, "<f8")),
        ("PredictRequest.inputs",),
    ),
    Case(
        "predict-stream-bad-second-request",
        INVALID,
        ("inputs.shape", "[n, 1, 8, 8]"),
        lambda env: list(
            env.stub.PredictStream(
                iter(
                    [
                        pb.PredictRequest(task="known", inputs=to_tensor(X4)),
                        pb.PredictRequest(task="known", inputs=x_tensor(shape=[4, 8, 8])),
                    ]
                ),
                timeout=30,
            )
        ),
        ("PredictRequest.inputs",),
    ),
]

BAD_JOB_IDS = {
    "path": "../etc/passwd",
    "empty": "",
    "uppercase": "A" * 32,
    "short": "0" * 31,
    "long": "0" * 33,
    "trailing-newline": "0" * 32 + "\n",
    "sql": "' OR '1'='1",
    "unicode": "٠" * 32,
}


def get_job(job_id: str) -> Callable[[Env], pb.Job]:
    return lambda env: env.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=30)


def cancel_job(job_id: str) -> Callable[[Env], pb.Job]:
    return lambda env: env.stub.CancelJob(pb.GetJobRequest(id=job_id), timeout=30)


def watch_job(job_id: str) -> Callable[[Env], list[pb.Job]]:
    return lambda env: list(env.stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=30))


JOB_CASES = [
    *[
        Case(f"{verb}-id-{slug}", INVALID, ("id", "32 lowercase hex"), call(job_id), ("GetJobRequest.id",))
        for slug, job_id in BAD_JOB_IDS.items()
        for verb, call in (("get-job", get_job), ("cancel-job", cancel_job), ("watch-job", watch_job))
    ],
    Case(
        "get-job-unknown",
        NOT_FOUND,
        (UNKNOWN_JOB, "does not exist"),
        get_job(UNKNOWN_JOB),
        ("GetJobRequest.id",),
        reason="JOB_NOT_FOUND",
    ),
    Case(
        "cancel-job-unknown", NOT_FOUND, (UNKNOWN_JOB, "does not exist"), cancel_job(UNKNOWN_JOB), ("GetJobRequest.id",)
    ),
    Case(
        "watch-job-unknown", NOT_FOUND, (UNKNOWN_JOB, "does not exist"), watch_job(UNKNOWN_JOB), ("GetJobRequest.id",)
    ),
    Case(
        "cancel-finished-job",
        PRECONDITION,
        ("succeeded", "only queued or running jobs"),
        lambda env: env.stub.CancelJob(pb.GetJobRequest(id=env.known_job), timeout=30),
        ("GetJobRequest.id",),
        reason="JOB_ENDED",
    ),
]

LIST_CASES = [
    Case(
        "list-jobs-state-99",
        INVALID,
        ("state", "unknown value 99"),
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(state=99), timeout=30),
        ("ListJobsRequest.state",),
    ),
    Case(
        "list-jobs-state-negative",
        INVALID,
        ("state", "unknown value -1"),
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(state=-1), timeout=30),
        ("ListJobsRequest.state",),
    ),
    Case(
        "list-jobs-limit-1001",
        INVALID,
        ("limit", "1000", "1001"),
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(limit=1001), timeout=30),
        ("ListJobsRequest.limit",),
    ),
    Case(
        "list-jobs-limit-uint32-max",
        INVALID,
        ("limit", "1000"),
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(limit=2**32 - 1), timeout=30),
        ("ListJobsRequest.limit",),
    ),
    Case(
        "list-jobs-bad-task",
        INVALID,
        ("task", NAMES),
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(task="a/b"), timeout=30),
        ("ListJobsRequest.task",),
    ),
    Case(
        "list-tasks-state-99",
        INVALID,
        ("state", "unknown value 99"),
        lambda env: env.stub.ListTasks(pb.ListTasksRequest(state=99), timeout=30),
        ("ListTasksRequest.state",),
    ),
    Case(
        "get-task-bad-name",
        INVALID,
        ("name", NAMES),
        lambda env: env.stub.GetTask(pb.GetTaskRequest(name="../known"), timeout=30),
        ("GetTaskRequest.name",),
    ),
    Case(
        "get-task-empty-name",
        INVALID,
        ("name", "required"),
        lambda env: env.stub.GetTask(pb.GetTaskRequest(name=""), timeout=30),
        ("GetTaskRequest.name",),
    ),
    Case(
        "get-task-unknown",
        NOT_FOUND,
        ("'nobody'", "does not exist"),
        lambda env: env.stub.GetTask(pb.GetTaskRequest(name="nobody"), timeout=30),
        ("GetTaskRequest.name",),
    ),
    Case(
        "audit-limit-1001",
        INVALID,
        ("limit", "1000"),
        lambda env: env.stub.ListAuditEvents(pb.ListAuditEventsRequest(limit=1001), timeout=30),
        ("ListAuditEventsRequest.limit",),
    ),
    Case(
        "audit-bad-task",
        INVALID,
        ("task", NAMES),
        lambda env: env.stub.ListAuditEvents(pb.ListAuditEventsRequest(task="a\nb"), timeout=30),
        ("ListAuditEventsRequest.task",),
    ),
    Case(
        "evaluations-limit-1001",
        INVALID,
        ("limit", "1000"),
        lambda env: env.stub.ListEvaluations(pb.ListEvaluationsRequest(limit=1001), timeout=30),
        ("ListEvaluationsRequest.limit",),
    ),
]

COMMIT_CASES = [
    Case(
        "commit-unknown-task",
        NOT_FOUND,
        ("'nobody'", "does not exist"),
        commit(task="nobody"),
        ("CommitRequest.task",),
        reason="TASK_NOT_FOUND",
    ),
    Case("commit-empty-task", INVALID, ("task", "required"), commit(task=""), ("CommitRequest.task",)),
    Case(
        "commit-permanent-task",
        PRECONDITION,
        ("'known'", "learned", "not temporary"),
        commit(),
        ("CommitRequest.task",),
        reason="TASK_NOT_TEMPORARY",
    ),
    Case(
        "commit-unlearned-task",
        PRECONDITION,
        ("'forgotten'", "unlearned", "not temporary"),
        commit(task="forgotten"),
        ("CommitRequest.task",),
        reason="TASK_NOT_TEMPORARY",
    ),
    Case(
        "commit-key-too-long",
        INVALID,
        ("idempotency_key", "256"),
        commit(idempotency_key="k" * 257),
        ("CommitRequest.idempotency_key",),
    ),
]

CASES = [
    *LEARN_STREAM_CASES,
    *INPUT_CASES,
    *LABEL_CASES,
    *LIMIT_CASES,
    *HEADER_CASES,
    *UNLEARN_CASES,
    *COMMIT_CASES,
    *PREDICT_CASES,
    *JOB_CASES,
    *LIST_CASES,
]


def assert_unchanged(env: Env, before: Snapshot) -> None:
    """The state equals ``before``; a cancelled stream's handler may need a moment to clean up."""
    deadline = time.monotonic() + 10
    after = env.snapshot()
    while after != before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = env.snapshot()
    assert after == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_refused_with_status_and_field_and_nothing_changes(env: Env, case: Case) -> None:
    before = env.snapshot()
    with pytest.raises(grpc.RpcError) as refused:
        case.call(env)
    code, details = refused.value.code(), refused.value.details() or ""
    assert code == case.code, f"{code.name}: {details}"
    for fragment in case.fragments:
        assert fragment in details, f"{fragment!r} missing from {details!r}"
    assert_rich_details(refused.value, case)
    env.assert_serving()
    assert_unchanged(env, before)


def assert_rich_details(error: grpc.RpcError, case: Case) -> None:
    """ErrorInfo on every refusal Lethe makes; for INVALID_ARGUMENT one BadRequest naming the case's field."""
    rich = status_details(error)
    if case.by_grpc:
        assert rich is None  # gRPC itself refused the message before Lethe saw it
        return
    assert rich is not None, "no google.rpc.Status in grpc-status-details-bin"
    assert rich.domain == "lethe.v1" and rich.reason and re.fullmatch(r"[A-Z][A-Z0-9_]*[A-Z0-9]", rich.reason)
    if case.reason is not None:
        assert rich.reason == case.reason
    if case.code == INVALID:
        field = case.fragments[0]  # every INVALID_ARGUMENT case names its field first
        assert [name for name, _ in rich.field_violations] == [field], rich.field_violations
        description = rich.field_violations[0][1]
        assert description and (error.details() or "") == f"{field}: {description}"
        assert rich.metadata.get("field") == field
    else:
        assert rich.field_violations == []
    if case.code in (INVALID, NOT_FOUND, PRECONDITION, EXISTS, EXHAUSTED):
        assert rich.retry_after is None  # size limits and refusals that waiting cannot cure


# --------------------------------------------------------------------------- hostile but valid
@dataclass(frozen=True)
class Accepted:
    id: str
    call: Callable[[Env], Any]
    covers: tuple[str, ...]
    #: What the answer must satisfy.
    expect: Callable[[Any], bool] = lambda answer: True


def empty_page(answer: Any) -> bool:
    return not any(len(getattr(answer, f, [])) for f in ("jobs", "events", "evaluations"))


def full_page(answer: Any) -> bool:
    return any(len(getattr(answer, f, [])) for f in ("jobs", "events", "evaluations"))


ACCEPTED = [
    Accepted(
        "list-jobs-negative-after-seq",
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(after_seq=-(2**62)), timeout=30),
        ("ListJobsRequest.after_seq",),
        full_page,
    ),
    Accepted(
        "list-jobs-after-seq-beyond-end",
        lambda env: env.stub.ListJobs(pb.ListJobsRequest(after_seq=2**62), timeout=30),
        ("ListJobsRequest.after_seq",),
        empty_page,
    ),
    Accepted(
        "audit-after-seq-beyond-int32",
        lambda env: env.stub.ListAuditEvents(pb.ListAuditEventsRequest(after_seq=2**31), timeout=30),
        ("ListAuditEventsRequest.after_seq",),
        empty_page,
    ),
    Accepted(
        "evaluations-after-seq-beyond-int64",
        lambda env: env.stub.ListEvaluations(pb.ListEvaluationsRequest(after_job_seq=2**63 - 1), timeout=30),
        ("ListEvaluationsRequest.after_job_seq",),
        empty_page,
    ),
    Accepted(
        "audit-negative-after-seq",
        lambda env: env.stub.ListAuditEvents(pb.ListAuditEventsRequest(after_seq=-5), timeout=30),
        ("ListAuditEventsRequest.after_seq",),
        full_page,
    ),
    Accepted(
        "evaluations-negative-after-seq",
        lambda env: env.stub.ListEvaluations(pb.ListEvaluationsRequest(after_job_seq=-5), timeout=30),
        ("ListEvaluationsRequest.after_job_seq",),
        full_page,
    ),
    Accepted("get-model", lambda env: env.stub.GetModel(pb.GetModelRequest(), timeout=30), ()),
    Accepted(
        "predict-probabilities-uint8",
        predict(inputs=to_tensor((X4 * 255).astype(np.uint8)), return_probabilities=True),
        ("PredictRequest.return_probabilities",),
    ),
    Accepted(
        "predict-bfloat16",
        predict(inputs=tensor(pb.BFLOAT16, SHAPE, (X4.view("<u4") >> 16).astype("<u2").tobytes())),
        ("PredictRequest.inputs",),
    ),
    Accepted(
        "predict-max-samples",
        predict(inputs=to_tensor(X[:64])),
        ("PredictRequest.inputs",),
    ),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_hostile_but_valid_requests_answer_and_change_nothing(env: Env, case: Accepted) -> None:
    before = env.snapshot()
    assert case.expect(case.call(env))
    assert_unchanged(env, before)


def test_audited_evaluation_of_an_unlearned_task_is_the_only_change(env: Env) -> None:
    before = env.snapshot()
    env.running.client.predict("forgotten", X4, allow_unlearned=True)
    after = env.snapshot()
    assert after.audit_events == before.audit_events + 1
    assert env.running.client.audit_events()[-1].action == "predict.unlearned"
    assert {**after.__dict__, "audit_events": 0} == {**before.__dict__, "audit_events": 0}


# --------------------------------------------------------------------------- streams that die half-way
class ClientGaveUpError(Exception):
    """Raised by a request generator to abort its stream."""


def _stream(release: threading.Event, sent: threading.Event, *, raise_after: bool) -> Iterator[pb.LearnRequest]:
    yield learn_header(task="half-way")
    for start in range(0, 30, 10):
        yield learn_chunk(X[start : start + 10], Y[start : start + 10])
    sent.set()
    release.wait(30)
    if raise_after:
        raise ClientGaveUpError("the client gives up")
    yield learn_chunk(X[30:40], Y[30:40])


@pytest.mark.parametrize("how", ["generator-raises", "future-cancelled", "deadline-exceeded"])
def test_learn_stream_dropped_half_way_leaves_nothing(env: Env, how: str) -> None:
    before = env.snapshot()
    release, sent = threading.Event(), threading.Event()
    requests = _stream(release, sent, raise_after=how == "generator-raises")
    timeout = 5 if how == "deadline-exceeded" else 30
    future = env.stub.Learn.future(requests, timeout=timeout)
    assert sent.wait(10)
    # The server has started spooling: a partial file exists while the stream is open.
    wait_for(lambda: bool(data_dir_leftovers(env.data_dir)), 10, "the partial spool file")
    if how == "future-cancelled":
        future.cancel()
    elif how == "generator-raises":
        release.set()
    with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
        future.result(timeout=30)
    release.set()
    if how == "deadline-exceeded":
        assert future.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    elif how == "future-cancelled":
        assert future.cancelled()
    else:
        assert future.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
    assert_unchanged(env, before)  # no job, no task, no audit event, the partial spool file is gone
    env.assert_serving()


def test_requests_on_tasks_still_learning(tmp_path: Path) -> None:
    """A running learn that never ends in time (its own server, stopped without grace) and one queued behind it."""
    with running_app(make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **LIMITS)) as running:
        client = running.client
        assert running.app.engine is not None
        endless = client.learn("slow-learner", X[:90], Y[:90], epochs=10_000, batch_size=1)
        wait_for(lambda: client.job(endless.id).state == pb.RUNNING, 60, "the learn job to start")
        queued = client.learn("queued-learner", X[:20], Y[:20])
        assert queued.state == pb.QUEUED
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.LetheStub(channel)
            before = snapshot(client, tmp_path / "data", running.app.engine)
            for task in ("slow-learner", "queued-learner"):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Predict(pb.PredictRequest(task=task, inputs=to_tensor(X4)), timeout=30)
                assert refused.value.code() == PRECONDITION
                assert f"'{task}'" in refused.value.details() and "still being learned" in refused.value.details()
                with pytest.raises(grpc.RpcError) as again:
                    stub.Learn(iter([learn_header(task=task), learn_chunk(X4, Y4)]), timeout=30)
                assert again.value.code() == EXISTS and "already learning" in again.value.details()
            assert snapshot(client, tmp_path / "data", running.app.engine) == before
            # Cancelling the queued one frees its name and deletes its spooled data.
            assert client.cancel(queued.id).state == pb.CANCELLED
            assert [t.name for t in client.tasks()] == ["slow-learner"]
            assert len(list((tmp_path / "data" / "spool").iterdir())) == 1
            # The running one stops at its next step (DESIGN.md section 9): same, nothing left.
            assert stub.CancelJob(pb.GetJobRequest(id=endless.id), timeout=30).state == pb.CANCELLED
            assert client.tasks() == [] and not list((tmp_path / "data" / "spool").iterdir())


def test_refusals_say_whether_and_when_to_retry(tmp_path: Path) -> None:
    """UNAVAILABLE (a task whose samples are being forgotten) and a full queue carry RetryInfo and their
    reason; a taken task name is ALREADY_EXISTS without one: waiting cannot free it."""
    release = threading.Event()
    release.set()
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    config = make_config(
        tmp_path / "data", url, **{**LIMITS, "limits.max_queued_jobs": 1, "training.retain_training_data": True}
    )
    slow = factory(App(config).build_strategy, lambda strategy: SlowStrategy(strategy, release))
    ids = [f"person-{i}" for i in range(80)]
    with (
        running_app(config, strategy_factory=slow) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        client, stub = running.client, pb_grpc.LetheStub(channel)
        client.wait(client.learn("a", X[:80], Y[:80], sample_ids=ids).id)
        release.clear()  # the next job holds the worker until released
        forgetting = client.forget_samples(ids[:1])
        wait_for(lambda: client.job(forgetting.id).state == pb.RUNNING, 60, "the records unlearn to start")

        with pytest.raises(grpc.RpcError) as busy:
            stub.Predict(pb.PredictRequest(task="a", inputs=to_tensor(X4)), timeout=30)
        assert busy.value.code() == grpc.StatusCode.UNAVAILABLE, busy.value.details()
        rich = status_details(busy.value)
        assert rich is not None and rich.domain == "lethe.v1" and rich.reason == "TASK_BEING_FORGOTTEN"
        assert rich.retry_after is not None and rich.retry_after > 0

        queued = client.learn("b", X[:20], Y[:20])
        assert queued.state == pb.QUEUED
        with pytest.raises(grpc.RpcError) as full:
            stub.Learn(iter([learn_header(task="c"), learn_chunk(X4, Y4)]), timeout=30)
        assert full.value.code() == EXHAUSTED and "queue is full" in (full.value.details() or "")
        rich = status_details(full.value)
        assert rich is not None and rich.reason == "QUEUE_FULL" and rich.metadata == {"max_queued_jobs": "1"}
        assert rich.retry_after == 10.0
        assert rich.kinds == ["google.rpc.RetryInfo", "google.rpc.ErrorInfo"]

        for name, state in (("a", "learned"), ("b", "learning")):
            with pytest.raises(grpc.RpcError) as taken:
                stub.Learn(iter([learn_header(task=name), learn_chunk(X4, Y4)]), timeout=30)
            assert taken.value.code() == EXISTS, taken.value.details()
            rich = status_details(taken.value)
            assert rich is not None and rich.reason == "TASK_EXISTS" and rich.retry_after is None
            assert rich.metadata == {"task": name, "state": state}
        release.set()
        assert client.wait(forgetting.id).state == pb.SUCCEEDED


# --------------------------------------------------------------------------- coverage of the contract
REQUEST_MESSAGES = (
    "LearnRequest",
    "LearnHeader",
    "SampleChunk",
    "Tensor",
    "UnlearnRequest",
    "CommitRequest",
    "PredictRequest",
    "GetJobRequest",
    "ListJobsRequest",
    "GetTaskRequest",
    "ListTasksRequest",
    "ListAuditEventsRequest",
    "GetModelRequest",
    "ListEvaluationsRequest",
    "LocateSamplesRequest",
)


def test_every_field_of_every_request_message_is_attacked() -> None:
    fields = {f"{name}.{f.name}" for name in REQUEST_MESSAGES for f in pb.DESCRIPTOR.message_types_by_name[name].fields}
    covered = {c for case in [*CASES, *ACCEPTED] for c in case.covers}
    assert fields - covered == set()
    assert covered - fields == set()
    assert len(CASES) >= 30


# --------------------------------------------------------------------------- authentication and scopes
TOKENS = {"root": "admin", "viewer": "predict", "trainer": "learn"}


@dataclass
class AuthEnv:
    running: Running
    stub: pb_grpc.LetheStub
    data_dir: Path
    known_job: str

    def snapshot(self) -> Snapshot:
        assert self.running.app.engine is not None
        return snapshot(self.running.client, self.data_dir, self.running.app.engine)


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEnv]:
    from server.rpc.auth import hash_token

    tmp = tmp_path_factory.mktemp("bad-auth")
    tokens = [f"{name}:{hash_token(name + '-token')}:{scope}" for name, scope in TOKENS.items()]
    config = make_config(
        tmp / "data",
        f"sqlite:///{tmp / 'lethe.db'}",
        # Every refusal audited (the default audits 10 a minute; test_edge covers the rate limit).
        **{**LIMITS, "auth.enabled": True, "auth.tokens": tokens, "audit.denied_per_minute": 1000},
    )
    with running_app(config, token="root-token") as running:
        client = running.client
        known = client.wait(client.learn("known", X[:80], Y[:80]).id)
        x23, y23 = digits([2, 3])
        client.wait(client.learn("forgotten", x23[:80], y23[:80]).id)
        client.wait(client.unlearn("forgotten").id)
        with grpc.insecure_channel(running.target) as channel:
            yield AuthEnv(running, pb_grpc.LetheStub(channel), tmp / "data", known.id)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


AUTH_CASES: list[tuple[str, str | None, grpc.StatusCode, str, Callable[[AuthEnv, Any], Any], bool]] = [
    # id, token, code, fragment, call(env, metadata), refused by the interceptor (audited as auth.denied)
    (
        "learn-no-token",
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: Bearer",
        lambda env, md: env.stub.Learn(iter([learn_header(), learn_chunk(X4, Y4)]), metadata=md, timeout=30),
        True,
    ),
    (
        "learn-wrong-token",
        "guess",
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid token",
        lambda env, md: env.stub.Learn(iter([learn_header(), learn_chunk(X4, Y4)]), metadata=md, timeout=30),
        True,
    ),
    (
        "learn-basic-scheme",
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: Bearer",
        lambda env, md: env.stub.Learn(
            iter([learn_header()]), metadata=(("authorization", "Basic root-token"),), timeout=30
        ),
        True,
    ),
    (
        "learn-with-predict-scope",
        "viewer-token",
        grpc.StatusCode.PERMISSION_DENIED,
        "Learn needs the 'learn' scope",
        lambda env, md: env.stub.Learn(iter([learn_header(), learn_chunk(X4, Y4)]), metadata=md, timeout=30),
        True,
    ),
    (
        "unlearn-with-learn-scope",
        "trainer-token",
        grpc.StatusCode.PERMISSION_DENIED,
        "Unlearn needs the 'unlearn' scope",
        lambda env, md: env.stub.Unlearn(pb.UnlearnRequest(task="known"), metadata=md, timeout=30),
        True,
    ),
    (
        "cancel-with-predict-scope",
        "viewer-token",
        grpc.StatusCode.PERMISSION_DENIED,
        "CancelJob needs the 'learn' scope",
        lambda env, md: env.stub.CancelJob(pb.GetJobRequest(id=env.known_job), metadata=md, timeout=30),
        True,
    ),
    (
        "audit-with-learn-scope",
        "trainer-token",
        grpc.StatusCode.PERMISSION_DENIED,
        "ListAuditEvents needs the 'admin' scope",
        lambda env, md: env.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=md, timeout=30),
        True,
    ),
    (
        "allow-unlearned-without-admin",
        "viewer-token",
        grpc.StatusCode.PERMISSION_DENIED,
        "allow_unlearned needs the 'admin' scope",
        lambda env, md: env.stub.Predict(
            pb.PredictRequest(task="forgotten", inputs=to_tensor(X4), allow_unlearned=True), metadata=md, timeout=30
        ),
        False,
    ),
    (
        "get-job-no-token",
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: Bearer",
        lambda env, md: env.stub.GetJob(pb.GetJobRequest(id=env.known_job), metadata=md, timeout=30),
        True,
    ),
    (
        "watch-job-no-token",
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: Bearer",
        lambda env, md: list(env.stub.WatchJob(pb.GetJobRequest(id=env.known_job), metadata=md, timeout=30)),
        True,
    ),
    (
        "predict-stream-no-token",
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: Bearer",
        lambda env, md: list(
            env.stub.PredictStream(
                iter([pb.PredictRequest(task="known", inputs=to_tensor(X4))]), metadata=md, timeout=30
            )
        ),
        True,
    ),
]


@pytest.mark.parametrize(
    ("case_id", "token", "code", "fragment", "call", "audited"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES]
)
def test_refused_without_a_token_or_scope_and_only_audited(
    auth_env: AuthEnv,
    case_id: str,
    token: str | None,
    code: grpc.StatusCode,
    fragment: str,
    call: Callable[[AuthEnv, Any], Any],
    audited: bool,
) -> None:
    before = auth_env.snapshot()
    with pytest.raises(grpc.RpcError) as refused:
        call(auth_env, bearer(token))
    assert refused.value.code() == code, refused.value.details()
    assert fragment in (refused.value.details() or "")
    after = auth_env.snapshot()
    deadline = time.monotonic() + 10
    expected = before.audit_events + int(audited)
    while (after.audit_events < expected or after.leftovers) and time.monotonic() < deadline:
        # A refusal's audit row is written off the event loop, and the audit head file (written
        # through a .tmp file) right after its commit.
        time.sleep(0.05)
        after = auth_env.snapshot()
    assert after.audit_events == before.audit_events + int(audited)
    if audited:
        assert auth_env.running.client.audit_events()[-1].action == "auth.denied"
    assert {**after.__dict__, "audit_events": 0} == {**before.__dict__, "audit_events": 0}
    prediction = auth_env.running.client.predict("known", X4)  # the admin client still works
    assert set(prediction.classes) <= {0, 1}


# --------------------------------------------------------------------------- data that is valid but absurd
def test_a_learn_of_huge_finite_values_does_not_corrupt_other_tasks(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **{"training.epochs": 2})
    with running_app(config) as running:
        client = running.client
        client.wait(client.learn("known", X, Y).id)
        before = client.predict("known", X[:16]).outputs[:, :2]
        huge = np.full((50, 1, 8, 8), 3e38, dtype=np.float32)
        job = client.wait(client.learn("huge", huge, Y[:50]).id, check=False)
        after = client.predict("known", X[:16]).outputs[:, :2]
        assert np.isfinite(after).all(), f"job {pb.JobState.Name(job.state)}: the model now predicts NaN"
        assert job.state == pb.FAILED or np.allclose(before, after)
