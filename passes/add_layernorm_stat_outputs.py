"""Every LayerNormalization gets its Mean and InvStdDev outputs (for ORT
training's gradient builder; see ``layernorm``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, walk_nodes
from .layernorm import is_layernorm

__all__ = ["AddLayerNormStatOutputs"]


def _stat_dtype(node: gs.Node):
    """Mean/InvStdDev type: float32 for stash_type 1 (the default), else the input's."""
    stash = int(node.attrs.get("stash_type", 1))
    if stash == 1:
        return np.float32
    if stash in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
        return node.inputs[0].dtype if node.inputs and node.inputs[0].dtype is not None else None
    return None


def _stat_shape(node: gs.Node):
    """X's shape with every dim from ``axis`` on set to 1 (ONNX spec); None if unknown."""
    x = node.inputs[0]
    shape = x.shape
    if shape is None:
        return None
    rank = len(shape)
    axis = int(node.attrs.get("axis", -1))
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        return None
    return [d if k < axis else 1 for k, d in enumerate(shape)]


class AddLayerNormStatOutputs(Pass):
    """Every LayerNormalization with fewer than 3 (named) outputs gets its
    Mean and InvStdDev outputs (fresh names, unused by the graph)."""

    name = "add_layernorm_stat_outputs"

    def call(self, graph: gs.Graph) -> PassResult:
        names: NameScope | None = None
        stats: dict[str, int] = {}
        for _, node in walk_nodes(graph):
            if not is_layernorm(node) or not node.inputs or not node.outputs:
                continue
            if len(node.outputs) >= 3 and all(t.name for t in node.outputs[1:3]):
                continue
            if names is None:
                names = NameScope(graph)
            base = node.name or node.outputs[0].name or "LayerNormalization"
            dtype, shape = _stat_dtype(node), _stat_shape(node)
            for idx, suffix in ((1, "Mean"), (2, "InvStdDev")):
                if idx < len(node.outputs) and node.outputs[idx].name:
                    continue
                t = gs.Variable(names.fresh(f"{base}_{suffix}"), dtype=dtype, shape=shape)
                if idx < len(node.outputs):
                    node.outputs[idx] = t
                else:
                    node.outputs.append(t)
            stats["LayerNormalization"] = stats.get("LayerNormalization", 0) + 1
        return PassResult(bool(stats), stats)
