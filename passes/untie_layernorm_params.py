"""A LayerNormalization scale or bias shared with other nodes becomes a private
copy (for ORT training's gradient builder; see ``layernorm``)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, const_value, is_const, is_standard, walk_nodes
from .layernorm import is_layernorm

__all__ = ["UntieLayerNormParams"]


def _constant_source(t: gs.Tensor) -> gs.Constant | None:
    """The constant ``t`` is, or is an Identity chain of."""
    seen = 0
    while not is_const(t):
        prod = t.inputs[0] if len(t.inputs) else None
        if prod is None or prod.op != "Identity" or not is_standard(prod) or seen > 16:
            return None
        t, seen = prod.inputs[0], seen + 1
    return t


class UntieLayerNormParams(Pass):
    """A LayerNormalization scale or bias that other nodes also read (torch
    writes one initializer plus Identity nodes for equal parameters) becomes a
    private copy for every LayerNormalization after the first.

    ORT's LayerNormalizationGrad names its scale/bias gradients after the input
    tensor and emits them even for frozen parameters, so two nodes reading one
    tensor define ``<name>_grad`` twice ("Duplicate definition of name").
    Names in ``exclude`` (trainable parameters: untying would change training)
    and values that are not constants are left alone (``skipped_*`` stats)."""

    name = "untie_layernorm_params"

    def __init__(self, exclude=()):
        self.exclude = frozenset(exclude)

    def call(self, graph: gs.Graph) -> PassResult:
        names: NameScope | None = None
        stats: dict[str, int] = {}
        seen: set[int] = set()  # tensors some LayerNormalization already reads as scale or bias
        for _, node in walk_nodes(graph):
            if not is_layernorm(node):
                continue
            for slot in (1, 2):
                if slot >= len(node.inputs) or not node.inputs[slot].name:
                    continue
                t = node.inputs[slot]
                src = _constant_source(t)
                key = id(src) if src is not None else id(t)  # ORT merges Identity nodes of one input (CSE)
                if key not in seen:
                    seen.add(key)
                    continue
                if t.name in self.exclude or (src is not None and src.name in self.exclude):
                    stats["skipped_trainable"] = stats.get("skipped_trainable", 0) + 1
                    continue
                if src is None:
                    stats["skipped_not_constant"] = stats.get("skipped_not_constant", 0) + 1
                    continue
                if names is None:
                    names = NameScope(graph)
                base = node.name or node.outputs[0].name or "LayerNormalization"
                value = np.array(const_value(src))
                node.inputs[slot] = gs.Constant(names.fresh(f"{base}_{'scale' if slot == 1 else 'bias'}"), value)
                stats["untied"] = stats.get("untied", 0) + 1
        return PassResult(stats.get("untied", 0) > 0, stats)
