"""Cast to the type its input always has, by the producing op's schema.

``eliminate_nop_ops`` removes a Cast whose input type shape inference knows.
Inference knows nothing past some ops (ai.onnx.ml's SVMClassifier,
TreeEnsemble..., whose outputs skl2onnx then casts to float "to be sure"),
but their schemas fix the output type: ``Z: tensor(float)``, or a type
parameter allowed exactly one type.  Such a Cast is the identity.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import defs

from .base import Pass, PassResult
from .graph import bypass, producer, walk_nodes

__all__ = ["EliminateSchemaTypedCasts"]

_TYPES = {f"tensor({onnx.helper.tensor_dtype_to_string(v)[len('TensorProto.'):].lower()})": v
          for v in onnx.TensorProto.DataType.values() if v}


def _fixed_output_type(node: gs.Node, index: int, versions: dict[str, int]) -> int | None:
    domain = node.domain or ""
    version = versions.get("" if domain == "ai.onnx" else domain)
    if version is None:
        return None
    try:
        schema = defs.get_schema(node.op, version, domain)
    except Exception:  # noqa: BLE001 - unknown op / domain: nothing is known
        return None
    outs = schema.outputs
    if not outs:
        return None
    formal = outs[min(index, len(outs) - 1)]
    if index >= len(outs) and formal.option != defs.OpSchema.FormalParameterOption.Variadic:
        return None
    allowed = [formal.type_str]
    for c in schema.type_constraints:
        if c.type_param_str == formal.type_str:
            allowed = list(c.allowed_type_strs)
    return _TYPES.get(allowed[0]) if len(allowed) == 1 else None


class EliminateSchemaTypedCasts(Pass):
    name = "eliminate_schema_typed_casts"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        versions = {(d.domain or ""): d.version for d in graph.import_domains or []}
        versions.setdefault("", graph.opset)
        removed = 0
        for g, node in walk_nodes(graph):
            if node.op != "Cast" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            src = node.inputs[0]
            prod = producer(src)
            if prod is None or not src.name:
                continue
            index = next(i for i, t in enumerate(prod.outputs) if t is src)
            if _fixed_output_type(prod, index, versions) == node.attrs.get("to"):
                if bypass(g, node, src, node.outputs[0]):
                    removed += 1
        return PassResult(removed > 0, {"removed": removed} if removed else {})
