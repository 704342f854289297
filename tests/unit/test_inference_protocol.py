"""The Open Inference Protocol (KServe v2 gRPC) servicer: conversions and every refusal.

A real ``grpc.aio`` server (on its own event loop thread, port 0) serves
:class:`~server.rpc.inference.InferenceServicer` over a real :class:`PredictService`, dynamic
:class:`Batcher` and :class:`ServingState`, publishing real strategies trained on sklearn's digits
(``finetune``, task-incremental; ``lure``, class-incremental; a narrow mlp, a few epochs, seed 0).
Clients are ``tritonclient.grpc`` (what KServe users call it with) and a plain gRPC channel carrying
the server's own messages, for what tritonclient cannot send (typed contents, malformed requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from protos import inference as oip
from server.engine.protocol import LearnOptions, Strategy, TaskData, no_progress
from server.jobs import ServingState
from server.rpc.batching import Batcher
from server.rpc.guard import CallGuard
from server.rpc.inference import InferenceServicer
from server.rpc.predicting import PredictService
from server.rpc.validation import SampleLimits
from server.storage import TaskState
from server.telemetry import Telemetry
from tests.jobs.harness import small_strategy
from tests.support import digits

LIMITS = SampleLimits(input_shape=(1, 8, 8), num_classes=10)
MAX_ROWS = 100
LEARNED, SECOND, UNLEARNED, LEARNING = "pairs-01", "pairs-45", "pairs-23", "pairs-67"
SERVER_VERSION = "9.9.9"


@dataclass
class Served:
    """An aio server on its own loop thread, what it serves from, and a channel to it."""

    strategy: Strategy
    serving: ServingState
    port: int
    channel: grpc.Channel
    ready: list[bool] = field(default_factory=lambda: [True])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def version(self) -> str:
        return str(self.strategy.version)

    def call(self, method: str, request: Any) -> Any:
        """One unary call carrying the server's own messages (not tritonclient's)."""
        _, response = oip.METHODS[method]
        stub = self.channel.unary_unary(
            f"/{oip.SERVICE_NAME}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,
        )
        return stub(request, timeout=30)

    def logits(self, task: str | None, inputs: np.ndarray) -> np.ndarray:
        """What the published model answers in process."""
        predictor = self.serving.answering().predictor
        assert predictor is not None
        return predictor.predict(task, torch.from_numpy(np.array(inputs, dtype=np.float32))).numpy()


def _learn(strategy: Strategy, task: str, classes: list[int]) -> None:
    x, y = digits(classes)
    options = LearnOptions(epochs=3, batch_size=32, seed=0).resolved(strategy.learn_defaults)
    strategy.learn(task, TaskData(torch.from_numpy(x), torch.from_numpy(y)), options, no_progress, {})


@contextlib.contextmanager
def _serve(strategy: Strategy, serving: ServingState) -> Iterator[Served]:
    """Serve ``strategy``'s published model through the OIP servicer on an aio server at port 0."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="oip-test-loop", daemon=True)
    thread.start()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oip-test-predict")
    ready = [True]
    predictions = PredictService(
        serving,
        task_incremental=strategy.task_incremental,
        strategy=strategy.name,
        samples=LIMITS,
        max_rows=MAX_ROWS,
        batcher=Batcher(executor, max_batch_size=64, max_batch_delay_ms=2),
        ready=lambda: ready[0],
    )
    guard = CallGuard(Telemetry(CollectorRegistry(), max_task_series=10))
    servicer = InferenceServicer(predictions, guard, server_version=SERVER_VERSION)

    async def start() -> tuple[aio.Server, int]:
        server = aio.server()
        server.add_generic_rpc_handlers((servicer.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(strategy, serving, port, channel, ready)
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        executor.shutdown()


@pytest.fixture(scope="module")
def task_server() -> Iterator[Served]:
    """``finetune`` (task-incremental): pairs-01 and pairs-45 learned, pairs-23 learned then unlearned
    (its head deleted), pairs-67 still being learned."""
    strategy = small_strategy("finetune")()
    for task, classes in ((LEARNED, [0, 1]), (UNLEARNED, [2, 3]), (SECOND, [4, 5])):
        _learn(strategy, task, classes)
    strategy.unlearn(UNLEARNED, strategy.unlearn_methods[0], no_progress, {})
    serving = ServingState()
    serving.publish(strategy.predictor())
    serving.load_tasks(
        {
            LEARNED: TaskState.LEARNED,
            SECOND: TaskState.LEARNED,
            UNLEARNED: TaskState.UNLEARNED,
            LEARNING: TaskState.LEARNING,
        }
    )
    with _serve(strategy, serving) as served:
        yield served


@pytest.fixture(scope="module")
def class_server() -> Iterator[Served]:
    """``lure`` (class-incremental, one model named ``lethe``): one mega-batch of digits 0-3 learned."""
    strategy = small_strategy("lure")()
    _learn(strategy, "mb0", [0, 1, 2, 3])
    serving = ServingState()
    serving.publish(strategy.predictor())
    serving.load_tasks({"mb0": TaskState.LEARNED})
    with _serve(strategy, serving) as served:
        yield served


@pytest.fixture
def client(task_server: Served) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(task_server.target) as connected:
        yield connected


def _rows(classes: list[int], count: int) -> np.ndarray:
    inputs, _ = digits(classes)
    return np.ascontiguousarray(inputs[:count])


def _infer_input(rows: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    data = rows if datatype == "FP32" else rows.astype(np.uint8)
    return triton.InferInput("input", list(rows.shape), datatype).set_data_from_numpy(data)


# --------------------------------------------------------------------------- server and models
def test_server_live_ready_and_metadata(task_server: Served, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert (metadata.name, metadata.version, list(metadata.extensions)) == ("lethe", SERVER_VERSION, [])
    task_server.ready[0] = False
    try:
        assert client.is_server_live()
        assert not client.is_server_ready()
    finally:
        task_server.ready[0] = True


def test_model_metadata_describes_tensors_and_the_current_version(
    task_server: Served, client: triton.InferenceServerClient
) -> None:
    metadata = client.get_model_metadata(LEARNED)
    assert metadata.name == LEARNED
    assert list(metadata.versions) == [task_server.version]
    assert metadata.platform == "pytorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 10]),
        ("classes", "INT64", [-1]),
    ]
    assert client.get_model_metadata(LEARNED, task_server.version).name == LEARNED


def test_model_metadata_refusals(client: triton.InferenceServerClient, task_server: Served) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert f"'{LEARNED}'" in unknown.value.message() and f"'{SECOND}'" in unknown.value.message()
    assert f"'{UNLEARNED}'" not in unknown.value.message()  # only models that answer are named
    with pytest.raises(InferenceServerException) as stale:
        client.get_model_metadata(LEARNED, "0")
    assert stale.value.status() == "StatusCode.NOT_FOUND"
    assert f"only the current version ({task_server.version})" in stale.value.message()
    with pytest.raises(InferenceServerException) as unlearned:
        client.get_model_metadata(UNLEARNED)
    assert unlearned.value.status() == "StatusCode.FAILED_PRECONDITION"


def test_model_ready(task_server: Served, client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(LEARNED)
    assert client.is_model_ready(LEARNED, task_server.version)
    # As Triton: a model that does not answer (yet, or any more) is not ready, without an error.
    assert not client.is_model_ready(LEARNED, str(int(task_server.version) + 1))
    assert not client.is_model_ready(UNLEARNED)
    assert not client.is_model_ready(LEARNING)
    assert not client.is_model_ready("nope")
    task_server.serving.hold("job-1", [LEARNED])  # an accepted unlearn of its samples
    try:
        assert not client.is_model_ready(LEARNED)
        assert client.is_model_ready(SECOND)
    finally:
        task_server.serving.release("job-1")
    with pytest.raises(InferenceServerException) as malformed:
        client.is_model_ready(LEARNED, "latest")
    assert malformed.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert malformed.value.message().startswith("version: ")


# --------------------------------------------------------------------------- ModelInfer
def test_infer_fp32_raw_matches_the_model(task_server: Served, client: triton.InferenceServerClient) -> None:
    rows = _rows([0, 1], 20)
    result = client.infer(LEARNED, [_infer_input(rows)], request_id="req-7")
    logits, classes = result.as_numpy("logits"), result.as_numpy("classes")
    expected = task_server.logits(LEARNED, rows)
    assert logits.dtype == np.float32 and logits.shape == (20, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)  # -inf where the task never saw a class
    assert classes.dtype == np.int64
    np.testing.assert_array_equal(classes, expected.argmax(axis=1))
    assert set(classes) == {0, 1}
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7", LEARNED, task_server.version)
    assert not response.outputs[0].contents.fp32_contents  # raw in, raw out
    # The same answer when the current version is named.
    pinned = client.infer(LEARNED, [_infer_input(rows)], model_version=task_server.version)
    np.testing.assert_array_equal(pinned.as_numpy("classes"), classes)


def test_infer_uint8_is_scaled_as_predict_does(task_server: Served, client: triton.InferenceServerClient) -> None:
    rows = np.round(_rows([4, 5], 12) * 255)
    result = client.infer(SECOND, [_infer_input(rows, "UINT8")])
    expected = task_server.logits(SECOND, rows.astype(np.uint8).astype(np.float32) / 255)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("classes"), expected.argmax(axis=1))


def test_infer_answers_only_the_requested_outputs_in_order(client: triton.InferenceServerClient) -> None:
    rows = _rows([0, 1], 5)
    only = client.infer(LEARNED, [_infer_input(rows)], outputs=[triton.InferRequestedOutput("classes")])
    assert [o.name for o in only.get_response().outputs] == ["classes"]
    assert only.as_numpy("logits") is None and only.as_numpy("classes").shape == (5,)
    both = client.infer(
        LEARNED,
        [_infer_input(rows)],
        outputs=[triton.InferRequestedOutput("classes"), triton.InferRequestedOutput("logits")],
    )
    assert [o.name for o in both.get_response().outputs] == ["classes", "logits"]
    np.testing.assert_array_equal(both.as_numpy("classes"), only.as_numpy("classes"))
    np.testing.assert_array_equal(both.as_numpy("logits").argmax(axis=1), only.as_numpy("classes"))


def _typed_request(rows: np.ndarray, datatype: str = "FP32") -> Any:
    request = oip.ModelInferRequest(model_name=LEARNED, id="typed")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(rows.shape))
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    else:
        tensor.contents.uint_contents.extend(rows.astype(np.uint8).ravel().tolist())
    return request


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_infer_typed_contents_are_answered_in_typed_contents(task_server: Served, datatype: str) -> None:
    rows = _rows([0, 1], 6)
    if datatype == "UINT8":
        rows = np.round(rows * 255)
    response = task_server.call("ModelInfer", _typed_request(rows, datatype))
    assert not response.raw_output_contents
    logits, classes = response.outputs
    assert (logits.name, logits.datatype, list(logits.shape)) == ("logits", "FP32", [6, 10])
    assert (classes.name, classes.datatype, list(classes.shape)) == ("classes", "INT64", [6])
    scaled = rows if datatype == "FP32" else rows.astype(np.uint8).astype(np.float32) / 255
    expected = task_server.logits(LEARNED, scaled)
    got = np.array(logits.contents.fp32_contents, dtype=np.float32).reshape(6, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert list(classes.contents.int64_contents) == expected.argmax(axis=1).tolist()
    assert (response.id, response.model_version) == ("typed", task_server.version)


def test_concurrent_requests_share_batches_and_keep_their_rows(
    task_server: Served, client: triton.InferenceServerClient
) -> None:
    inputs = _rows([0, 1], 64)
    chunks = [inputs[i : i + 8] for i in range(0, 64, 8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda rows: client.infer(LEARNED, [_infer_input(rows)]), chunks))
    expected = task_server.logits(LEARNED, inputs).argmax(axis=1)
    np.testing.assert_array_equal(np.concatenate([r.as_numpy("classes") for r in results]), expected)


def test_class_incremental_model_is_named_lethe(class_server: Served) -> None:
    rows = _rows([0, 1, 2, 3], 40)
    with triton.InferenceServerClient(class_server.target) as client:
        assert client.is_model_ready("lethe")
        assert not client.is_model_ready("mb0")
        assert list(client.get_model_metadata("lethe").versions) == [class_server.version]
        result = client.infer("lethe", [_infer_input(rows)])
        expected = class_server.logits(None, rows)
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("classes"), expected.argmax(axis=1))
        assert result.get_response().model_name == "lethe"
        for name in ("mb0", "other"):
            with pytest.raises(InferenceServerException) as unknown:
                client.infer(name, [_infer_input(rows)])
            assert unknown.value.status() == "StatusCode.NOT_FOUND"
            assert "one model, 'lethe'" in unknown.value.message()


# --------------------------------------------------------------------------- refusals
def _raw_request(rows: np.ndarray | None = None) -> Any:
    rows = _rows([0, 1], 3) if rows is None else rows
    request = oip.ModelInferRequest(model_name=LEARNED)
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


def _set(**fields: Any) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        for name, value in fields.items():
            setattr(request, name, value)

    return apply


def _input(**fields: Any) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        tensor = request.inputs[0]
        for name, value in fields.items():
            if name == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, name, value)

    return apply


def _raw(*entries: bytes) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(entries)

    return apply


def _typed(field: str, values: list[Any], *, keep_raw: bool = False) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        if not keep_raw:
            del request.raw_input_contents[:]
        getattr(request.inputs[0].contents, field).extend(values)

    return apply


def _outputs(*names: str, parameter: str | None = None) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        for name in names:
            output = request.outputs.add(name=name)
            if parameter is not None:
                output.parameters[parameter].int64_param = 3

    return apply


def _parameter(name: str, on_input: bool = False) -> Callable[[Any], None]:
    def apply(request: Any) -> None:
        target = request.inputs[0] if on_input else request
        target.parameters[name].string_param = "x"

    return apply


def _second_input(request: Any) -> None:
    request.inputs.add(name="input2", datatype="FP32", shape=[3, 1, 8, 8])


def _no_inputs(request: Any) -> None:
    del request.inputs[:]


THREE_FLOATS = 3 * 64
NAN_ROW = np.full((1, 1, 8, 8), np.nan, dtype="<f4").tobytes()

#: (mutation of a valid raw FP32 request for 3 rows, status code, field named first in the message)
REFUSALS: dict[str, tuple[Callable[[Any], None], grpc.StatusCode, str]] = {
    "no inputs": (_no_inputs, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    "two inputs": (_second_input, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    "input name": (_input(name="x"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name"),
    "datatype FP64": (_input(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype"),
    "datatype lowercase": (_input(datatype="fp32"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype"),
    "flat shape": (_input(shape=[3, 64]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    "wrong image shape": (_input(shape=[3, 1, 4, 16]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    "zero rows": (_input(shape=[0, 1, 8, 8]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    "negative rows": (_input(shape=[-1, 1, 8, 8]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    "too many rows": (_input(shape=[MAX_ROWS + 1, 1, 8, 8]), grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs[0].shape"),
    "raw too short": (_raw(b"\0" * (THREE_FLOATS * 4 - 4)), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
    "raw NaN": (_raw(NAN_ROW * 3), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
    "two raw entries": (_raw(NAN_ROW, NAN_ROW), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    "no data": (_raw(), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].contents"),
    "raw and typed": (
        _typed("fp32_contents", [0.0] * THREE_FLOATS, keep_raw=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents",
    ),
    "typed count": (
        _typed("fp32_contents", [0.0] * (THREE_FLOATS - 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.fp32_contents",
    ),
    "typed infinity": (
        _typed("fp32_contents", [float("inf")] * THREE_FLOATS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.fp32_contents",
    ),
    "typed in the wrong field": (
        _typed("int_contents", [0] * THREE_FLOATS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.int_contents",
    ),
    "uint8 above 255": (
        lambda r: (_input(datatype="UINT8")(r), _typed("uint_contents", [256] * THREE_FLOATS)(r)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.uint_contents",
    ),
    "unknown output": (_outputs("logits", "probabilities"), grpc.StatusCode.INVALID_ARGUMENT, "outputs[1].name"),
    "output twice": (_outputs("classes", "classes"), grpc.StatusCode.INVALID_ARGUMENT, "outputs[1].name"),
    "classification": (
        _outputs("logits", parameter="classification"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outputs[0].parameters.classification",
    ),
    "input shared memory": (
        _parameter("shared_memory_region", on_input=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].parameters.shared_memory_region",
    ),
    "sequence": (_parameter("sequence_id"), grpc.StatusCode.INVALID_ARGUMENT, "parameters.sequence_id"),
    "version not a number": (_set(model_version="latest"), grpc.StatusCode.INVALID_ARGUMENT, "model_version"),
    "no model name": (_set(model_name=""), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
}


def _violations(error: grpc.RpcError) -> list[str]:
    """Fields of the ``google.rpc.BadRequest`` details, when the edge sends them."""
    status = rpc_status.from_call(error)
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


@pytest.mark.parametrize("case", list(REFUSALS))
def test_infer_refusals_name_the_field(task_server: Served, case: str) -> None:
    mutate, code, field_path = REFUSALS[case]
    request = _raw_request()
    mutate(request)
    with pytest.raises(grpc.RpcError) as refused:
        task_server.call("ModelInfer", request)
    error = refused.value
    assert error.code() == code, error.details()
    assert error.details().startswith(f"{field_path}: "), error.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert _violations(error) in ([], [field_path])  # BadRequest details once the edge sends them


def test_infer_refusals_of_models_and_versions(task_server: Served, client: triton.InferenceServerClient) -> None:
    rows = _rows([0, 1], 2)
    expected = {
        ("nope", ""): ("NOT_FOUND", f"model 'nope' does not exist (models: '{LEARNED}', '{SECOND}')"),
        (LEARNED, "0"): ("NOT_FOUND", f"only the current version ({task_server.version}) is"),
        (LEARNED, "99"): ("NOT_FOUND", "is not served"),
        (UNLEARNED, ""): ("FAILED_PRECONDITION", "the task is unlearned"),
        (LEARNING, ""): ("FAILED_PRECONDITION", "still being learned"),
    }
    for (model, version), (code, text) in expected.items():
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [_infer_input(rows)], model_version=version)
        assert refused.value.status() == f"StatusCode.{code}", (model, version)
        assert text in refused.value.message(), refused.value.message()
        if model == UNLEARNED:  # this protocol has no allow_unlearned: the message does not offer it
            assert "allow_unlearned" not in refused.value.message()


def test_infer_refuses_a_task_being_forgotten(task_server: Served, client: triton.InferenceServerClient) -> None:
    rows = _rows([0, 1], 2)
    task_server.serving.hold("job-2", [LEARNED])
    try:
        with pytest.raises(InferenceServerException) as held:
            client.infer(LEARNED, [_infer_input(rows)])
        assert held.value.status() == "StatusCode.UNAVAILABLE"
        assert "job-2" in held.value.message()
        client.infer(SECOND, [_infer_input(rows)])  # other tasks still answer
    finally:
        task_server.serving.release("job-2")
    client.infer(LEARNED, [_infer_input(rows)])
