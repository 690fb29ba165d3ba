"""Every pass recurses into If, Loop and Scan bodies: each pass gets a body
holding exactly the kind of thing it removes, inside each kind of container."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import (
    DedupeInitializers,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentity,
    EliminateNopOps,
    FoldConstants,
    FoldShapes,
    FuseConvBatchNorm,
    FuseMatMulAdd,
    InlineConstantIf,
)
from tests.helpers import all_ops, apply, assert_same_on_ort, f32, make_model, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
SHAPE = [2, 3]


def _t(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


# Each payload maps body tensor ``src`` [2, 3] to ``dst`` [2, 3]; returns
# (nodes, body initializers, ops that must be gone afterwards).

def p_identity(src, dst):
    return [H("Relu", [src], ["p_a"]), H("Identity", ["p_a"], ["p_b"]), H("Dropout", ["p_b"], [dst])], [], {"Identity", "Dropout"}


def p_nop(src, dst):
    return ([H("Cast", [src], ["p_a"], to=TensorProto.FLOAT), H("Transpose", ["p_a"], ["p_b"], perm=[0, 1]),
             H("Reshape", ["p_b", "p_shape"], ["p_c"]), H("Relu", ["p_c"], [dst])],
            [_t("p_shape", I64(*SHAPE))], {"Cast", "Transpose", "Reshape"})


def p_fold(src, dst):
    return ([H("Constant", [], ["p_c1"], value=_t("p_v1", f32(*SHAPE, seed=5))),
             H("Constant", [], ["p_c2"], value_float=0.5),
             H("Mul", ["p_c1", "p_c2"], ["p_k"]), H("Transpose", ["p_k"], ["p_kt"], perm=[1, 0]),
             H("Transpose", ["p_kt"], ["p_kk"], perm=[1, 0]), H("Add", [src, "p_kk"], [dst])],
            [], {"Constant", "Mul", "Transpose"})


def p_shapes(src, dst):
    return ([H("Shape", [src], ["p_s"]), H("Reshape", [src, "p_s"], ["p_r"]), H("Relu", ["p_r"], [dst])],
            [], {"Shape"})


def p_if(src, dst):
    then_g = helper.make_graph([H("Relu", [src], ["p_t"])], "p_then", [], [vi("p_t", SHAPE)])
    else_g = helper.make_graph([H("Neg", [src], ["p_e"])], "p_else", [], [vi("p_e", SHAPE)])
    return ([H("If", ["p_cond"], ["p_y"], then_branch=then_g, else_branch=else_g), H("Abs", ["p_y"], [dst])],
            [_t("p_cond", np.array(True))], {"Neg"})


def p_dedupe(src, dst):
    w = f32(*SHAPE, seed=7)
    return ([H("Add", [src, "p_w1"], ["p_a"]), H("Mul", ["p_a", "p_w2"], [dst])],
            [_t("p_w1", w), _t("p_w2", w.copy())], set())


def p_cse(src, dst):
    return [H("Relu", [src], ["p_a"]), H("Relu", [src], ["p_b"]), H("Add", ["p_a", "p_b"], [dst])], [], set()


def p_dead(src, dst):
    return [H("Relu", [src], [dst]), H("Exp", [src], ["p_dead"]), H("Neg", ["p_dead"], ["p_dead2"])], [], {"Exp", "Neg"}


def p_conv_bn(src, dst):
    rng = np.random.default_rng(3)
    inits = [_t("p_3d", I64(1, 2, 3)), _t("p_2d", I64(*SHAPE)), _t("p_w", f32(2, 2, 1, seed=8)),
             _t("p_sc", rng.uniform(0.5, 2, 2).astype(np.float32)), _t("p_be", f32(2, seed=9)),
             _t("p_mu", f32(2, seed=10)), _t("p_va", rng.uniform(0.5, 2, 2).astype(np.float32))]
    return ([H("Reshape", [src, "p_3d"], ["p_x3"]), H("Conv", ["p_x3", "p_w"], ["p_c"]),
             H("BatchNormalization", ["p_c", "p_sc", "p_be", "p_mu", "p_va"], ["p_bn"]),
             H("Reshape", ["p_bn", "p_2d"], [dst])], inits, {"BatchNormalization"})


def p_matmul_add(src, dst):
    return ([H("MatMul", [src, "p_w"], ["p_m"]), H("Add", ["p_m", "p_c"], [dst])],
            [_t("p_w", f32(3, 3, seed=11) * 0.3), _t("p_c", f32(3, seed=12))], {"MatMul", "Add"})


CASES = {
    "eliminate_identity": (EliminateIdentity, p_identity),
    "eliminate_nop_ops": (EliminateNopOps, p_nop),
    "fold_constants": (FoldConstants, p_fold),
    "fold_shapes": (FoldShapes, p_shapes),
    "inline_constant_if": (InlineConstantIf, p_if),
    "dedupe_initializers": (DedupeInitializers, p_dedupe),
    "eliminate_common_subexpressions": (EliminateCommonSubexpressions, p_cse),
    "eliminate_dead_code": (EliminateDeadCode, p_dead),
    "fuse_conv_batchnorm": (FuseConvBatchNorm, p_conv_bn),
    "fuse_matmul_add": (FuseMatMulAdd, p_matmul_add),
}


def in_if(payload):
    nodes, inits, gone = payload("x", "p_out")
    then_g = helper.make_graph(nodes, "then", [], [vi("p_out", SHAPE)], inits)
    else_g = helper.make_graph([H("Sin", ["x"], ["e_out"])], "else", [], [vi("e_out", SHAPE)])
    m = make_model([H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", SHAPE), vi("c", [], TensorProto.BOOL)], [vi("y", SHAPE)])
    feeds = [{"x": f32(*SHAPE), "c": np.array(True)}, {"x": f32(*SHAPE), "c": np.array(False)}]
    return m, feeds, gone


def in_loop(payload):
    nodes, inits, gone = payload("v", "p_out")
    body = helper.make_graph(
        nodes + [H("Or", ["cin", "cin"], ["cout"])], "body",
        [vi("i", [], TensorProto.INT64), vi("cin", [], TensorProto.BOOL), vi("v", SHAPE)],
        [vi("cout", [], TensorProto.BOOL), vi("p_out", SHAPE)], inits)
    m = make_model([H("Loop", ["trips", "", "x"], ["y"], body=body)], [vi("x", SHAPE)], [vi("y", SHAPE)],
                   {"trips": np.array(3, np.int64)})
    return m, [{"x": f32(*SHAPE)}], gone


def in_scan(payload):
    nodes, inits, gone = payload("e", "p_out")
    body = helper.make_graph(
        nodes + [H("Max", ["s", "p_out"], ["s_out"])], "body", [vi("s", SHAPE), vi("e", SHAPE)],
        [vi("s_out", SHAPE), vi("p_out", SHAPE)], inits)
    m = make_model([H("Scan", ["s0", "xs"], ["y", "z"], body=body, num_scan_inputs=1)],
                   [vi("s0", SHAPE), vi("xs", [4] + SHAPE)], [vi("y", SHAPE), vi("z", [4] + SHAPE)])
    return m, [{"s0": f32(*SHAPE), "xs": f32(4, *SHAPE, seed=1)}], gone


def body_ops(model):
    return all_ops(model)[1:]  # the container itself is the root's only node


@pytest.mark.parametrize("container", [in_if, in_loop, in_scan], ids=["If", "Loop", "Scan"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_recurses_into_bodies(name, container):
    cls, payload = CASES[name]
    m, feeds, gone = container(payload)
    before = body_ops(m)
    out, (res,) = apply(m, cls())
    assert res.modified, f"{name} did not look inside the {container.__name__[3:]} body: {res.stats}"
    after = body_ops(out)
    assert len(out.graph.node) == 1
    assert not (gone & set(after)), f"{sorted(gone & set(after))} left in {after}"
    assert len(after) < len(before) or name in ("fold_shapes", "dedupe_initializers")
    if name == "dedupe_initializers":
        assert sum(len(a.g.initializer) for a in out.graph.node[0].attribute if a.type == a.GRAPH) == 1
    if name == "fuse_matmul_add":
        assert "Gemm" in after
    for f in feeds:
        assert_same_on_ort(m, out, f, rtol=1e-4, atol=1e-5)
    _, (res2,) = apply(out, cls())
    assert not res2.modified, f"{name} is not idempotent on bodies: {res2.stats}"


# --- outer values read by a body (implicit inputs) ----------------------------

def _if_reading(outer_nodes, body_reads, inits=None):
    then_g = helper.make_graph([H("Relu", [body_reads], ["t_out"])], "then", [], [vi("t_out", SHAPE)])
    else_g = helper.make_graph([H("Sin", ["x"], ["e_out"])], "else", [], [vi("e_out", SHAPE)])
    return make_model(outer_nodes + [H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                      [vi("x", SHAPE), vi("c", [], TensorProto.BOOL)], [vi("y", SHAPE)], inits or {})


FEEDS = [{"x": f32(*SHAPE), "c": np.array(True)}, {"x": f32(*SHAPE), "c": np.array(False)}]


@pytest.mark.parametrize(
    "name,outer,reads,inits,outer_after",
    [
        ("eliminate_identity", [H("Abs", ["x"], ["a"]), H("Identity", ["a"], ["b"])], "b", None, ["Abs", "If"]),
        ("eliminate_dead_code", [H("Abs", ["x"], ["a"])], "a", None, ["Abs", "If"]),
        ("fold_constants", [H("Neg", ["w"], ["a"]), H("Add", ["x", "a"], ["b"])], "b", {"w": f32(*SHAPE)}, ["Add", "If"]),
        ("eliminate_nop_ops", [H("Abs", ["x"], ["a"]), H("Cast", ["a"], ["b"], to=TensorProto.FLOAT)], "b", None,
         ["Abs", "If"]),
    ],
)
def test_outer_value_read_only_inside_body(name, outer, reads, inits, outer_after):
    cls = CASES[name][0]
    m = _if_reading(outer, reads, inits)
    out, _ = apply(m, cls())
    assert [n.op_type for n in out.graph.node] == outer_after
    for f in FEEDS:
        assert_same_on_ort(m, out, f)


def test_cse_merges_outer_duplicate_read_inside_body():
    m = _if_reading([H("Abs", ["x"], ["a"]), H("Abs", ["x"], ["b"]), H("Add", ["a", "x"], ["unused"])], "b")
    m.graph.output.append(vi("unused", SHAPE))
    out, (res,) = apply(m, EliminateCommonSubexpressions())
    assert [n.op_type for n in out.graph.node].count("Abs") == 1 and res.stats == {"merged": 1}
    for f in FEEDS:
        assert_same_on_ort(m, out, f)


def test_folded_constant_read_by_both_branches_stored_once():
    # Both branches read w; folding Neg(w0) must leave one w in the outer
    # graph, not a copy of it in each branch.
    then_g = helper.make_graph([H("Add", ["x", "w"], ["t_out"])], "then", [], [vi("t_out", SHAPE)])
    else_g = helper.make_graph([H("Mul", ["x", "w"], ["e_out"])], "else", [], [vi("e_out", SHAPE)])
    m = make_model([H("Neg", ["w0"], ["w"]), H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", SHAPE), vi("c", [], TensorProto.BOOL)], [vi("y", SHAPE)], {"w0": f32(*SHAPE)})
    out, _ = apply(m, FoldConstants())
    assert [n.op_type for n in out.graph.node] == ["If"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    for a in out.graph.node[0].attribute:
        assert [t.name for t in a.g.initializer] == []
    for f in FEEDS:
        assert_same_on_ort(m, out, f)
