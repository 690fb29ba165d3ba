"""Conv followed by inference BatchNormalization -> one Conv with scaled weights."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Pass, PassResult
from ..graph import NameScope, const_dtype, const_value, io_ids, is_const, is_standard, iter_graphs, remove_nodes

__all__ = ["FuseConvBatchNorm"]


def _why_not(conv: gs.Node | None, bn: gs.Node, out_ids: set[int]) -> str | None:
    """None when the pair can be fused, else the reason it cannot."""
    if bn.attrs.get("training_mode", 0):
        return "training_mode"
    if any(t.name and (t.outputs or id(t) in out_ids) for t in bn.outputs[1:]):
        return "bn_stats_used"
    if len(bn.inputs) != 5 or not all(is_const(t) for t in bn.inputs[1:]):
        return "bn_params_not_constant"
    if conv is None or conv.op != "Conv" or not is_standard(conv):
        return "not_after_conv"
    y = bn.inputs[0]
    if len(y.outputs) != 1 or id(y) in out_ids:
        return "conv_output_shared"
    if len(conv.inputs) < 2 or not is_const(conv.inputs[1]):
        return "weight_not_constant"
    if len(conv.inputs) > 2 and conv.inputs[2].name and not is_const(conv.inputs[2]):
        return "bias_not_constant"
    dt = const_dtype(conv.inputs[1])
    if dt is None or dt.kind != "f":
        return "weight_not_float"
    channels = conv.inputs[1].shape[0]
    if any(tuple(t.shape) != (channels,) for t in bn.inputs[1:5]):
        return "bn_params_not_per_channel"  # e.g. BatchNormalization-7 with spatial=0
    return None


class FuseConvBatchNorm(Pass):
    name = "fuse_conv_batchnorm"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {"fused": 0}
        names = None
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            for bn in list(g.nodes):
                if bn.op != "BatchNormalization" or not is_standard(bn) or not bn.inputs:
                    continue
                y = bn.inputs[0]
                conv = y.inputs[0] if len(y.inputs) else None
                reason = _why_not(conv, bn, out_ids)
                if reason is not None:
                    if conv is not None and conv.op == "Conv":
                        stats["skipped_" + reason] = stats.get("skipped_" + reason, 0) + 1
                    continue
                names = names or NameScope(graph)
                w = const_value(conv.inputs[1])
                scale, beta, mean, var = (const_value(t).astype(np.float64) for t in bn.inputs[1:5])
                eps = float(bn.attrs.get("epsilon", 1e-5))
                factor = scale / np.sqrt(var + eps)
                has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
                b = const_value(conv.inputs[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
                w_new = (w.astype(np.float64) * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
                b_new = ((b - mean) * factor + beta).astype(w.dtype)
                w_t = gs.Constant(names.fresh(conv.inputs[1].name + "_bn"), w_new)
                b_t = gs.Constant(names.fresh((conv.inputs[2].name if has_bias else conv.name or "conv") + "_bn_bias"), b_new)
                conv.inputs = [conv.inputs[0], w_t, b_t]
                out = bn.outputs[0]
                bn.inputs.clear()
                bn.outputs.clear()
                conv.outputs = [out]
                remove_nodes(g, [bn])
                stats["fused"] += 1
        return PassResult(stats["fused"] > 0, stats)
