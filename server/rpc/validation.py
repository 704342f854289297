"""Validation of every request field before anything reaches the queue or the model.

Each check raises :class:`InvalidArgumentError` (or :class:`ResourceExhaustedError` for limits)
naming the field in proto notation and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protos import lethe_pb2 as pb
from protos.tensors import TensorFormatError, from_tensor
from server.errors import InvalidArgumentError, ResourceExhaustedError

#: Task names are path-safe and printable: they appear in file names, logs and metric labels.
#: Used with ``fullmatch``: ``$`` would also accept a trailing newline.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_KEY_LENGTH = 256
MAX_REASON_LENGTH = 4096
MAX_METADATA_ENTRIES = 64
MAX_METADATA_LENGTH = 1024
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_SAMPLE_ID_LENGTH = 256
FLOAT_INPUTS = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64, pb.UINT8)


def task_name(value: str, field: str = "task") -> str:
    """Check a task name: 1–128 characters of letters, digits, ``.``, ``_``, ``-``, starting alphanumeric."""
    if not value:
        raise InvalidArgumentError(field, "is required", reason="FIELD_REQUIRED")
    if not TASK_NAME.fullmatch(value):
        raise InvalidArgumentError(
            field,
            f"must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {value[:40]!r}",
            reason="INVALID_TASK_NAME",
        )
    return value


def job_id(value: str, field: str = "id") -> str:
    """Check a job id: 32 lowercase hex characters."""
    if not JOB_ID.fullmatch(value):
        raise InvalidArgumentError(
            field, f"must be a job id of 32 lowercase hex characters, got {value[:40]!r}", reason="INVALID_JOB_ID"
        )
    return value


def idempotency_key(value: str, field: str) -> str:
    """Check an optional idempotency key: printable, at most 256 characters."""
    if len(value) > MAX_KEY_LENGTH or not value.isprintable():
        raise InvalidArgumentError(
            field, f"must be at most {MAX_KEY_LENGTH} printable characters", reason="INVALID_IDEMPOTENCY_KEY"
        )
    return value


@dataclass(frozen=True)
class SampleLimits:
    """What a model accepts."""

    input_shape: tuple[int, ...]
    num_classes: int


def inputs_tensor(
    tensor: pb.Tensor,
    limits: SampleLimits,
    field: str,
    max_samples: int,
    limit: str | None = None,
) -> np.ndarray:
    """Decode and check an inputs tensor: ``[n, *input_shape]``, float or uint8, finite; return float32.

    UINT8 values are scaled to [0, 1]. More than ``max_samples`` samples is RESOURCE_EXHAUSTED; ``limit``
    names the setting in the message (default: ``limits.max_predict_samples``).
    """
    if tensor.dtype not in FLOAT_INPUTS:
        allowed = ", ".join(pb.DataType.Name(d) for d in FLOAT_INPUTS)
        raise InvalidArgumentError(
            f"{field}.dtype", f"must be one of {allowed}, got {_dtype_name(tensor.dtype)}", reason="INVALID_DTYPE"
        )
    expected = [-1, *limits.input_shape]
    shape = list(tensor.shape)
    if len(shape) != len(expected) or shape[1:] != list(limits.input_shape) or shape[0] < 0:
        raise InvalidArgumentError(
            f"{field}.shape",
            f"must be [n, {', '.join(map(str, limits.input_shape))}] for this model, got {shape}",
            reason="INVALID_SHAPE",
        )
    if shape[0] == 0:
        raise InvalidArgumentError(f"{field}.shape", "must hold at least one sample", reason="INVALID_SHAPE")
    if shape[0] > max_samples:
        limit = limit or f"limits.max_predict_samples ({max_samples} per request)"
        raise ResourceExhaustedError(
            f"{field}.shape: {shape[0]} samples exceed {limit}",
            reason="TOO_MANY_SAMPLES",
            metadata={"field": f"{field}.shape", "max_samples": str(max_samples)},
        )
    try:
        array = from_tensor(tensor)
    except TensorFormatError as exc:
        raise InvalidArgumentError(field, str(exc), reason="INVALID_TENSOR_DATA") from None
    if tensor.dtype == pb.UINT8:
        return array.astype(np.float32) / np.float32(255.0)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        out = array.astype(np.float32, copy=False)  # float32 on the wire: a read-only view, no copy
    if not np.isfinite(out).all():
        raise InvalidArgumentError(
            f"{field}.data",
            "must be finite (no NaN or infinity, also after float32 conversion)",
            reason="NON_FINITE_INPUT",
        )
    return out


def labels_tensor(tensor: pb.Tensor, samples: int, num_classes: int, field: str) -> np.ndarray:
    """Decode and check labels: INT64 ``[samples]`` in ``[0, num_classes)``."""
    if tensor.dtype != pb.INT64:
        raise InvalidArgumentError(
            f"{field}.dtype", f"must be INT64, got {_dtype_name(tensor.dtype)}", reason="INVALID_DTYPE"
        )
    if list(tensor.shape) != [samples]:
        raise InvalidArgumentError(
            f"{field}.shape",
            f"must be [{samples}] (one label per input), got {list(tensor.shape)}",
            reason="INVALID_SHAPE",
        )
    try:
        labels = from_tensor(tensor)
    except TensorFormatError as exc:
        raise InvalidArgumentError(field, str(exc), reason="INVALID_TENSOR_DATA") from None
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise InvalidArgumentError(
            f"{field}.data", f"labels must be in [0, {num_classes}), got {bad}", reason="LABEL_OUT_OF_RANGE"
        )
    return labels.astype(np.int64)


def sample_ids(values: list[str], samples: int, field: str) -> list[str]:
    """Optional sample ids: none, or exactly one printable id per sample."""
    if values and len(values) != samples:
        raise InvalidArgumentError(
            field,
            f"must be empty or hold one id per sample ({samples}), got {len(values)}",
            reason="INVALID_SAMPLE_IDS",
        )
    for value in values:
        if not value or len(value) > MAX_SAMPLE_ID_LENGTH or not value.isprintable():
            raise InvalidArgumentError(
                field, f"ids must be 1-{MAX_SAMPLE_ID_LENGTH} printable characters", reason="INVALID_SAMPLE_IDS"
            )
    return list(values)


def forget_ids(values: Sequence[str], limit: int) -> tuple[str, ...]:
    """The distinct ids of a records request (duplicates are one id), each 1-256 printable characters.

    Raises:
        InvalidArgumentError: an id is empty, too long or not printable.
        ResourceExhaustedError: more than ``limit`` distinct ids (``limits.max_forget_samples``).
    """
    distinct = tuple(dict.fromkeys(values))
    if len(distinct) > limit:
        raise ResourceExhaustedError(
            f"sample_ids: {len(distinct)} ids exceed limits.max_forget_samples ({limit}); split the request",
            reason="TOO_MANY_SAMPLE_IDS",
            metadata={"field": "sample_ids", "max_forget_samples": str(limit)},
        )
    for index, value in enumerate(distinct):
        if not value or len(value) > MAX_SAMPLE_ID_LENGTH or not value.isprintable():
            raise InvalidArgumentError(
                f"sample_ids[{index}]",
                f"ids must be 1-{MAX_SAMPLE_ID_LENGTH} printable characters",
                reason="INVALID_SAMPLE_IDS",
            )
    return distinct


def learn_numbers(header: pb.LearnHeader) -> None:
    """Range checks of a Learn header's numeric fields (zero = server default)."""
    if header.epochs > MAX_EPOCHS:
        raise _option("header.epochs", f"must be 0 (default) to {MAX_EPOCHS}, got {header.epochs}")
    if header.batch_size > MAX_BATCH_SIZE:
        raise _option("header.batch_size", f"must be 0 (default) to {MAX_BATCH_SIZE}, got {header.batch_size}")
    lr = header.learning_rate
    if not math.isfinite(lr) or lr < 0 or lr > 10:
        raise _option("header.learning_rate", f"must be 0 (default) or in (0, 10], got {lr}")
    hf = header.holdout_fraction
    if not math.isfinite(hf) or hf < 0 or hf >= 0.9:
        raise _option("header.holdout_fraction", f"must be 0 (default) or in (0, 0.9), got {hf}")
    if header.mode not in (pb.LearnHeader.PERMANENT, pb.LearnHeader.TEMPORARY):
        raise _option("header.mode", f"must be PERMANENT or TEMPORARY, got {header.mode}")
    if len(header.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgumentError(
            "header.metadata", f"at most {MAX_METADATA_ENTRIES} entries", reason="INVALID_METADATA"
        )
    for key, value in header.metadata.items():
        if not key or len(key) > 128 or len(value) > MAX_METADATA_LENGTH or not (key + value).isprintable():
            raise InvalidArgumentError(
                "header.metadata",
                f"keys 1-128 and values up to {MAX_METADATA_LENGTH} printable characters",
                reason="INVALID_METADATA",
            )


def _option(field: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(field, message, reason="INVALID_LEARN_OPTION")


def reason(value: str) -> str:
    """An unlearn reason: at most 4096 characters, no control characters except newlines and tabs."""
    if len(value) > MAX_REASON_LENGTH:
        raise InvalidArgumentError("reason", f"must be at most {MAX_REASON_LENGTH} characters", reason="INVALID_REASON")
    if not value.replace("\n", " ").replace("\t", " ").isprintable():
        raise InvalidArgumentError("reason", "must not contain control characters", reason="INVALID_REASON")
    return value


def _dtype_name(dtype: int) -> str:
    try:
        return pb.DataType.Name(dtype)
    except ValueError:
        return f"unknown value {dtype}"
