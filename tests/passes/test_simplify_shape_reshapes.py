"""simplify_shape_reshapes: Reshapes to shapes computed from Shape ops that are
no-ops (removed), ``[dim 0, -1]`` flattens (Flatten) or copy dims in place
(a constant target with 0s), proved for every binding of the symbolic dims;
near misses are left alone."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from passes import EliminateDeadCode, SimplifyShapeReshapes
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)


def run(m, feeds):
    """The pass then dead-code removal, checked on ORT for every feed (two
    bindings of the symbolic dims at least) and for idempotence."""
    out, (res, _) = apply(m, SimplifyShapeReshapes(), EliminateDeadCode())
    for feed in feeds:
        assert_same_on_ort(m, out, feed)
    _, (res2,) = apply(out, SimplifyShapeReshapes())
    assert not res2.modified, "simplify_shape_reshapes is not idempotent"
    return out, res


def dim_of(t, i, tag):
    """torch's ``t.size(i)`` as a 1-element shape piece: Unsqueeze(Gather(Shape(t), i))."""
    return [H("Shape", [t], [f"{tag}_s"]),
            H("Constant", [], [f"{tag}_i"], value=numpy_helper.from_array(np.array(i, np.int64), f"{tag}_iv")),
            H("Gather", [f"{tag}_s", f"{tag}_i"], [f"{tag}_g"], axis=0),
            H("Unsqueeze", [f"{tag}_g", "ax0"], [tag])]


def reshape_model(data_shape, pieces_nodes, parts, out_shape, extra_inputs=(), inits=None, post=True, **kw):
    """x -> Abs -> a -> Reshape(a, Concat(parts)) -> r -> Neg -> y (or r = y when not ``post``)."""
    out = "r" if post else "y"
    nodes = [H("Abs", ["x"], ["a"]), *pieces_nodes, H("Concat", parts, ["target"], axis=0),
             H("Reshape", ["a", "target"], [out], **kw)]
    if post:
        nodes.append(H("Neg", ["r"], ["y"]))
    inits = {"ax0": I64(0), "m1": I64(-1), **(inits or {})}
    return make_model(nodes, [vi("x", data_shape), *extra_inputs], [vi("y", out_shape)], inits)


def feeds(*shapes, z=None):
    out = []
    for k, s in enumerate(shapes):
        f = {"x": f32(*s, seed=k)}
        if z is not None:
            f["z"] = f32(*z[k], seed=10 + k)
        out.append(f)
    return out


def test_view_batch_minus_one_on_rank_2_removed():
    m = reshape_model(["N", 6], dim_of("a", 0, "d0"), ["d0", "m1"], ["N", 6])
    out, res = run(m, feeds((2, 6), (5, 6)))
    assert ops(out) == ["Abs", "Neg"] and res.stats == {"noop": 1}


def test_noop_from_another_tensor_with_same_symbolic_dims():
    # z's dims N and 4 are the data's dims 0 and 2; the -1 is then forced to be 3.
    z = vi("z", ["N", 4])
    pieces = dim_of("z", 0, "d0") + dim_of("z", 1, "d2")
    m = reshape_model(["N", 3, 4], pieces, ["d0", "m1", "d2"], ["N", 3, 4], extra_inputs=[z])
    out, res = run(m, feeds((2, 3, 4), (5, 3, 4), z=[(2, 4), (5, 4)]))
    assert ops(out) == ["Abs", "Neg"] and res.stats == {"noop": 1}


def test_noop_from_slice_of_shape_and_shape_start():
    # Slice(Shape(a), 1, 3) and Shape(a, start=3) give dims 1..3; dim 0 is the -1.
    pieces = [H("Shape", ["a"], ["s"]), H("Slice", ["s", "one", "three"], ["mid"]),
              H("Shape", ["a"], ["tail"], start=3)]
    m = reshape_model(["N", "C", 4, 5], pieces, ["m1", "mid", "tail"], ["N", "C", 4, 5],
                      inits={"one": I64(1), "three": I64(3)})
    out, res = run(m, feeds((2, 3, 4, 5), (1, 2, 4, 5)))
    assert ops(out) == ["Abs", "Neg"] and res.stats == {"noop": 1}


def test_flatten_of_batch_view():
    m = reshape_model(["N", 3, 4, 5], dim_of("a", 0, "d0"), ["d0", "m1"], ["N", 60])
    out, res = run(m, feeds((2, 3, 4, 5), (7, 3, 4, 5)))
    assert ops(out) == ["Abs", "Flatten", "Neg"] and res.stats == {"flatten": 1}
    assert out.graph.node[1].attribute[0].i == 1


def test_flatten_when_batch_is_read_from_an_equal_symbolic_dim():
    z = vi("z", ["N", 2])
    m = reshape_model(["N", 3, 4], dim_of("z", 0, "d0"), ["d0", "m1"], ["N", 12], extra_inputs=[z])
    out, res = run(m, feeds((2, 3, 4), (5, 3, 4), z=[(2, 2), (5, 2)]))
    assert ops(out) == ["Abs", "Flatten", "Neg"] and res.stats == {"flatten": 1}


def test_different_symbolic_dims_left_alone():
    # x is [a, 6], z is [b, 6]: Reshape(x, [b, -1]) really reshapes when a != b.
    z = vi("z", ["b", 6])
    m = reshape_model(["a", 6], dim_of("z", 0, "d0"), ["d0", "m1"], ["b", None], extra_inputs=[z])
    out, res = run(m, feeds((2, 6), (3, 6), z=[(3, 6), (1, 6)]))
    assert "Reshape" in ops(out) and not res.modified


def test_minus_one_absorbing_two_dims_is_no_noop():
    # [N, 3, 4, 5] -> [N, -1, 5]: the -1 is 12, not a dim of the data; the Reshape stays ([0, -1, 5]).
    m = reshape_model(["N", 3, 4, 5], dim_of("a", 0, "d0"), ["d0", "m1", "five"], ["N", 12, 5],
                      inits={"five": I64(5)})
    out, res = run(m, feeds((2, 3, 4, 5), (4, 3, 4, 5)))
    assert ops(out) == ["Abs", "Reshape", "Neg"] and res.stats == {"zero_copied_dims": 1}
    assert targets(out) == [[0, -1, 5]]


def targets(m):
    """The constant target shapes of m's Reshapes (None: computed)."""
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer}
    return [inits.get(n.input[1]) for n in m.graph.node if n.op_type == "Reshape"]


def test_dims_copied_in_place_become_zeros():
    # y.reshape(y.shape[0], y.shape[1], -1) on [N, 4, 6, 6] -> Reshape(y, [0, 0, -1]); the Shape chain dies.
    m = reshape_model(["N", 4, 6, 6], dim_of("a", 0, "d0") + dim_of("a", 1, "d1"), ["d0", "d1", "m1"],
                      ["N", 4, 36])
    out, res = run(m, feeds((2, 4, 6, 6), (5, 4, 6, 6)))
    assert ops(out) == ["Abs", "Reshape", "Neg"] and res.stats == {"zero_copied_dims": 1}
    assert targets(out) == [[0, 0, -1]]


def test_split_and_merge_heads():
    # TorchScript's x.view(x.size(0), x.size(1), 12, 32) (sizes read from the graph input x, same
    # dim_params as the data) and, after permutes, u.view(u.size()[:2] + (384,)) read from u itself.
    nodes = [*dim_of("x", 0, "b"), *dim_of("x", 1, "s"), H("Concat", ["b", "s", "h", "d"], ["t0"], axis=0),
             H("Abs", ["x"], ["a"]), H("Reshape", ["a", "t0"], ["q"]),
             H("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]), H("Softmax", ["qt"], ["p"], axis=-1),
             H("Transpose", ["p"], ["u"], perm=[0, 2, 1, 3]), H("Shape", ["u"], ["us"]),
             H("Slice", ["us", "zero", "two"], ["bs"]), H("Concat", ["bs", "e"], ["t1"], axis=0),
             H("Reshape", ["u", "t1"], ["r"]), H("Neg", ["r"], ["y"])]
    inits = {"ax0": I64(0), "h": I64(12), "d": I64(32), "e": I64(384), "zero": I64(0), "two": I64(2)}
    m = make_model(nodes, [vi("x", ["B", "S", 384])], [vi("y", ["B", "S", 384])], inits)
    out, res = run(m, [{"x": f32(2, 5, 384, seed=1)}, {"x": f32(3, 1, 384, seed=2)}, {"x": f32(0, 4, 384)}])
    assert ops(out) == ["Abs", "Reshape", "Transpose", "Softmax", "Transpose", "Reshape", "Neg"]
    assert targets(out) == [[0, 0, 12, 32], [0, 0, 384]] and res.stats == {"zero_copied_dims": 2}


@pytest.mark.parametrize("case", ["swapped", "other_position_dim_param", "one_unproved", "allowzero"])
def test_dims_not_copied_in_place_left_alone(case):
    # data [N, C, D]; only a piece equal to the data's dim at the SAME index may become a 0.
    kw, extra, z, inits = {}, [], None, None
    pieces, parts = dim_of("a", 0, "d0") + dim_of("a", 2, "d2") + dim_of("a", 1, "d1"), ["d0", "d2", "d1"]
    out_shape = ["N", "D", "C"]
    if case == "other_position_dim_param":  # z's only dim is D: at index 1 it is not the data's C
        extra, z = [vi("z", ["D"])], [(4,), (6,)]
        pieces, parts, out_shape = dim_of("a", 0, "d0") + dim_of("z", 0, "zd"), ["d0", "zd", "m1"], ["N", "D", None]
    elif case == "one_unproved":  # index 0 is proved, z's dim at index 1 is not: nothing gained, left
        extra, z = [vi("z", [None])], [(3,), (2,)]
        pieces, parts, out_shape = dim_of("a", 0, "d0") + dim_of("z", 0, "zd"), ["d0", "zd", "m1"], ["N", None, None]
    elif case == "allowzero":  # a 0 would be a literal 0
        pieces, parts = dim_of("a", 0, "d0") + dim_of("a", 1, "d1"), ["d0", "d1", "m1", "one"]
        out_shape = ["N", "C", "D", 1]
        kw, inits = {"allowzero": 1}, {"one": I64(1)}
    m = reshape_model(["N", "C", "D"], pieces, parts, out_shape, extra_inputs=extra, inits=inits, **kw)
    out, res = run(m, feeds((2, 3, 4), (5, 2, 6), z=z))
    assert targets(out) == [None] and not res.modified


@pytest.mark.parametrize("case", ["unknown_dim", "allowzero", "dim1_first", "two_minus_ones"])
def test_near_misses_left_alone(case):
    kw, parts, pieces, shape, out_shape = {}, ["d0", "m1"], dim_of("a", 0, "d0"), ["N", 3, 4], ["N", 12]
    extra, z_shapes = [], None
    if case == "unknown_dim":  # z's first dim has no name: nothing proves it is N
        extra, z_shapes = [vi("z", [None, 2])], [(2, 2), (6, 2)]
        pieces = dim_of("z", 0, "d0")
    elif case == "allowzero":
        kw = {"allowzero": 1}
    elif case == "dim1_first":  # [dim 1, -1] is not a flatten of dim 0
        pieces, out_shape = dim_of("a", 1, "d0"), [3, None]
    elif case == "two_minus_ones":  # invalid target: the original fails, nothing to prove
        parts = ["d0", "m1", "m1"]
    m = reshape_model(shape, pieces, parts, out_shape, extra_inputs=extra, **kw)
    if case == "two_minus_ones":
        out, (res,) = apply(m, SimplifyShapeReshapes())
    else:
        out, res = run(m, feeds((2, 3, 4), (6, 3, 4), z=z_shapes))
    assert "Reshape" in ops(out) and not res.modified


def test_graph_output_reshape_keeps_its_name():
    m = reshape_model(["N", 6], dim_of("a", 0, "d0"), ["d0", "m1"], ["N", 6], post=False)
    out, res = run(m, feeds((2, 6), (3, 6)))
    assert ops(out) == ["Abs"] and [o.name for o in out.graph.output] == ["y"]
    assert out.graph.node[0].output[0] == "y" and res.stats == {"noop": 1}


def test_graph_input_to_graph_output_becomes_identity():
    nodes = [*dim_of("x", 0, "d0"), H("Concat", ["d0", "m1"], ["target"], axis=0), H("Reshape", ["x", "target"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 6])], {"ax0": I64(0), "m1": I64(-1)})
    out, res = run(m, feeds((2, 6), (3, 6)))
    assert ops(out) == ["Identity"] and res.stats == {"identity": 1}


def test_opset_11_unsqueeze_attribute_and_no_concat():
    # Unsqueeze(axes=[0]) of Gather(Shape(a), 0), read directly as a 1-element target.
    nodes = [H("Abs", ["x"], ["a"]), H("Shape", ["a"], ["s"]), H("Gather", ["s", "i1"], ["g"], axis=0),
             H("Unsqueeze", ["g"], ["t"], axes=[0]), H("Reshape", ["a", "t"], ["r"]), H("Neg", ["r"], ["y"])]
    m = make_model(nodes, [vi("x", ["N"])], [vi("y", ["N"])], {"i1": np.array(0, np.int64)}, opset=11)
    out, res = run(m, feeds((3,), (5,)))
    assert ops(out) == ["Abs", "Neg"] and res.stats == {"noop": 1}


def torchscript_cnn_head():
    """What torch's TorchScript exporter writes for GlobalAveragePool ->
    x.view(x.size(0), -1) -> Linear -> .view(x.size(0), -1), batch dynamic."""
    nodes = [H("GlobalAveragePool", ["x"], ["p"]), *dim_of("p", 0, "u0"),
             H("Constant", [], ["c1"], value=numpy_helper.from_array(I64(-1), "c1v")),
             H("Concat", ["u0", "c1"], ["t0"], axis=0), H("Reshape", ["p", "t0"], ["f"]),
             H("Gemm", ["f", "w", "b"], ["g"], transB=1), *dim_of("f", 0, "u1"),
             H("Concat", ["u1", "c1"], ["t1"], axis=0), H("Reshape", ["g", "t1"], ["y"])]
    return make_model(nodes, [vi("x", ["batch", 8, 4, 4])], [vi("y", ["batch", 10])],
                      {"ax0": I64(0), "w": f32(10, 8, seed=1), "b": f32(10, seed=2)})
