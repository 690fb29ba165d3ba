"""fold_constants: evaluation of all-constant nodes, Constant node lowering,
and the size limits that keep "bombs" unfolded (and never materialized)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import FoldConstants
from passes.fold_constants import reference_evaluator
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
TiB = 1 << 40


class CountingEvaluator:
    """The reference evaluator, recording every node it is asked to run."""

    def __init__(self):
        self.ops: list[str] = []

    def __call__(self, model, feeds):
        self.ops.extend(n.op_type for n in model.graph.node)
        return reference_evaluator(model, feeds)


def fold(m, feeds=None, **kw):
    out, (res,) = apply(m, FoldConstants(**kw))
    assert_same_on_ort(m, out, feeds)
    _, (res2,) = apply(out, FoldConstants(**kw))
    assert not res2.modified, f"fold_constants is not idempotent: {res2.stats}"
    return out, res


def test_add_of_initializers_folded():
    m = make_model([H("Add", ["a", "b"], ["c"]), H("Mul", ["x", "c"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])],
                   {"a": f32(2, 3, seed=1), "b": f32(2, 3, seed=2)})
    out, res = fold(m)
    assert ops(out) == ["Mul"]
    assert init_names(out) == ["c"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), f32(2, 3, seed=1) + f32(2, 3, seed=2))
    assert res.stats["folded"] == 1 and res.stats["op_Add"] == 1


def test_chain_folds_in_one_run():
    m = make_model([H("Neg", ["a"], ["b"]), H("Exp", ["b"], ["c"]), H("Sqrt", ["c"], ["d"]), H("Add", ["x", "d"], ["y"])],
                   [vi("x", [4])], [vi("y", [4])], {"a": f32(4)})
    out, res = fold(m)
    assert ops(out) == ["Add"] and init_names(out) == ["d"]
    assert res.stats["folded"] == 3


def test_partially_constant_node_not_folded():
    m = make_model([H("Add", ["x", "a"], ["y"])], [vi("x", [3])], [vi("y", [3])], {"a": f32(3)})
    out, res = fold(m)
    assert ops(out) == ["Add"] and not res.modified


def test_constant_nodes_lowered_to_initializers():
    m = make_model(
        [
            H("Constant", [], ["c1"], value=numpy_helper.from_array(f32(3), "v")),
            H("Constant", [], ["c2"], value_float=2.0),
            H("Constant", [], ["c3"], value_ints=[1, 3]),
            H("Mul", ["x", "c1"], ["t"]),
            H("Add", ["t", "c2"], ["u"]),
            H("Reshape", ["u", "c3"], ["y"]),
        ],
        [vi("x", [3])], [vi("y", [1, 3])],
    )
    out, res = fold(m)
    assert ops(out) == ["Mul", "Add", "Reshape"]
    assert init_names(out) == ["c1", "c2", "c3"]
    assert res.stats["constant_nodes_lowered"] == 3


def test_constant_node_that_is_graph_output_kept():
    m = make_model([H("Constant", [], ["y"], value=numpy_helper.from_array(f32(3), "v"))], [], [vi("y", [3])])
    out, res = fold(m)
    assert ops(out) == ["Constant"] and not res.modified
    assert [o.name for o in out.graph.output] == ["y"]


def test_folded_graph_output_becomes_constant_node_with_same_name():
    m = make_model([H("Neg", ["a"], ["y"]), H("Relu", ["x"], ["z"])], [vi("x", [2])], [vi("y", [3]), vi("z", [2])],
                   {"a": f32(3)})
    out, res = fold(m)
    assert sorted(ops(out)) == ["Constant", "Relu"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert res.stats["folded"] == 1


def test_transpose_of_constant_folded_into_constant():
    w = f32(4, 3)
    m = make_model([H("Transpose", ["w"], ["wt"], perm=[1, 0]), H("MatMul", ["x", "wt"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 4])], {"w": w})
    out, res = fold(m)
    assert ops(out) == ["MatMul"] and init_names(out) == ["wt"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w.T)
    assert res.stats["op_Transpose"] == 1


def test_transpose_of_shared_big_weight_not_copied():
    # The original weight stays alive (another reader), so folding would add
    # a second 8 MiB copy: over the growth limit, skipped.
    w = np.ones((1024, 2048), np.float32)
    m = make_model([H("Transpose", ["w"], ["wt"]), H("MatMul", ["x", "wt"], ["y1"]), H("MatMul", ["x2", "w"], ["y2"])],
                   [vi("x", [1, 1024]), vi("x2", [1, 2048])], [vi("y1", [1, 2048]), vi("y2", [1, 1024])], {"w": w})
    out, res = apply(m, FoldConstants())
    assert "Transpose" in ops(out) and res[0].stats.get("skipped_growth_limit") == 1
    out, res = apply(m, FoldConstants(max_growth_bytes=64 << 20))
    assert "Transpose" not in ops(out)


def test_split_multiple_outputs_folded():
    m = make_model([H("Split", ["a"], ["p", "q"], axis=0, num_outputs=2), H("Add", ["x", "p"], ["s"]),
                    H("Sub", ["s", "q"], ["y"])], [vi("x", [2])], [vi("y", [2])], {"a": f32(4)}, opset=18)
    out, res = fold(m)
    assert ops(out) == ["Add", "Sub"] and init_names(out) == ["p", "q"]


def test_shape_and_cast_of_constant_folded():
    m = make_model([H("Shape", ["a"], ["s"]), H("Cast", ["s"], ["sf"], to=TensorProto.FLOAT), H("Add", ["x", "sf"], ["y"])],
                   [vi("x", [2])], [vi("y", [2])], {"a": f32(5, 7)})
    out, _ = fold(m)
    assert ops(out) == ["Add"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), np.array([5, 7], np.float32))


def test_scalar_result_keeps_rank_zero():
    # Shape -> Slice -> Squeeze -> Unsqueeze -> Concat, as the TorchScript exporter
    # writes GPT-2's view sizes: a folded 0-d Squeeze result must stay 0-d, or the
    # Unsqueeze makes [[32]] and ORT rejects the Concat of ranks 1 and 2.
    m = make_model([H("Squeeze", ["d", "ax"], ["s"]), H("Unsqueeze", ["s", "ax"], ["u"]),
                    H("Concat", ["m1", "u"], ["shape"], axis=0), H("Reshape", ["x", "shape"], ["y"])],
                   [vi("x", [2, 32])], [vi("y", [2, 32])], {"d": I64(32), "ax": I64(0), "m1": I64(-1)})
    out, _ = fold(m)
    assert ops(out) == ["Reshape"]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["shape"], I64(-1, 32))


def test_random_ops_never_folded():
    m = make_model([H("RandomNormalLike", ["a"], ["r"], seed=1.0), H("Add", ["x", "r"], ["y"])],
                   [vi("x", [3])], [vi("y", [3])], {"a": f32(3)})
    out, (res,) = apply(m, FoldConstants())
    assert ops(out) == ["RandomNormalLike", "Add"] and not res.modified


def test_custom_domain_op_never_folded():
    g = helper.make_graph([H("Neg", ["a"], ["b"], domain="my.domain"), H("Add", ["x", "b"], ["y"])], "g",
                          [vi("x", [3])], [vi("y", [3])], [numpy_helper.from_array(f32(3), "a")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    ev = CountingEvaluator()
    out, (res,) = apply(m, FoldConstants(evaluator=ev))
    assert ops(out) == ["Neg", "Add"] and not res.modified and ev.ops == []


def test_evaluator_error_counted_and_graph_unchanged():
    def broken(model, feeds):
        raise RuntimeError("no kernel")

    m = make_model([H("Neg", ["a"], ["b"]), H("Add", ["x", "b"], ["y"])], [vi("x", [3])], [vi("y", [3])], {"a": f32(3)})
    out, (res,) = apply(m, FoldConstants(evaluator=broken))
    assert ops(out) == ["Neg", "Add"] and not res.modified
    assert res.stats["skipped_evaluator_error"] == 1
    assert_same_on_ort(m, out)


# --- bombs ------------------------------------------------------------------
# Each would need at least a terabyte if materialized: if the pass ever
# evaluated one, the test would die of memory.  The counting evaluator shows
# it was never even asked.

def _bomb(nodes, inits, out_shape, feeds_shape=(1,)):
    """``bomb`` feeds an Add with the input: the model is only compiled here,
    never run (ORT would materialize the bomb)."""
    return make_model(nodes + [H("Add", ["x", "bomb"], ["y"])], [vi("x", list(feeds_shape))], [vi("y", out_shape)], inits)


BOMBS = {
    "ConstantOfShape": ([H("ConstantOfShape", ["shape"], ["bomb"], value=numpy_helper.from_array(np.ones(1, np.float32)))],
                        {"shape": I64(1 << 20, 1 << 20)}, [1 << 20, 1 << 20]),
    "Expand": ([H("Expand", ["one", "shape"], ["bomb"])],
               {"one": np.ones(1, np.float32), "shape": I64(1 << 20, 1 << 20)}, [1 << 20, 1 << 20]),
    "Tile": ([H("Tile", ["row", "reps"], ["bomb"])],
             {"row": np.ones((1, 1024), np.float32), "reps": I64(1 << 30, 1)}, [1 << 30, 1024]),
    "Range": ([H("Range", ["start", "limit", "delta"], ["r"]), H("Cast", ["r"], ["bomb"], to=TensorProto.FLOAT)],
              {"start": np.array(0, np.int64), "limit": np.array(1 << 40, np.int64), "delta": np.array(1, np.int64)},
              [1 << 40]),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_bomb_skipped_counted_never_materialized(kind):
    nodes, inits, shape = BOMBS[kind]
    m = _bomb(nodes, inits, shape)
    ev = CountingEvaluator()
    out, (res,) = apply(m, FoldConstants(evaluator=ev))
    bomb_op = nodes[0].op_type
    assert bomb_op not in ev.ops, f"{bomb_op} was handed to the evaluator"
    assert bomb_op in ops(out)
    assert res.stats.get("skipped_size_limit", 0) + res.stats.get("skipped_growth_limit", 0) >= 1, res.stats
    assert out.ByteSize() < 1 << 20


def test_bomb_whose_shape_is_folded_first():
    # Concat of constants folds to the shape; the ConstantOfShape it feeds must not.
    m = make_model([H("Concat", ["d0", "d1"], ["shape"], axis=0),
                    H("ConstantOfShape", ["shape"], ["bomb"], value=numpy_helper.from_array(np.ones(1, np.float32))),
                    H("Add", ["x", "bomb"], ["y"])],
                   [vi("x", [1])], [vi("y", [1 << 21, 1 << 21])], {"d0": I64(1 << 21), "d1": I64(1 << 21)})
    ev = CountingEvaluator()
    out, (res,) = apply(m, FoldConstants(evaluator=ev))
    assert ev.ops == ["Concat"]
    assert ops(out) == ["ConstantOfShape", "Add"]
    assert res.stats["skipped_size_limit"] == 1


def test_moderate_constant_of_shape_obeys_growth_limit():
    # 8 MiB: under the 1 GiB tensor cap, over the default 4 MiB growth limit.
    m = make_model([H("ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.ones(1, np.float32))),
                    H("Mul", ["x", "c"], ["y"])], [vi("x", [2048, 1024])], [vi("y", [2048, 1024])],
                   {"shape": I64(2048, 1024)})
    out, (res,) = apply(m, FoldConstants())
    assert ops(out) == ["ConstantOfShape", "Mul"] and res.stats["skipped_growth_limit"] == 1
    out, res = fold(m, max_growth_bytes=16 << 20)
    assert ops(out) == ["Mul"] and init_names(out) == ["c"]


def test_small_constant_of_shape_folded():
    m = make_model([H("ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.full(1, 3, np.float32))),
                    H("Mul", ["x", "c"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], {"shape": I64(2, 3)})
    out, res = fold(m)
    assert ops(out) == ["Mul"] and res.stats["op_ConstantOfShape"] == 1


def test_not_idempotent_a_fold_skipped_for_growth_fits_once_a_sibling_is_folded():
    # Tile(c) would add 5 MiB while c (1 MiB) has another reader: over the 4 MiB growth
    # limit.  Neg(c), after it in the graph, folds; on the next run c's bytes are freed.
    c = np.ones((256, 1024), np.float32)
    m = make_model([H("Tile", ["c", "r"], ["t"]), H("Neg", ["c"], ["n"]), H("Add", ["x", "n"], ["y1"]),
                    H("ReduceSum", ["t"], ["s"], keepdims=0), H("Add", ["y1", "s"], ["y"])],
                   [vi("x", [256, 1024])], [vi("y", [256, 1024])], {"c": c, "r": np.array([5, 1], np.int64)})
    once, (first,) = apply(m, FoldConstants())
    assert first.stats["op_Neg"] == 1 and first.stats["skipped_growth_limit"] == 1
    twice, (second,) = apply(once, FoldConstants())
    assert second.modified and second.stats["op_Tile"] == 1
    assert not FoldConstants.idempotent
    assert_same_on_ort(m, twice, {"x": f32(256, 1024)})

