"""MatMul(A, B) + C -> Gemm(A, B, C) where Gemm's rules make it legal:
A and B of rank 2, float types, C unidirectionally broadcastable to [M, N]."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..base import Pass, PassResult
from ..gemm import GEMM_TYPES, gemm_bias_ok
from ..graph import NodeIndex, const_dtype, index_of, io_ids, is_standard, iter_graphs
from ..shapes import TypeMap, infer_types

__all__ = ["FuseMatMulAdd"]


class FuseMatMulAdd(Pass):
    name = "fuse_matmul_add"

    def call(self, graph: gs.Graph) -> PassResult:
        if graph.opset < 11:
            return PassResult(False, {"skipped_opset": 1})
        tm: TypeMap | None = None
        fused = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            alive = NodeIndex(g)
            for mm in list(g.nodes):
                if mm.op != "MatMul" or not is_standard(mm) or len(mm.inputs) != 2:
                    continue
                y = mm.outputs[0]
                if len(y.outputs) != 1 or id(y) in out_ids:
                    continue
                add = y.outputs[0]
                if add.op != "Add" or not is_standard(add) or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
                    continue
                if add not in alive:
                    continue
                c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
                tm = tm or infer_types(graph)
                a, b = mm.inputs
                sa, sb = tm.shape(a), tm.shape(b)
                if sa is None or sb is None or len(sa) != 2 or len(sb) != 2:
                    continue
                if tm.dtype(a) not in GEMM_TYPES or tm.dtype(b) != tm.dtype(a):
                    continue
                if not gemm_bias_ok(c, sb[1]) or const_dtype(c) != tm.dtype(a):
                    continue
                out = add.outputs[0]
                gemm = gs.Node("Gemm", name=mm.name or add.name, inputs=[a, b, c], outputs=[])
                add.inputs.clear()
                add.outputs.clear()
                gemm.outputs = [out]
                g.nodes.insert(index_of(g, mm), gemm)
                alive.add(gemm)
                alive.remove([mm, add])
                fused += 1
        return PassResult(fused > 0, {"fused": fused})
