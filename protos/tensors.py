"""Conversion between numpy arrays and the wire ``Tensor`` message, shared by client and server.

The wire layout is row-major, little-endian, without padding. Decoding checks that the byte length
agrees with the shape and dtype before any array is built, so a hostile message cannot make the
receiver allocate more than it sent.
"""

from __future__ import annotations

import numpy as np

from protos import lethe_pb2 as pb

#: Wire dtype -> little-endian numpy dtype. BFLOAT16 has no numpy dtype: it travels as raw uint16.
NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.UINT8: np.dtype("u1"),
    pb.INT64: np.dtype("<i8"),
}
_WIRE_DTYPES = {
    np.dtype("float32"): pb.FLOAT32,
    np.dtype("float16"): pb.FLOAT16,
    np.dtype("float64"): pb.FLOAT64,
    np.dtype("uint8"): pb.UINT8,
    np.dtype("int64"): pb.INT64,
}
MAX_RANK = 8


class TensorFormatError(ValueError):
    """A Tensor message is malformed; the message says what is wrong."""


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode ``array`` (float32/16/64, uint8 or int64) as a wire Tensor.

    Raises:
        TypeError: for a dtype the wire format does not carry.
    """
    array = np.asarray(array)
    wire = _WIRE_DTYPES.get(array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype)
    if wire is None:
        allowed = ", ".join(str(d) for d in _WIRE_DTYPES)
        raise TypeError(f"dtype {array.dtype} cannot be sent; convert to one of {allowed}")
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[wire]).tobytes()
    return pb.Tensor(dtype=wire, shape=list(array.shape), data=data)


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32 exactly."""
    return (raw.astype("<u4") << 16).view("<f4")


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a wire Tensor into a numpy array (BFLOAT16 widened to float32).

    Raises:
        TensorFormatError: unknown dtype, negative or too many dimensions, or a byte length that
            disagrees with shape × itemsize.
    """
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        names = ", ".join(pb.DataType.Name(k) for k in NUMPY_DTYPES)
        raise TensorFormatError(f"dtype must be one of {names}, got {tensor.dtype}")
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or len(shape) > MAX_RANK:
        raise TensorFormatError(f"shape must have 1 to {MAX_RANK} dimensions, got {list(shape)}")
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"shape must not have negative dimensions, got {list(shape)}")
    count = 1
    for d in shape:
        count *= d
    expected = count * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it: read it once
    if len(data) != expected:
        raise TensorFormatError(
            f"data has {len(data)} bytes but shape {list(shape)} of {pb.DataType.Name(tensor.dtype)} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if tensor.dtype == pb.BFLOAT16:
        return bfloat16_to_float32(array)
    return array
