"""``BoundInfiniteConstants``: preparation for integer (QDQ) targets.

Exporters write attention masks as ``Where(mask, 0, -inf)`` (or a finite
stand-in: float32's lowest value, -65504, -10000); a quantizer cannot give
-inf a scale, and a finite one spends the whole quantized range on it.  The
scalar fill values of a Where that are +-inf or at least 1e4 in magnitude get
+-``limit`` instead (default 100: added to attention scores before Softmax,
exp(-100) is below fp32's normal range, so the masked weights stay ~0; a
larger value would spend the quantized range of the masked scores on the
fill value).  The result is verified against the fp32 model like every
other change.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import const_dtype, const_value, walk_nodes
from .tensors import const_nbytes

__all__ = ["BoundInfiniteConstants"]

_SMALL = 64  # bytes: masks' fill values are scalars
# Fill values this large act as -inf: torch.finfo(float32).min (Llama, dynamo exports),
# fp16's -65504, BERT's -10000.
_HUGE = 1e4


class BoundInfiniteConstants(Pass):
    name = "bound_infinite_constants"

    def __init__(self, limit: float = 100.0):
        self.limit = float(limit)

    def _fix(self, c: gs.Constant) -> bool:
        dt = const_dtype(c)
        if dt is None or dt.kind != "f" or const_nbytes(c) > _SMALL:
            return False
        v = const_value(c)
        huge = np.abs(v.astype(np.float64)) >= _HUGE
        if not huge.any():
            return False
        c.values = np.where(huge, np.sign(v) * self.limit, v).astype(v.dtype)
        return True

    def call(self, graph: gs.Graph) -> PassResult:
        fixed = 0
        seen: set[int] = set()
        for _, node in walk_nodes(graph):
            if node.op != "Where":
                continue
            cands = [t for t in node.inputs[1:] if isinstance(t, gs.Constant)]
            for c in cands:
                if id(c) not in seen:
                    seen.add(id(c))
                    fixed += self._fix(c)
        return PassResult(bool(fixed), {"constants_bounded": fixed} if fixed else {})
