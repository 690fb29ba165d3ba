"""Initializers with identical dtype, shape and bytes are merged into one."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .base import Pass, PassResult
from .convert import ExternalValues, open_external
from .graph import CACHE_LIMIT as _CACHE_LIMIT
from .graph import const_dtype, const_shape, const_value, file_bytes, is_const, iter_graphs, replace_uses
from .gs_adapter import LazyValues, lazy_values
from .tensors import PACKED_4BIT, tensor_nbytes

__all__ = ["DedupeInitializers"]


def _local_constants(g: gs.Graph) -> list[gs.Constant]:
    seen: dict[int, gs.Constant] = {}
    for node in g.nodes:
        for t in node.inputs:
            if is_const(t) and id(t) not in seen:
                seen[id(t)] = t
    return list(seen.values())


_PROBE_BYTES = 1 << 16
# Data types whose raw_data bytes are exactly the bytes of the array const_value gives
# (little-endian fixed-size numbers; not bool, whose raw bytes may be any nonzero value).
_RAW_IS_ARRAY = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
                           TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                           TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})


def _probe(c: gs.Constant) -> bytes:
    """The first 64 KiB of the constant's bytes (the dtype and shape are already equal)."""
    v = lazy_values(c)
    if isinstance(v, ExternalValues) and v.tensor.data_type not in PACKED_4BIT:
        f, offset, length = open_external(v.tensor, v.base_dir)
        with f:
            f.seek(offset)
            return f.read(min(_PROBE_BYTES, length))
    if type(v) is LazyValues and v.nbytes > _CACHE_LIMIT and v.tensor.data_type in _RAW_IS_ARRAY:
        # A large inline weight: its raw bytes are the array's bytes.  Read from the model
        # file, its first bytes there (raw_data copies it whole); else raw_data, as
        # const_value would copy it three times (raw_data, to_array, np.array) for 64 KiB of it.
        head = file_bytes(c, np.zeros(1, np.int64), min(_PROBE_BYTES, tensor_nbytes(v.tensor) or 0))
        if head is not None:
            return head.tobytes()
        if v.tensor.HasField("raw_data") and sys.byteorder == "little":
            return v.tensor.raw_data[:_PROBE_BYTES]
    a = np.ascontiguousarray(const_value(c)).reshape(-1).view(np.uint8)
    return a[:_PROBE_BYTES].tobytes()


class DedupeInitializers(Pass):
    """Initializers with identical dtype, shape and bytes are merged into one."""

    name = "dedupe_initializers"

    def call(self, graph: gs.Graph) -> PassResult:
        stats = {"merged": 0, "bytes_saved": 0}
        for g in iter_graphs(graph):
            groups: dict[tuple, list[gs.Constant]] = {}
            for c in _local_constants(g):
                dt = const_dtype(c)
                if dt is None or dt == object:
                    continue
                groups.setdefault((dt.str, const_shape(c)), []).append(c)
            for same_shape in groups.values():
                if len(same_shape) < 2:
                    continue
                # A cheap first look (the first 64 KiB, read from the file for external data) splits
                # the group; only tensors that still share it are read and hashed in full.
                probes: dict[bytes, list[gs.Constant]] = {}
                for c in same_shape:
                    probes.setdefault(_probe(c), []).append(c)
                same_shape = [c for cs in probes.values() if len(cs) > 1 for c in cs]
                canon: dict[bytes, gs.Constant] = {}
                for c in same_shape:
                    v = np.ascontiguousarray(const_value(c))
                    digest = hashlib.blake2b(v.reshape(-1).view(np.uint8), digest_size=20).digest()
                    first = canon.get(digest)
                    if first is None:
                        canon[digest] = c
                    elif np.array_equal(const_value(first), v, equal_nan=v.dtype.kind in "fc"):
                        replace_uses(c, first)
                        stats["merged"] += 1
                        stats["bytes_saved"] += int(v.nbytes)
        # readers now read an equal constant (same dtype, shape and bytes): no type changes
        return PassResult(stats["merged"] > 0, stats, types_kept=True)
