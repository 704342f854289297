"""Export: the network Predict serves for a task, as a file (DESIGN.md section 9, ``lethe export``).

Formats: ONNX (for onnxruntime, Triton, any ONNX runtime), TorchScript (``torch.jit.load``) and
safetensors (the state dict only: loading it needs the architecture). Every file says what it is:
strategy, backbone, task, model version and input shape travel in the ONNX model's metadata, in a
``lethe.json`` extra file of the TorchScript archive, and in the safetensors header.

The network's logits equal Predict's, ``-inf`` at the classes a task never saw included (IEEE
infinity is an ordinary float32 value in all three formats; onnxruntime keeps it, argmax skips it,
softmax makes it 0).

onnx, onnxscript and safetensors are imported inside the functions that need them: a server that
never exports never pays their import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from protos import lethe_pb2 as pb
from server.engine.protocol import Predictor, UnknownTaskError, UnlearnedTaskError
from server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

#: Formats :func:`export_bytes` writes, as ``ExportFormat`` names in lower case.
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
#: Bytes of the file per ``ExportChunk`` (well under the 16 MiB message limit).
CHUNK_BYTES = 1 << 20
#: Example batch size the exporters trace with; the batch dimension stays dynamic (0 and 1 are specialized by
#: torch.export, so the example must be larger).
_EXAMPLE_BATCH = 2

# torch.export keeps tracing state (fake-tensor modes, symbolic shapes) process-wide: two exports at once on two
# RPC threads fail and can leave a fake mode behind that breaks later tracing in the process (seen on torch 2.15).
# Ordinary forward and backward passes on other threads (Predict, the training worker) are unaffected.
_EXPORTING = threading.Lock()


def format_of(value: int) -> str:
    """The :data:`FORMATS` name of an ``ExportFormat`` value.

    Raises:
        InvalidArgumentError: for ``EXPORT_FORMAT_UNSPECIFIED`` or a value this server does not know.
    """
    known = value in pb.ExportFormat.values()
    if known and value != pb.EXPORT_FORMAT_UNSPECIFIED:
        return _checked_format(pb.ExportFormat.Name(value).lower())
    return _checked_format(pb.ExportFormat.Name(value) if known else str(value))


def export_bytes(module: nn.Module, input_shape: tuple[int, ...], fmt: str, metadata: Mapping[str, str]) -> bytes:
    """Serialize ``module`` (CPU, float32, eval mode) in format ``fmt``.

    Args:
        module: maps float32 ``[n, *input_shape]`` to logits ``[n, num_classes]``; not modified.
        input_shape: shape of one sample; the batch dimension of the file is dynamic.
        fmt: one of :data:`FORMATS`.
        metadata: written into the file (ONNX ``metadata_props``, TorchScript ``lethe.json``, safetensors header).

    Returns:
        The file's bytes.

    Raises:
        InvalidArgumentError: ``fmt`` is not one of :data:`FORMATS`.
    """
    writer = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}[_checked_format(fmt)]
    with _EXPORTING:
        return writer(module, tuple(input_shape), dict(metadata))


@dataclass(frozen=True)
class ExportedNetwork:
    """One exported file, ready to stream.

    Attributes:
        data: the file's bytes.
        sha256: hex SHA-256 of ``data``.
        model_version: the version of the model that serves the network.
        input_shape: shape of one sample.
        fmt: one of :data:`FORMATS`.
    """

    data: bytes
    sha256: str
    model_version: int
    input_shape: tuple[int, ...]
    fmt: str

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.ExportChunk]:
        """The ``Export`` stream: the facts (version, input shape, size), then the data; the last carries the digest."""
        yield pb.ExportChunk(
            model_version=self.model_version, input_shape=list(self.input_shape), total_bytes=len(self.data)
        )
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_bytes):
            last = start + chunk_bytes >= len(view)
            yield pb.ExportChunk(data=bytes(view[start : start + chunk_bytes]), sha256=self.sha256 if last else "")


def export_network(
    predictor: Predictor,
    *,
    task: str | None,
    fmt: str,
    input_shape: tuple[int, ...],
    strategy: str,
    backbone: str,
) -> ExportedNetwork:
    """Export the network ``predictor`` serves for ``task`` (None for class-incremental strategies).

    Args:
        predictor: the serving snapshot Predict answers from now.
        task: the task; None for class-incremental strategies.
        fmt: one of :data:`FORMATS`.
        input_shape: shape of one sample.
        strategy, backbone: the model's names, written into the file.

    Raises:
        InvalidArgumentError: an unknown ``format``, or a ``task`` the strategy refuses (missing or superfluous).
        NotFoundError: the snapshot does not know the task.
        FailedPreconditionError: the task is unlearned, or the strategy's predictor cannot give its network.
    """
    fmt = _checked_format(fmt)
    network_of = getattr(predictor, "network", None)
    if network_of is None:
        raise FailedPreconditionError(f"strategy {strategy!r} cannot export its network (its predictor has none)")
    try:
        network: nn.Module = network_of(task)
    except UnknownTaskError:
        raise NotFoundError(f"task {task!r} is not in the published model") from None
    except UnlearnedTaskError:
        raise FailedPreconditionError(f"task {task!r} is unlearned; its network is not exported") from None
    except ValueError as exc:
        raise InvalidArgumentError("task", str(exc)) from None
    shape = tuple(int(d) for d in input_shape)
    metadata = {
        "strategy": strategy,
        "backbone": backbone,
        "task": task or "",
        "model_version": str(predictor.version),
        "input_shape": ",".join(map(str, shape)),
        "input": f"float32 [n, {', '.join(map(str, shape))}], values as sent to Predict (uint8 scaled to [0, 1])",
        "output": "logits float32 [n, num_classes]; classes the task never saw are -inf",
        "architecture": type(network).__name__ + _inner(network),
        "loading": "safetensors holds the state dict only: build the same architecture (lethe's backbone "
        f"{backbone!r}, inside MaskedLogits when the state dict has 'seen_classes') and load_state_dict it",
    }
    data = export_bytes(network, shape, fmt, metadata)
    return ExportedNetwork(data, hashlib.sha256(data).hexdigest(), predictor.version, shape, fmt)


def _checked_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgumentError("format", f"must be one of {', '.join(f.upper() for f in FORMATS)}, got {fmt!r}")
    return fmt


def _inner(network: nn.Module) -> str:
    backbone = getattr(network, "backbone", None)
    return f"({type(backbone).__name__})" if isinstance(backbone, nn.Module) else ""


def _example(input_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(_EXAMPLE_BATCH, *input_shape)


def _onnx(module: nn.Module, input_shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    import onnx

    # The torch.export-based exporter (dynamo=True, the default since torch 2.9). The TorchScript-based one
    # (dynamo=False) is faster (0.04 s against about 1 s for the digits MLP) but deprecated: on torch 2.15 every
    # call warns that it will be removed. Both give the same logits here, -inf included; this one takes the
    # batch dimension from dynamic_shapes and needs onnxscript. Exports are serialized (_EXPORTING).
    # Its optimizer logs every pass at INFO (about ten lines an export); keep its warnings.
    for name in ("onnxscript", "onnx_ir"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))
    program = torch.onnx.export(
        module,
        (_example(input_shape),),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    assert program is not None  # dynamo=True without a file returns the program
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    data: bytes = model.SerializeToString()
    return data


def _torchscript(module: nn.Module, input_shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    # Scripted rather than traced: the archive holds the forward code, not one trace's shapes. TorchScript is
    # deprecated upstream (FutureWarning on torch 2.15) but still what torch.jit.load and LibTorch read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={"lethe.json": json.dumps(metadata, sort_keys=True)})
    return buffer.getvalue()


def _safetensors(module: nn.Module, input_shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    # Private contiguous copies: safetensors refuses tensors that share storage.
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in module.state_dict().items()}
    data: bytes = save(state, metadata=metadata)
    return data
