"""MatMul(A, Transpose(B)) [+ C] -> Gemm(A, B[, C], transB=1).

What torch writes for ``nn.Linear`` when it does not fold constants: the
weight stored as [out, in], a Transpose node, a MatMul and an Add.  Folding the
Transpose makes a transposed copy of the weight (memory at compile time, and
the copy stays in the model when the weight is shared); Gemm reads the weight
as stored (``transB=1``), so nothing is copied, and a runtime that does not
optimize (ORT with graph optimizations off) no longer transposes the weight on
every run.  Legal where Gemm's rules hold: A and B of rank 2, float32/float64,
Transpose with perm [1, 0] (or none, on rank 2); the bias as in
``fuse_matmul_add``.  Runs before ``fold_constants`` in the cpu pipeline.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..base import Pass, PassResult
from ..gemm import GEMM_TYPES, gemm_bias_ok
from ..graph import NodeIndex, const_dtype, index_of, io_ids, is_standard, iter_graphs, producer
from ..shapes import TypeMap, infer_types

__all__ = ["FuseTransposedGemm"]


def _plain_transpose(node: gs.Node | None) -> bool:
    if node is None or node.op != "Transpose" or not is_standard(node) or len(node.inputs) != 1:
        return False
    perm = node.attrs.get("perm")
    return perm is None or list(perm) == [1, 0]


class FuseTransposedGemm(Pass):
    name = "fuse_transposed_gemm"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        if graph.opset < 11:  # Gemm without C, and unidirectional broadcasting of C: opset 11
            return PassResult(False, {"skipped_opset": 1})
        tm: TypeMap | None = None
        fused = with_bias = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            alive = NodeIndex(g)
            for mm in list(g.nodes):
                if mm.op != "MatMul" or not is_standard(mm) or len(mm.inputs) != 2 or len(mm.outputs) != 1:
                    continue
                if mm not in alive:
                    continue
                a, bt = mm.inputs
                tr = producer(bt)
                if not _plain_transpose(tr):
                    continue
                b = tr.inputs[0]
                tm = tm or infer_types(graph)
                sa, sb = tm.shape(a), tm.shape(b)
                if sa is None or sb is None or len(sa) != 2 or len(sb) != 2:
                    continue
                dt = tm.dtype(a)
                if dt not in GEMM_TYPES or tm.dtype(b) != dt:
                    continue
                y = mm.outputs[0]
                inputs, dead, out = [a, b], [mm], y
                add = y.outputs[0] if len(y.outputs) == 1 and id(y) not in out_ids else None
                if (add is not None and add.op == "Add" and is_standard(add) and len(add.inputs) == 2
                        and add.inputs[0] is not add.inputs[1] and add in alive):
                    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
                    if gemm_bias_ok(c, sb[0]) and const_dtype(c) == dt:
                        inputs.append(c)
                        dead.append(add)
                        out = add.outputs[0]
                gemm = gs.Node("Gemm", name=mm.name or (dead[-1].name), attrs={"transB": 1}, inputs=inputs,
                               outputs=[])
                for n in dead:
                    n.outputs.clear()
                gemm.outputs = [out]
                g.nodes.insert(index_of(g, mm), gemm)
                alive.add(gemm)
                alive.remove(dead)
                # Dead now: removed at once, so fold_constants never materializes it (a big weight's
                # transposed copy); a Transpose of an outer scope is left to eliminate_dead_code.
                if not tr.outputs[0].outputs and id(tr.outputs[0]) not in out_ids and tr in alive:
                    alive.remove([tr])
                fused += 1
                with_bias += len(inputs) == 3
        return PassResult(fused > 0, {"fused": fused, "with_bias": with_bias} if fused else {})
