"""Cast cleanup after a float16 conversion.

A converter that keeps some ops in fp32 surrounds each of them with Casts, so
two kept ops in a row meet through ``Cast(fp32->fp16) -> Cast(fp16->fp32)``,
and a graph input that is already fp16 may meet ``Cast(fp16->fp32) ->
Cast(fp32->fp16)``.  ``RemoveRedundantCasts`` drops the second Cast of such a
pair (consumers read the first Cast's input; the first Cast dies unless
someone else reads it):

- a lossless round trip (``a -> wider -> a``) is always exact;
- a lossy round trip (``a -> narrower -> a``) changes values (it skips a
  rounding), so it is removed only when both Casts are new, i.e. not in
  ``protected`` (the names of the Casts the model had before conversion) and
  ``allow_precision_gain`` is set: the user never asked for that rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import bypass, is_standard, producer, walk_nodes
from .shapes import infer_types

__all__ = ["RemoveRedundantCasts"]

# from-type -> types that hold every value of it exactly
_WIDER = {
    np.dtype(np.float16): {np.dtype(np.float32), np.dtype(np.float64)},
    np.dtype(np.float32): {np.dtype(np.float64)},
    np.dtype(np.int8): {np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)},
    np.dtype(np.int16): {np.dtype(np.int32), np.dtype(np.int64)},
    np.dtype(np.int32): {np.dtype(np.int64)},
    np.dtype(np.uint8): {np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint16),
                         np.dtype(np.uint32), np.dtype(np.uint64)},
}
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


class RemoveRedundantCasts(Pass):
    name = "remove_redundant_casts"

    def __init__(self, protected: frozenset[str] = frozenset(), allow_precision_gain: bool = False):
        self.protected = frozenset(protected)
        self.allow_precision_gain = allow_precision_gain

    def call(self, graph: gs.Graph) -> PassResult:
        tm = infer_types(graph)
        stats: dict[str, int] = {}
        for g, second in walk_nodes(graph):
            if second.op != "Cast" or not is_standard(second) or not second.inputs or not second.outputs:
                continue
            first = producer(second.inputs[0])
            if first is None or first.op != "Cast" or not is_standard(first) or not first.inputs:
                continue
            src = tm.dtype(first.inputs[0])
            mid = tm.dtype(first.outputs[0])
            dst = tm.dtype(second.outputs[0])
            if src is None or mid is None or dst is None or src != dst:
                continue
            if mid in _WIDER.get(src, ()):
                kind = "lossless_pair"
            elif (self.allow_precision_gain and src in _FLOATS and mid in _FLOATS
                  and first.name not in self.protected and second.name not in self.protected):
                kind = "lossy_pair"
            else:
                continue
            if bypass(g, second, first.inputs[0], second.outputs[0]):
                stats[kind] = stats.get(kind, 0) + 1
        return PassResult(bool(stats), stats)
