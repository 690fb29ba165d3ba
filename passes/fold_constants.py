"""Constant folding: evaluate nodes whose inputs are all constants.

The evaluator is onnx's reference implementation by default (the driver may
pass another, e.g. ONNX Runtime on the single node).  With the default, the
common ops are computed by ``fold_numpy`` first (the same numpy calls as the
reference, without a one-node model, a fresh evaluator per node or the import
of ``onnx.reference``); a form it does not handle goes to the reference.
Every fold is sized *before* it is evaluated: a fold that would create a tensor over
``max_output_bytes``, or grow the model by more than ``max_growth_bytes``
(ConstantOfShape/Expand/Tile/Range "bombs", a transposed copy of a shared
weight), is skipped and counted, never materialized.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .base import Pass, PassResult
from .fold_numpy import evaluate as numpy_evaluate
from .graph import (
    NONDETERMINISTIC_OPS,
    const_shape,
    const_value,
    has_subgraphs,
    io_ids,
    is_const,
    is_standard,
    iter_graphs,
    remove_nodes,
    replace_uses,
)
from .gs_adapter import export_node
from .shapes import TypeMap, infer_types, replace_with_constant
from .tensors import const_nbytes

__all__ = ["GiB", "MiB", "Evaluator", "FoldConstants", "reference_evaluator"]

Evaluator = Callable[[onnx.ModelProto, dict[str, np.ndarray]], Sequence[np.ndarray]]

MiB = 1 << 20
GiB = 1 << 30

# Output is at most as large as the largest input.
_NON_EXPANDING = frozenset(
    """Abs Acos Acosh Asin Asinh Atan Atanh Cast CastLike Ceil Clip Cos Cosh Erf Exp Flatten Floor Identity
    IsInf IsNaN LeakyRelu Log LogSoftmax Neg Not Reciprocal Relu Reshape Round Selu Sigmoid Sign Sin Sinh
    Softmax Softplus Softsign Sqrt Squeeze Tan Tanh Transpose Unsqueeze Slice ReduceSum ReduceMean ReduceMax
    ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare ArgMax ArgMin
    CumSum HardSigmoid HardSwish Elu Celu Gelu Mish Shrink ThresholdedRelu Shape Size Split""".split()
)
_BROADCASTING = frozenset(
    """Add Sub Mul Div Pow Mod And Or Xor Equal Less LessOrEqual Greater GreaterOrEqual Max Min Sum Mean
    Where BitShift BitwiseAnd BitwiseOr BitwiseXor PRelu""".split()
)
# Never folded: not a pure function of the inputs, or not a plain tensor.
_NEVER = NONDETERMINISTIC_OPS | frozenset(
    """Constant SequenceConstruct SequenceEmpty SequenceInsert SequenceAt SequenceErase SequenceLength
    SplitToSequence ConcatFromSequence Optional OptionalGetElement OptionalHasElement If Loop Scan""".split()
)


def reference_evaluator(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    # inf/nan are the op's results (as ORT computes them): numpy's RuntimeWarnings about
    # them are noise on the user's stderr
    with np.errstate(all="ignore"):
        return list(ReferenceEvaluator(model).run(None, feeds))


def _itemsize(t: gs.Tensor, tm: TypeMap) -> int:
    dt = tm.dtype(t)
    return dt.itemsize if dt is not None and dt.itemsize else 8


def _numel_upper_bound(node: gs.Node, tm: TypeMap, out: gs.Tensor) -> int | None:
    """Elements ``out`` will have, from inference or from the op's own rule."""
    s = tm.static_shape(out)
    if s is not None:
        return math.prod(s)
    # Values only of the small inputs that carry shapes/counts; sizes from shapes.
    vals = [const_value(t) if t.name and const_nbytes(t) <= 1 << 16 else None for t in node.inputs]
    shapes = [const_shape(t) for t in node.inputs if t.name]
    op = node.op
    try:
        if op in _NON_EXPANDING:
            return max((math.prod(s) for s in shapes), default=0)
        if op == "Concat":
            return sum(math.prod(s) for s in shapes)
        if op in _BROADCASTING:
            return math.prod(np.broadcast_shapes(*shapes))
        if op == "ConstantOfShape":
            return math.prod(int(d) for d in vals[0].ravel())
        if op == "Expand":
            target = [int(d) for d in vals[1].ravel()]
            if any(d < 0 for d in target):
                return None
            return math.prod(np.broadcast_shapes(shapes[0], tuple(target)))
        if op == "Tile":
            return math.prod(shapes[0]) * math.prod(int(r) for r in vals[1].ravel())
        if op == "Range":
            start, limit, delta = (float(v.ravel()[0]) for v in vals[:3])
            return max(int(math.ceil((limit - start) / delta)), 0) if delta else None
        if op == "Gather":
            data, ind = shapes[0], shapes[1]
            axis = node.attrs.get("axis", 0) % max(len(data), 1)
            return math.prod(ind) * math.prod(data) // max(data[axis], 1)
        if op == "MatMul":
            a, b = shapes
            if len(a) >= 2 and len(b) >= 2:
                batch = np.broadcast_shapes(a[:-2], b[:-2])
                return math.prod(batch) * a[-2] * b[-1]
    except (ValueError, OverflowError, ZeroDivisionError, IndexError, TypeError, AttributeError):
        return None
    return None


def _constant_attr_value(node: gs.Node) -> np.ndarray | None:
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        v = const_value(a["value"])
        return None if v.dtype == object else v
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    return None


class FoldConstants(Pass):
    name = "fold_constants"
    # A fold skipped for growth may fit on the next run: once another reader of
    # its input has been folded, the input's bytes count as freed.
    idempotent = False

    def __init__(
        self,
        *,
        max_output_bytes: int = 1 * GiB,
        max_growth_bytes: int = 4 * MiB,
        max_total_bytes: int | None = None,
        evaluator: Evaluator | None = None,
    ):
        self.max_output_bytes = max_output_bytes
        self.max_growth_bytes = max_growth_bytes
        # Bytes all folds of this pass object (one compile) may allocate
        # together; None: no total bound, only the per-fold ones.
        self.max_total_bytes = max_total_bytes
        self.allocated = 0
        self.evaluator = evaluator or reference_evaluator

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {"folded": 0, "constant_nodes_lowered": 0}
        lowered = self._lower_constant_nodes(graph)
        stats["constant_nodes_lowered"] = lowered
        tm = infer_types(graph)
        if tm.error:
            stats["inference_failed"] = 1
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            dead: list[gs.Node] = []  # folded nodes, detached at once, dropped from g.nodes in one sweep
            for node in list(g.nodes):
                reason = self._try_fold(graph, g, node, tm, out_ids, stats, dead)
                if reason is not None:
                    stats["skipped_" + reason] = stats.get("skipped_" + reason, 0) + 1
            if dead:
                remove_nodes(g, dead)
        return PassResult(stats["folded"] > 0 or lowered > 0, stats)

    def _lower_constant_nodes(self, graph: gs.Graph) -> int:
        n = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            dead: list[gs.Node] = []
            for node in list(g.nodes):
                if node.op != "Constant" or not is_standard(node) or len(node.outputs) != 1:
                    continue
                out = node.outputs[0]
                if id(out) in out_ids:
                    continue
                value = _constant_attr_value(node)
                if value is None:
                    continue
                replace_uses(out, gs.Constant(out.name, value))
                node.inputs.clear()
                node.outputs.clear()
                dead.append(node)
                n += 1
            if dead:  # one sweep per graph: removing each node from the list as found is quadratic
                remove_nodes(g, dead)
        return n

    def _try_fold(self, root, g, node, tm: TypeMap, out_ids, stats, dead: list) -> str | None:
        """Fold ``node`` in place; returns None when folded or not a candidate,
        else the reason the candidate was skipped.  A folded node is detached
        (no inputs, no outputs) and appended to ``dead``; the caller drops it
        from ``g.nodes``."""
        if not is_standard(node) or node.op in _NEVER or has_subgraphs(node):
            return None
        live_inputs = [t for t in node.inputs if t.name]
        if not live_inputs or not all(is_const(t) for t in live_inputs):
            return None
        outs = [t for t in node.outputs if t.name]
        if not outs:
            return None
        if len(outs) > 1 and any(id(t) in out_ids for t in outs):
            return "graph_output"
        # Size the fold before running it.
        out_bytes = 0
        for out in outs:
            numel = _numel_upper_bound(node, tm, out)
            if numel is None:
                return "unknown_size"
            out_bytes += numel * _itemsize(out, tm)
        if out_bytes > self.max_output_bytes:
            return "size_limit"
        freed = sum(const_nbytes(t) for t in live_inputs if len(t.outputs) == 1)
        if out_bytes > freed and out_bytes - freed > self.max_growth_bytes:
            return "growth_limit"
        if self.max_total_bytes is not None and self.allocated + out_bytes > self.max_total_bytes:
            return "memory_limit"
        self.allocated += out_bytes
        try:
            results = self._evaluate(root, node)
        except Exception:  # an op the evaluator cannot run: counted, left as is
            return "evaluator_error"
        if len(results) < len(node.outputs):
            return "evaluator_error"
        for out, value in zip(node.outputs, results):
            if not out.name:
                continue
            if not isinstance(value, np.ndarray) or value.dtype == object:
                return "not_a_tensor"
            expected = tm.dtype(out)
            if expected is not None and value.dtype != expected:
                return "dtype_mismatch"
            if value.nbytes > max(out_bytes, 1) and value.nbytes > self.max_output_bytes:
                return "size_limit"
        # np.require, not np.ascontiguousarray: that one turns a 0-d result into shape (1,)
        folded = [(out, np.require(v, requirements="C")) for out, v in zip(node.outputs, results) if out.name]
        if len(folded) == 1:
            if replace_with_constant(g, node, folded[0][0], folded[0][1], remove=False):
                dead.append(node)
        else:
            for out, v in folded:
                replace_uses(out, gs.Constant(out.name, v))
            node.inputs.clear()
            node.outputs.clear()
            dead.append(node)
        stats["folded"] += 1
        key = "op_" + node.op
        stats[key] = stats.get(key, 0) + 1
        return None

    def _evaluate(self, root: gs.Graph, node: gs.Node) -> list[np.ndarray]:
        if self.evaluator is reference_evaluator:
            results = _evaluate_numpy(root, node)
            if results is not None:
                return results
        proto = export_node(node)
        feeds: dict[str, np.ndarray] = {}
        inputs = []
        for t in node.inputs:
            if t.name and t.name not in feeds:
                v = const_value(t)
                feeds[t.name] = v
                inputs.append(helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        outputs = [helper.make_empty_tensor_value_info(o) for o in proto.output if o]
        g = helper.make_graph([proto], "fold", inputs, outputs)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", root.opset)], ir_version=root.ir_version or 10)
        return list(self.evaluator(model, feeds))


def _evaluate_numpy(root: gs.Graph, node: gs.Node) -> list[np.ndarray] | None:
    """``node``'s outputs from ``fold_numpy`` (the reference's own numpy calls),
    or None where it does not handle the node's form (or fails on it: the
    reference then decides)."""
    if node.domain not in (None, "") or len(node.outputs) != 1:
        return None
    attrs = {}
    for k, v in node.attrs.items():
        # tensors as the reference reads them back; other kinds are refused there
        attrs[k] = const_value(v) if isinstance(v, gs.Constant) else v
    inputs = [const_value(t) if t.name else None for t in node.inputs]
    try:
        return numpy_evaluate(node.op, root.opset, attrs, inputs)
    except Exception:  # e.g. a shape numpy rejects: the reference runs it and reports its own error
        return None
