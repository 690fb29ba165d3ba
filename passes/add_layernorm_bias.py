"""Every LayerNormalization without its optional bias gets a zero bias (for ORT
training's gradient builder; see ``layernorm``)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, const_dtype, const_shape, is_const, walk_nodes
from .layernorm import is_layernorm

__all__ = ["AddLayerNormBias"]


class AddLayerNormBias(Pass):
    """Every LayerNormalization without its optional bias gets a zero bias
    (same shape and type as its scale).  Skipped, and counted as
    ``skipped_unknown_scale``, when the scale is not a constant."""

    name = "add_layernorm_bias"

    def call(self, graph: gs.Graph) -> PassResult:
        names: NameScope | None = None
        stats: dict[str, int] = {}
        for _, node in walk_nodes(graph):
            if not is_layernorm(node) or len(node.inputs) < 2:
                continue
            if len(node.inputs) >= 3 and node.inputs[2].name:
                continue
            scale = node.inputs[1]
            dtype = const_dtype(scale) if is_const(scale) else None
            if dtype is None:
                stats["skipped_unknown_scale"] = stats.get("skipped_unknown_scale", 0) + 1
                continue
            if names is None:
                names = NameScope(graph)
            base = node.name or node.outputs[0].name or "LayerNormalization"
            bias = gs.Constant(names.fresh(f"{base}_bias"), np.zeros(const_shape(scale), dtype=dtype))
            if len(node.inputs) >= 3:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            stats["LayerNormalization"] = stats.get("LayerNormalization", 0) + 1
        modified = stats.get("LayerNormalization", 0) > 0
        return PassResult(modified, stats)
