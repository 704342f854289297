"""Export of the served network (``network`` verb + ``server.export``), on real training with sklearn digits.

UnCLE (task-incremental) learns two tasks with five classes each, so its logits carry ``-inf`` at
the other five; LURE (class-incremental) learns two mega-batches. Each task's network is exported
in every format and loaded as a user would: ONNX with onnxruntime, TorchScript with
``torch.jit.load``, safetensors into a freshly built module of the same architecture. The loaded
network must answer what ``predict`` answers on held-out digits.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load as load_safetensors
from sklearn.datasets import load_digits
from torch import nn

from protos import lethe_pb2 as pb
from server.engine.backbones import build_backbone
from server.engine.lure import build_lure
from server.engine.networks import MaskedLogits
from server.engine.protocol import LearnOptions, Predictor, TaskData, UnlearnedTaskError, no_progress
from server.engine.uncle import build_uncle
from server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.export import FORMATS, export_network, format_of

CPU = torch.device("cpu")
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
#: TorchScript is deprecated upstream; loading it is what this file tests.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@dataclass(frozen=True)
class Digits:
    train: TaskData
    test: TaskData


@functools.cache
def digits() -> Digits:
    """sklearn digits in [0, 1], ``[n, 1, 8, 8]``, a fixed 75/25 train/held-out split."""
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
    targets = torch.tensor(labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(targets)))
    train, test = order[: int(0.75 * len(order))], order[int(0.75 * len(order)) :]
    return Digits(TaskData(inputs[train], targets[train]), TaskData(inputs[test], targets[test]))


def classes_of(data: TaskData, classes: tuple[int, ...]) -> TaskData:
    keep = torch.isin(data.labels, torch.tensor(classes))
    return TaskData(data.inputs[keep], data.labels[keep])


@dataclass(frozen=True)
class Served:
    """A snapshot to export, what it serves, and the held-out digits of each task (None: class-incremental)."""

    strategy: str
    predictor: Predictor
    tests: dict[str | None, TaskData]
    after_unlearn: Predictor | None = None


@pytest.fixture(scope="module")
def uncle() -> Served:
    strategy = build_uncle(
        backbone="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=0, burn_in=20
    )
    options = LearnOptions(epochs=5, batch_size=32, learning_rate=1e-3, seed=1)
    data = digits()
    for task, classes in (("low", LOW), ("high", HIGH)):
        strategy.learn(task, classes_of(data.train, classes), options, no_progress, {})
    served = strategy.predictor()
    strategy.unlearn("high", "noise-align", no_progress, {})
    tests: dict[str | None, TaskData] = {"low": classes_of(data.test, LOW), "high": classes_of(data.test, HIGH)}
    return Served("uncle", served, tests, after_unlearn=strategy.predictor())


@pytest.fixture(scope="module")
def lure() -> Served:
    strategy = build_lure(backbone="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, device=CPU, seed=0)
    options = LearnOptions(epochs=8, batch_size=64, seed=1).resolved(strategy.learn_defaults)
    data = digits()
    halves = torch.arange(len(data.train)) % 2 == 0
    replay: dict[str, TaskData] = {}
    for task, keep in (("mb0", halves), ("mb1", ~halves)):
        part = TaskData(data.train.inputs[keep], data.train.labels[keep])
        report = strategy.learn(task, part, options, no_progress, replay)
        if report.retain is not None:
            replay[task] = report.retain
    return Served("lure", strategy.predictor(), {None: data.test})


def _onnx(data: bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    metadata = {prop.key: prop.value for prop in onnx.load_from_string(data).metadata_props}
    return lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]), metadata


def _torchscript(data: bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    extra = {"lethe.json": ""}
    module = torch.jit.load(io.BytesIO(data), _extra_files=extra)
    return module, json.loads(extra["lethe.json"])


def _safetensors(data: bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    state = load_safetensors(data)
    header_size = struct.unpack("<Q", data[:8])[0]
    metadata: dict[str, str] = json.loads(data[8 : 8 + header_size])["__metadata__"]
    assert metadata["backbone"] == "mlp"
    # A fresh module of the architecture the metadata names, initialized differently: only the file's
    # tensors can make it answer like the served network.
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        fresh: nn.Module = build_backbone("mlp", INPUT_SHAPE, NUM_CLASSES)
    if "seen_classes" in state:
        fresh = MaskedLogits(fresh, torch.zeros(NUM_CLASSES, dtype=torch.bool))
    fresh.load_state_dict(state)  # strict: every tensor of the file, and nothing missing
    return fresh.eval().requires_grad_(False), metadata


LOADERS = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}


def _check_same_answers(served: Served, fmt: str) -> None:
    for task, test in served.tests.items():
        expected = served.predictor.predict(task, test.inputs)
        held_out = 100.0 * (expected.argmax(dim=1) == test.labels).float().mean().item()
        assert held_out >= 90.0, f"{served.strategy} {task}: {held_out:.1f}% on held-out digits; nothing to compare"
        exported = export_network(
            served.predictor, task=task, fmt=fmt, input_shape=INPUT_SHAPE, strategy=served.strategy, backbone="mlp"
        )
        assert exported.sha256 == hashlib.sha256(exported.data).hexdigest()
        forward, metadata = LOADERS[fmt](exported.data)
        assert metadata["strategy"] == served.strategy and metadata["task"] == (task or "")
        assert metadata["model_version"] == str(served.predictor.version) and metadata["input_shape"] == "1,8,8"
        with torch.no_grad():
            got = forward(test.inputs)
            single = forward(test.inputs[:1])  # the batch dimension is free
        assert got.shape == expected.shape and single.shape == (1, NUM_CLASSES)
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1)), f"{fmt} {task}: classes differ from predict"
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(got), finite), f"{fmt} {task}: -inf at other places than predict's"
        assert torch.equal(got[~finite], expected[~finite])  # -inf stays -inf
        torch.testing.assert_close(got[finite], expected[finite], atol=1e-4, rtol=0)
        torch.testing.assert_close(single, expected[:1], atol=1e-4, rtol=0)
        if task is not None:
            assert int(finite[0].sum()) == 5  # five classes seen, five masked


@pytest.mark.parametrize("fmt", FORMATS)
def test_uncle_exports_answer_as_predict(uncle: Served, fmt: str) -> None:
    _check_same_answers(uncle, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lure_exports_answer_as_predict(lure: Served, fmt: str) -> None:
    _check_same_answers(lure, fmt)


def test_uncle_network_is_a_plain_backbone_with_the_generated_weights(uncle: Served) -> None:
    network = uncle.predictor.network("low")  # type: ignore[attr-defined]
    assert isinstance(network, MaskedLogits) and type(network.backbone).__name__ == "MLP"
    assert not network.training and all(not p.requires_grad for p in network.parameters())
    assert {t.device.type for t in network.state_dict().values()} == {"cpu"}
    generated = uncle.predictor.parameters_for("low")  # type: ignore[attr-defined]
    for name, tensor in network.backbone.named_parameters():
        assert torch.equal(tensor, generated[name]) and tensor.data_ptr() != generated[name].data_ptr()


def test_unlearned_task_is_refused(uncle: Served) -> None:
    after = uncle.after_unlearn
    assert after is not None
    with pytest.raises(UnlearnedTaskError):
        after.network("high")  # type: ignore[attr-defined]
    with pytest.raises(FailedPreconditionError, match="unlearned"):
        export_network(after, task="high", fmt="onnx", input_shape=INPUT_SHAPE, strategy="uncle", backbone="mlp")
    # The other task still exports from the same snapshot.
    exported = export_network(
        after, task="low", fmt="safetensors", input_shape=INPUT_SHAPE, strategy="uncle", backbone="mlp"
    )
    assert exported.model_version == after.version > uncle.predictor.version


def test_bad_requests_are_refused_with_the_field(uncle: Served, lure: Served) -> None:
    def export(predictor: Predictor, task: str | None, fmt: str = "onnx") -> None:
        export_network(predictor, task=task, fmt=fmt, input_shape=INPUT_SHAPE, strategy="x", backbone="mlp")

    for fmt in ("", "pickle", "ONNX"):
        with pytest.raises(InvalidArgumentError) as error:
            export(uncle.predictor, "low", fmt)
        assert error.value.field == "format"
    for value in (pb.EXPORT_FORMAT_UNSPECIFIED, 99):
        with pytest.raises(InvalidArgumentError) as error:
            format_of(value)
        assert error.value.field == "format"
    assert [format_of(v) for v in (pb.ONNX, pb.TORCHSCRIPT, pb.SAFETENSORS)] == list(FORMATS)
    with pytest.raises(InvalidArgumentError) as error:
        export(uncle.predictor, None)  # task-incremental: the task is required
    assert error.value.field == "task"
    with pytest.raises(InvalidArgumentError) as error:
        export(lure.predictor, "mb0")  # class-incremental: no task
    assert error.value.field == "task"
    with pytest.raises(NotFoundError):
        export(uncle.predictor, "never-learned")


class PredictOnly:
    """A predictor without the optional ``network`` verb."""

    version = 3

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        return torch.zeros(len(inputs), NUM_CLASSES)


def test_a_predictor_without_network_cannot_export() -> None:
    with pytest.raises(FailedPreconditionError, match="cannot export"):
        export_network(PredictOnly(), task=None, fmt="onnx", input_shape=INPUT_SHAPE, strategy="x", backbone="mlp")


def test_stream_carries_facts_first_then_chunks_and_the_digest_last(lure: Served) -> None:
    exported = export_network(
        lure.predictor, task=None, fmt="torchscript", input_shape=INPUT_SHAPE, strategy="lure", backbone="mlp"
    )
    messages = list(exported.chunks(64 * 1024))
    first, data = messages[0], [m.data for m in messages[1:]]
    assert not first.data and first.model_version == lure.predictor.version and list(first.input_shape) == [1, 8, 8]
    assert len(data) == -(-first.total_bytes // (64 * 1024)) >= 2 and all(len(d) == 64 * 1024 for d in data[:-1])
    whole = b"".join(data)
    assert len(whole) == first.total_bytes and messages[-1].sha256 == hashlib.sha256(whole).hexdigest()
    assert not any(m.sha256 for m in messages[:-1])
    torch.jit.load(io.BytesIO(whole))  # the pieces make the file
