"""eliminate_nop_ops: ops that return their input unchanged, and near misses
that look alike but change the value, shape or type."""

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes import EliminateNopOps
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
BIG = np.iinfo(np.int64).max


def run(m, feeds=None):
    out, (res,) = apply(m, EliminateNopOps())
    assert_same_on_ort(m, out, feeds)
    _, (res2,) = apply(out, EliminateNopOps())
    assert not res2.modified, "eliminate_nop_ops is not idempotent"
    return out, res


def wrap(node, in_shape, out_shape, inits=None, in_elem=TensorProto.FLOAT, out_elem=TensorProto.FLOAT, opset=17):
    """x -> Relu -> a -> node -> b -> Neg -> y, so the candidate is an interior node."""
    pre = H("Abs", ["x"], ["a"])
    post = H("Neg", ["b"], ["y"])
    if out_shape is None:  # declare what inference finds
        probe = helper.make_model(
            helper.make_graph([pre, node, post], "p", [vi("x", in_shape, in_elem)], [vi("y", None, out_elem)],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]),
            opset_imports=[helper.make_opsetid("", opset)])
        y = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.output[0]
        out_shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in y.type.tensor_type.shape.dim]
    return make_model([pre, node, post], [vi("x", in_shape, in_elem)], [vi("y", out_shape, out_elem)],
                      inits or {}, opset=opset)


def assert_removed(m, op, feeds=None):
    out, res = run(m, feeds)
    assert op not in ops(out), ops(out)
    assert ops(out) == ["Abs", "Neg"]
    assert res.stats == {op: 1}
    return out


def assert_kept(m, op, feeds=None):
    out, res = run(m, feeds)
    assert op in ops(out)
    assert not res.modified
    return out


# --- Cast -------------------------------------------------------------------

def test_cast_to_same_type_removed():
    assert_removed(wrap(H("Cast", ["a"], ["b"], to=TensorProto.FLOAT), [2, 3], [2, 3]), "Cast")


def test_cast_to_other_type_kept():
    m = wrap(H("Cast", ["a"], ["b"], to=TensorProto.DOUBLE), [2, 3], [2, 3], out_elem=TensorProto.DOUBLE)
    assert_kept(m, "Cast")


def test_cast_same_type_int_removed():
    m = wrap(H("Cast", ["a"], ["b"], to=TensorProto.INT64), [4], [4], in_elem=TensorProto.INT64,
             out_elem=TensorProto.INT64)
    assert_removed(m, "Cast")


def test_castlike_same_type_removed_other_kept():
    m = wrap(H("CastLike", ["a", "like"], ["b"]), [3], [3], {"like": np.zeros(1, np.float32)})
    out = assert_removed(m, "CastLike")
    assert init_names(out) == []  # a constant nothing reads is not exported
    m = wrap(H("CastLike", ["a", "like"], ["b"]), [3], [3], {"like": np.zeros(1, np.float64)},
             out_elem=TensorProto.DOUBLE)
    assert_kept(m, "CastLike")


def test_cast_input_to_output_kept():
    # Graph input straight to graph output: both names must survive.
    m = make_model([H("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], [vi("x", [2])], [vi("y", [2])])
    out, res = run(m)
    assert ops(out) == ["Cast"] and not res.modified


def test_cast_to_graph_output_removed_keeping_name():
    m = make_model([H("Abs", ["x"], ["a"]), H("Cast", ["a"], ["y"], to=TensorProto.FLOAT)],
                   [vi("x", [2])], [vi("y", [2])])
    out, res = run(m)
    assert ops(out) == ["Abs"] and list(out.graph.node[0].output) == ["y"]
    assert [o.name for o in out.graph.output] == ["y"]


# --- Reshape ----------------------------------------------------------------

@pytest.mark.parametrize(
    "in_shape,target",
    [
        ([2, 3, 4], [2, 3, 4]),
        (["N", 3, 4], [0, 3, 4]),
        (["N", 3, 4], [-1, 3, 4]),
        (["N", 3, 4], [0, 3, -1]),
        (["N", 3, "M"], [0, 3, 0]),
        (["N", 3, "M"], [0, -1, 0]),
        (["N", "M"], [-1, 0]),
        ([2, 3, 4], [0, 0, -1]),
    ],
)
def test_reshape_to_same_shape_removed(in_shape, target):
    m = wrap(H("Reshape", ["a", "s"], ["b"]), in_shape, None, {"s": I64(*target)})
    assert_removed(m, "Reshape")


@pytest.mark.parametrize(
    "in_shape,target,feed",
    [
        ([2, 3, 4], [2, 4, 3], [2, 3, 4]),        # same size, other shape
        ([2, 3, 4], [6, 4], [2, 3, 4]),           # other rank
        ([2, 3, 4], [-1], [2, 3, 4]),
        (["N", 3, 4], [2, 3, 4], [2, 3, 4]),      # a dynamic dim pinned to a number
        (["N", 3, 4], [0, 4, -1], [2, 3, 4]),
        (["N", 3, 4], [-1, 0, 0, 1], [2, 3, 4]),
        (["N", "M"], [0, 3], [2, 3]),             # M is not known to be 3
    ],
)
def test_reshape_near_misses_kept(in_shape, target, feed):
    m = wrap(H("Reshape", ["a", "s"], ["b"]), in_shape, None, {"s": I64(*target)})
    assert_kept(m, "Reshape", {"x": f32(*feed)})


def test_reshape_allowzero_zero_means_zero_kept():
    # allowzero=1: a 0 in the target is a literal 0-sized dim, not "copy".
    m = wrap(H("Reshape", ["a", "s"], ["b"], allowzero=1), [0, 3], None, {"s": I64(3, 0)}, opset=17)
    out, res = apply(m, EliminateNopOps())
    assert "Reshape" in ops(out) and not res[0].modified
    assert_same_on_ort(m, out, {"x": np.zeros((0, 3), np.float32)})


def test_reshape_dynamic_target_kept():
    m = make_model([H("Abs", ["x"], ["a"]), H("Reshape", ["a", "s"], ["b"]), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3]), vi("s", [2], TensorProto.INT64)], [vi("y", [None, None])])
    out, res = apply(m, EliminateNopOps())
    assert "Reshape" in ops(out) and not res[0].modified
    assert_same_on_ort(m, out, {"x": f32(2, 3), "s": I64(2, 3)})


# --- Transpose --------------------------------------------------------------

def test_identity_transpose_removed():
    assert_removed(wrap(H("Transpose", ["a"], ["b"], perm=[0, 1, 2]), [2, 3, 4], [2, 3, 4]), "Transpose")


def test_rank1_transpose_without_perm_removed():
    assert_removed(wrap(H("Transpose", ["a"], ["b"]), [5], [5]), "Transpose")


@pytest.mark.parametrize("perm", [[0, 2, 1], [2, 1, 0], None])
def test_real_transpose_kept(perm):
    kw = {} if perm is None else {"perm": perm}
    assert_kept(wrap(H("Transpose", ["a"], ["b"], **kw), [2, 3, 4], None), "Transpose")


def test_transpose_square_shape_kept():
    # Same shape in and out, but the data moves.
    assert_kept(wrap(H("Transpose", ["a"], ["b"], perm=[1, 0]), [3, 3], [3, 3]), "Transpose")


# --- Pad --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_zero_pad_removed(mode):
    m = wrap(H("Pad", ["a", "p"], ["b"], mode=mode), [2, 3], [2, 3], {"p": I64(0, 0, 0, 0)})
    assert_removed(m, "Pad")


def test_zero_pad_attr_opset2_removed():
    m = wrap(H("Pad", ["a"], ["b"], pads=[0, 0, 0, 0]), [2, 3], [2, 3], opset=10)
    assert_removed(m, "Pad")


@pytest.mark.parametrize("pads", [[0, 1, 0, 0], [0, 0, 0, -1]])
def test_nonzero_pad_kept(pads):
    assert_kept(wrap(H("Pad", ["a", "p"], ["b"]), [2, 3], None, {"p": I64(*pads)}), "Pad")


def test_pad_with_dynamic_pads_kept():
    m = make_model([H("Abs", ["x"], ["a"]), H("Pad", ["a", "p"], ["b"]), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3]), vi("p", [4], TensorProto.INT64)], [vi("y", [None, None])])
    out, res = apply(m, EliminateNopOps())
    assert "Pad" in ops(out) and not res[0].modified


# --- Slice ------------------------------------------------------------------

@pytest.mark.parametrize(
    "in_shape,starts,ends,axes",
    [
        ([2, 3], [0], [BIG], [1]),
        ([2, 3], [0, 0], [2, 3], [0, 1]),
        ([2, 3], [0], [10], [-1]),
        (["N", 3], [0], [BIG], [0]),
        (["N", 3], [0], [2**31 - 1], [0]),
        ([2, 3], [0, 0], [BIG, BIG], None),
    ],
)
def test_full_slice_removed(in_shape, starts, ends, axes):
    inits = {"st": I64(*starts), "en": I64(*ends)}
    ins = ["a", "st", "en"]
    if axes is not None:
        inits["ax"] = I64(*axes)
        ins.append("ax")
    assert_removed(wrap(H("Slice", ins, ["b"]), in_shape, None, inits), "Slice")


@pytest.mark.parametrize(
    "in_shape,starts,ends,axes,steps",
    [
        ([2, 3], [1], [BIG], [1], [1]),      # starts after 0
        ([2, 3], [0], [2], [1], [1]),        # stops before the end
        ([2, 3], [0], [-1], [1], [1]),       # negative end
        ([2, 3], [0], [BIG], [1], [2]),      # strided
        ([2, 3], [-1], [-BIG], [1], [-1]),   # reversed
        (["N", 3], [0], [4], [0], [1]),      # dynamic dim, finite end
    ],
)
def test_partial_slice_kept(in_shape, starts, ends, axes, steps):
    inits = {"st": I64(*starts), "en": I64(*ends), "ax": I64(*axes), "sp": I64(*steps)}
    m = wrap(H("Slice", ["a", "st", "en", "ax", "sp"], ["b"]), in_shape, None, inits)
    assert_kept(m, "Slice", {"x": f32(*[d if isinstance(d, int) else 6 for d in in_shape])})


# --- Concat / Expand --------------------------------------------------------

def test_single_input_concat_removed():
    assert_removed(wrap(H("Concat", ["a"], ["b"], axis=0), [2, 3], [2, 3]), "Concat")


def test_two_input_concat_kept():
    m = make_model([H("Abs", ["x"], ["a"]), H("Concat", ["a", "a"], ["b"], axis=0), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [4, 3])])
    out, res = run(m)
    assert "Concat" in ops(out) and not res.modified


@pytest.mark.parametrize(
    "in_shape,target",
    [([2, 3], [2, 3]), ([2, 3], [1]), ([2, 3], [2, 1]), ([2, 3], [3]), (["N", 3], [1, 3]), (["N", 3], [1, 1])],
)
def test_expand_to_own_shape_removed(in_shape, target):
    assert_removed(wrap(H("Expand", ["a", "s"], ["b"]), in_shape, None, {"s": I64(*target)}), "Expand")


@pytest.mark.parametrize(
    "in_shape,target",
    [([2, 3], [4, 2, 3]), ([1, 3], [2, 3]), (["N", 1], [3]), (["N", 3], [5, 3])],
)
def test_expand_that_broadcasts_kept(in_shape, target):
    m = wrap(H("Expand", ["a", "s"], ["b"]), in_shape, None, {"s": I64(*target)})
    feeds = {"x": f32(*[d if isinstance(d, int) else (5 if target[0] == 5 else 2) for d in in_shape])}
    assert_kept(m, "Expand", feeds)


def test_custom_domain_lookalike_kept():
    n = H("Cast", ["a"], ["b"], domain="my.domain", to=TensorProto.FLOAT)
    g = helper.make_graph([H("Abs", ["x"], ["a"]), n, H("Neg", ["b"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    out, (res,) = apply(m, EliminateNopOps())
    assert ops(out) == ["Abs", "Cast", "Neg"] and not res.modified


def test_nop_proved_by_a_later_rename_to_graph_output_removed_in_same_run():
    # Inference cannot tell the Loop's carried output's shape; removing the
    # no-op Cast renames that output to the graph output "y", whose declared
    # shape then proves the *earlier* Expand a no-op: one run must get both.
    body = helper.make_graph(
        [H("Identity", ["ci"], ["co"]), H("Tanh", ["v"], ["vo"])], "body",
        [vi("i", [], TensorProto.INT64), vi("ci", [], TensorProto.BOOL), vi("v", [2, 3])],
        [vi("co", [], TensorProto.BOOL), vi("vo", [2, 3])])
    m = make_model([H("Loop", ["n", "", "x"], ["l"], body=body), H("Expand", ["l", "s"], ["e"]),
                    H("Neg", ["e"], ["z"]), H("Cast", ["l"], ["y"], to=TensorProto.FLOAT)],
                   [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])],
                   {"n": np.array(2, np.int64), "s": I64(1, 3)})
    out, res = run(m)
    assert ops(out) == ["Loop", "Neg"] and res.stats == {"Expand": 1, "Cast": 1}
