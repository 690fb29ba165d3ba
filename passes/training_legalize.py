"""Legalization for ONNX Runtime training's gradient builder (ORT 1.19.2).

The inference graph is unchanged (the added outputs are unused, the added
bias is zero); the edits only give ORT's gradient builders the operands they
index unconditionally:

- ``LayerNormalizationGrad`` reads the forward node's Mean and InvStdDev
  outputs (``O(1)``, ``O(2)``); torch's opset-17 export writes only ``Y``, and
  the builder then fails with ``gradient_builder_base.h ... OutputDefs().size()``
  (onnxruntime issues 22465, 19038).
- it also emits a gradient for input 2 (``GI(2)``), so a LayerNormalization
  without its optional bias fails with ``... InputDefs().size()``.

- ``LayerNormalizationGrad`` names its scale/bias gradients after the input
  tensors and emits them even for frozen ones, so LayerNormalization nodes
  sharing a scale (torch writes one initializer plus Identity nodes for equal
  parameters, e.g. a freshly initialized model) define ``<name>_grad`` twice.

The passes visit the top-level graph and every If/Loop/Scan body (ORT has no
gradient for control flow, but the edit is harmless there and keeps the
passes simple to state).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, const_dtype, const_shape, const_value, is_const, is_standard, iter_graphs


def _is_layernorm(node: gs.Node) -> bool:
    return node.op == "LayerNormalization" and (is_standard(node) or node.domain == "com.microsoft")


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
        for g in iter_graphs(graph):
            for node in g.nodes:
                if not _is_layernorm(node) or not node.inputs or not node.outputs:
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
        for g in iter_graphs(graph):
            for node in g.nodes:
                if not _is_layernorm(node):
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


class AddLayerNormBias(Pass):
    """Every LayerNormalization without its optional bias gets a zero bias
    (same shape and type as its scale).  Skipped, and counted as
    ``skipped_unknown_scale``, when the scale is not a constant."""

    name = "add_layernorm_bias"

    def call(self, graph: gs.Graph) -> PassResult:
        names: NameScope | None = None
        stats: dict[str, int] = {}
        for g in iter_graphs(graph):
            for node in g.nodes:
                if not _is_layernorm(node) or len(node.inputs) < 2:
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
