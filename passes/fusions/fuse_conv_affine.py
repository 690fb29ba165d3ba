"""Conv followed by a per-output-channel Mul or Add of a constant -> one Conv.

Conv(x, W, b) * s -> Conv(x, W * s, b * s) and Conv(x, W, b) + t -> Conv(x, W, b + t),
where s/t hold one value per output channel (or one value) and broadcasting them
cannot change the Conv's output shape: every dim 1 except the channel axis,
rank at most the output's.  Caffe2-era models (the onnx light zoo's densenet)
write BatchNormalization as Conv + Mul + Add.  Only float weights that no other
node reads (else the fusion would copy them), and only where the Conv's output
has no other reader.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Pass, PassResult
from ..graph import NameScope, NodeIndex, const_value, io_ids, is_const, is_standard, iter_graphs

__all__ = ["FuseConvAffine"]

_FLOATS = ("float16", "float32", "float64")


def _per_channel(c: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """c as a [C] vector when it broadcasts over a Conv output of rank ``out_rank`` per channel."""
    if c.ndim > out_rank:
        return None
    full = (1,) * (out_rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1):
        return None
    if full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(c.dtype)


class FuseConvAffine(Pass):
    name = "fuse_conv_affine"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        stats = {"mul": 0, "add": 0}
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            alive = NodeIndex(g)
            for conv in list(g.nodes):
                if conv.op != "Conv" or not is_standard(conv) or len(conv.outputs) != 1:
                    continue
                if conv not in alive:
                    continue
                while True:  # Mul then Add then Mul ...: fold each in turn
                    y = conv.outputs[0]
                    if len(y.outputs) != 1 or id(y) in out_ids:
                        break
                    op = y.outputs[0]
                    if op.op not in ("Mul", "Add") or not is_standard(op) or len(op.inputs) != 2:
                        break
                    c = op.inputs[1] if op.inputs[0] is y else op.inputs[0]
                    w = conv.inputs[1] if len(conv.inputs) > 1 else None
                    if not is_const(c) or not is_const(w) or len(w.outputs) != 1 or op.inputs[0] is op.inputs[1]:
                        break
                    b = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
                    if b is not None and (not is_const(b) or len(b.outputs) != 1):
                        break
                    wv = const_value(w)
                    if wv.dtype.name not in _FLOATS:
                        break
                    cv = const_value(c)
                    if cv.dtype != wv.dtype:
                        break
                    vec = _per_channel(cv, wv.ndim, wv.shape[0])  # Conv output rank = weight rank
                    if vec is None:
                        break
                    bv = const_value(b) if b is not None else np.zeros(wv.shape[0], wv.dtype)
                    if op.op == "Mul":
                        new_w = (wv * vec.reshape((-1,) + (1,) * (wv.ndim - 1))).astype(wv.dtype)
                        new_b = (bv * vec).astype(wv.dtype)
                    else:
                        new_w, new_b = None, (bv + vec).astype(wv.dtype)
                    out = op.outputs[0]
                    if not alive.bypass(op, y, out):
                        break
                    if new_w is not None:
                        conv.inputs[1] = gs.Constant(w.name, new_w)
                    bname = b.name if b is not None else NameScope(graph).fresh((conv.name or "conv") + "_bias")
                    new_bias = gs.Constant(bname, new_b)
                    if len(conv.inputs) > 2:
                        conv.inputs[2] = new_bias
                    else:
                        conv.inputs.append(new_bias)
                    stats["mul" if op.op == "Mul" else "add"] += 1
        return PassResult(stats["mul"] + stats["add"] > 0, stats)
