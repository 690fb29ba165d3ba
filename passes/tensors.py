"""The byte size of a tensor: a ``TensorProto`` (inline or external) or a
graphsurgeon ``Constant``.  Every size the passes and the driver count
(validation, file sizes, report weights, folding limits) comes from here."""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs
from onnx import TensorProto

from .gs_adapter import lazy_values

__all__ = ["ELEMENT_BYTES", "PACKED_2BIT", "PACKED_4BIT", "const_nbytes", "tensor_nbytes"]


def _types(*names: str) -> frozenset[int]:
    """The data types of those names that this onnx defines."""
    return frozenset(getattr(TensorProto, n) for n in names if hasattr(TensorProto, n))


# Bytes per element of each fixed-size data type (strings have none).
ELEMENT_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.UINT16: 2,
    TensorProto.INT16: 2, TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1,
    TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.UINT32: 4, TensorProto.UINT64: 8,
    TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16, TensorProto.BFLOAT16: 2,
    **dict.fromkeys(_types("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"), 1),
}
PACKED_4BIT = _types("INT4", "UINT4", "FLOAT4E2M1")  # two elements to a byte
PACKED_2BIT = _types("INT2", "UINT2")  # four elements to a byte


def tensor_nbytes(t: TensorProto, *, external_length: bool = False) -> int | None:
    """Bytes of ``t``'s data as stored (sub-byte types packed), from its dims
    and data type (reading ``raw_data`` would copy the weight); None for a
    type without a fixed size (strings, undefined or unknown types).
    ``external_length``: a tensor kept in an external file counts the length
    its reference records, where it records one."""
    if external_length and t.data_location == TensorProto.EXTERNAL:
        for e in t.external_data:
            if e.key == "length":
                return int(e.value)
    n = math.prod(t.dims)
    if t.data_type in PACKED_4BIT:
        return (n + 1) // 2
    if t.data_type in PACKED_2BIT:
        return (n + 3) // 4
    size = ELEMENT_BYTES.get(t.data_type)
    return None if size is None else n * size


def const_nbytes(t: gs.Constant) -> int:
    """Bytes of the constant's values, without loading values that are still
    in their ``TensorProto`` or file."""
    v = lazy_values(t)
    return int(v.nbytes) if hasattr(v, "nbytes") else int(t.values.nbytes)
