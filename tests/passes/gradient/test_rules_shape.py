"""Gradient rules checked against float64 finite differences: shape ops."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes.gradient import GradientError

from .harness import check_gradient, model, one_op, ort_check, vi

R = np.random.default_rng(0)


def rnd(*shape):
    return R.standard_normal(shape)


def i64(*v):
    return np.asarray(v, np.int64)


@pytest.mark.parametrize("shape,target,allowzero,opset", [
    ((2, 3, 4), (6, 4), None, 13),
    ((2, 3, 4), (0, -1), None, 13),       # 0 copies the input dim
    ((2, 3, 4), (4, -1, 2), 0, 14),
    ((2, 3, 4), (24,), 1, 14),
    ((2, 3, 4), (4, 1, 6), 1, 18),
    ((3,), (1, 3, 1), None, 17),
])
def test_reshape(shape, target, allowzero, opset):
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    build = one_op("Reshape", [("x", shape)], consts={"s": i64(*target)}, opset=opset, **attrs)
    check_gradient(build, {"x": rnd(*shape)}, ["x"])


def test_reshape_symbolic():
    build = one_op("Reshape", [("x", ("B", "S", 4))], consts={"s": i64(0, -1, 2)})
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(3, 5, 4)}])


def test_reshape_to_runtime_shape():
    # target = [B*S, 4] computed from Shape(x): Shape reads a live tensor but needs no gradient.
    def build(elem):
        nodes = [helper.make_node("Shape", ["x"], ["sh"]),
                 helper.make_node("Slice", ["sh", "s0", "s2"], ["bs"]),
                 helper.make_node("ReduceProd", ["bs"], ["n"], keepdims=1),
                 helper.make_node("Concat", ["n", "four"], ["t"], axis=0),
                 helper.make_node("Size", ["x"], ["sz"]),
                 helper.make_node("Reshape", ["x", "t"], ["y0"]),
                 helper.make_node("Cast", ["sz"], ["szf"], to=elem),
                 helper.make_node("Mul", ["y0", "szf"], ["y"])]
        inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in [("s0", 0), ("s2", 2), ("four", 4)]]
        return model(nodes, [vi("x", elem, ["B", "S", 4])], [vi("y", elem, None)], initializers=inits)
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(1, 5, 4)}])


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(axis):
    build = one_op("Flatten", [("x", ("B", 3, "W"))], axis=axis)
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(3, 3, 2)}])


def test_flatten_default_axis():
    check_gradient(one_op("Flatten", [("x", (2, 3, 4))]), {"x": rnd(2, 3, 4)}, ["x"])


@pytest.mark.parametrize("perm", [None, (1, 0, 2), (2, 0, 1), (0, 2, 1)])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": list(perm)}
    build = one_op("Transpose", [("x", ("B", 3, 4))], **attrs)
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(5, 3, 4)}])


def test_transpose_rank4_unknown_dims():
    build = one_op("Transpose", [("x", ("a", "b", "c", "d"))], perm=[3, 1, 0, 2])
    check_gradient(build, {"x": rnd(2, 3, 4, 5)}, ["x"], more_feeds=[{"x": rnd(1, 2, 3, 2)}])


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("shape,axes", [
    ((2, 1, 3, 1), (1,)), ((2, 1, 3, 1), (-1, 1)), ((2, 1, 3, 1), None), ((1,), None), (("B", 1, 3), (1,)),
])
def test_squeeze(opset, shape, axes):
    consts = {} if axes is None else {"axes": i64(*axes)}
    build = one_op("Squeeze", [("x", shape)], consts=consts, opset=opset)
    first = [2 if d == "B" else d for d in shape]
    more = [{"x": rnd(*[4 if d == "B" else d for d in shape])}] if "B" in shape else []
    check_gradient(build, {"x": rnd(*first)}, ["x"], more_feeds=more)


def test_squeeze_all_symbolic():
    # axes absent on a symbolic dim: which dims go depends on the run (B=1 is squeezed too), so the
    # result's rank is unknown; flattened after, as the harness's loss needs a known rank
    def build(elem):
        nodes = [helper.make_node("Squeeze", ["x"], ["sq"]), helper.make_node("Reshape", ["sq", "m1"], ["y"])]
        return model(nodes, [vi("x", elem, ["B", 1, 3])], [vi("y", elem, None)],
                     initializers=[helper.make_tensor("m1", TensorProto.INT64, [1], [-1])])
    check_gradient(build, {"x": rnd(2, 1, 3)}, ["x"], more_feeds=[{"x": rnd(1, 1, 3)}, {"x": rnd(4, 1, 3)}])


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("axes", [(0,), (-1,), (1, 3), (0, -1)])
def test_unsqueeze(opset, axes):
    build = one_op("Unsqueeze", [("x", ("B", 3))], consts={"axes": i64(*axes)}, opset=opset)
    check_gradient(build, {"x": rnd(2, 3)}, ["x"], more_feeds=[{"x": rnd(4, 3)}])


def test_unsqueeze_scalar():
    check_gradient(one_op("Unsqueeze", [("x", ())], consts={"axes": i64(0, 1)}), {"x": rnd()}, ["x"])


@pytest.mark.parametrize("op,attrs,consts", [("Squeeze", {"axes": [1]}, {}), ("Unsqueeze", {"axes": [0]}, {})])
def test_opset11_attribute_form_refused(op, attrs, consts):
    # The opset-11 form (axes as an attribute) never reaches a rule: the engine needs opset >= 13.
    build = one_op(op, [("x", (2, 1, 3))], opset=11, **attrs)
    with pytest.raises(GradientError, match="opset"):
        check_gradient(build, {"x": rnd(2, 1, 3)}, ["x"])


# ---------------------------------------------------------------- concat / split
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat(axis):
    shapes = []
    for k in (2, 3, 1):
        s = [2, 3, 4]
        s[axis] = k
        shapes.append(tuple(s))
    build = one_op("Concat", [("a", shapes[0]), ("b", shapes[1]), ("c", shapes[2])], axis=axis)
    check_gradient(build, {"a": rnd(*shapes[0]), "b": rnd(*shapes[1]), "c": rnd(*shapes[2])}, ["a", "b", "c"])


def test_concat_symbolic_sizes():
    # sizes along the axis are symbolic (and differ): Split sizes come from Shape at run time
    build = one_op("Concat", [("a", ("B", "S", 4)), ("b", ("B", 2, 4)), ("c", ("B", "T", 4))], axis=1)
    check_gradient(build, {"a": rnd(2, 3, 4), "b": rnd(2, 2, 4), "c": rnd(2, 1, 4)}, ["a", "b", "c"],
                   more_feeds=[{"a": rnd(3, 1, 4), "b": rnd(3, 2, 4), "c": rnd(3, 5, 4)}])


def test_concat_single_and_repeated_and_frozen():
    check_gradient(one_op("Concat", [("a", (2, 3))], axis=0), {"a": rnd(2, 3)}, ["a"])
    check_gradient(one_op("Concat", [("a", (2, 3)), ("b", (2, 1))], order=["a", "b", "a"], axis=-1),
                   {"a": rnd(2, 3), "b": rnd(2, 1)}, ["a"])


def _split_build(n_out, opset, split=None, keep=None, **attrs):
    """Split of x [B, 6, 5]; ``keep``: the outputs that reach the loss (the others get no gradient)."""
    def build(elem):
        ins = ["x"] + (["split"] if split is not None else [])
        outs = [f"y{i}" for i in range(n_out)]
        inits = [helper.make_tensor("split", TensorProto.INT64, [len(split)], list(split))] if split is not None else []
        node = helper.make_node("Split", ins, outs, **attrs)
        kept = [o for i, o in enumerate(outs) if keep is None or i in keep]
        return model([node], [vi("x", elem, ["B", 6, 5])], [vi(o, elem, None) for o in kept],
                     opset=opset, initializers=inits)
    return build


@pytest.mark.parametrize("case", [
    dict(n_out=2, opset=13, split=(4, 2), axis=1),
    dict(n_out=3, opset=13, split=(2, 1, 2), axis=-1),
    dict(n_out=3, opset=13, axis=1),                    # no split: equal parts
    dict(n_out=2, opset=17, split=(1, 5), axis=1, keep=(1,)),
    dict(n_out=3, opset=17, split=(1, 3, 1), axis=2, keep=(0, 2)),
    dict(n_out=3, opset=18, num_outputs=3, axis=1),
    dict(n_out=3, opset=18, num_outputs=3, axis=-1, keep=(1,)),   # 5 -> 2, 2, 1
    dict(n_out=2, opset=18, split=(3, 3), axis=1),
    dict(n_out=1, opset=18, num_outputs=1, axis=0),
])
def test_split(case):
    check_gradient(_split_build(**case), {"x": rnd(2, 6, 5)}, ["x"], more_feeds=[{"x": rnd(3, 6, 5)}])


def test_split_symbolic_axis():
    def build(elem):
        node = helper.make_node("Split", ["x"], ["y0", "y1"], axis=0, num_outputs=2)
        return model([node], [vi("x", elem, ["N", 3])], [vi("y1", elem, None)], opset=18)
    check_gradient(build, {"x": rnd(4, 3)}, ["x"], more_feeds=[{"x": rnd(5, 3)}])


# ---------------------------------------------------------------- slice
BIG = np.iinfo(np.int64).max


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ((1,), (3,), (1,), None),                         # contiguous, one axis
    ((0, 1), (2, 5), None, None),                      # axes absent = 0..n-1
    ((-3,), (BIG,), (-1,), None),                      # negative start, end past the end
    ((-100,), (2,), (2,), (1,)),                       # start before the beginning
    ((1, 0), (BIG, 5), (2, 1), (2, 2)),                # steps > 1 on two axes
    ((-1,), (-BIG,), (1,), (-1,)),                     # full reversal
    ((4, 3), (0, -100), (1, 2), (-2, -1)),             # negative steps, clamped ends
    ((2,), (2,), (0,), None),                          # empty slice: gradient is zeros
    ((10,), (20,), (1,), None),                        # start past the end: empty
    ((0, 1, 0), (1, 4, 6), (0, 1, 2), (1, 1, 3)),      # Pad for two axes, scatter for the third
])
def test_slice_static(starts, ends, axes, steps):
    consts = {"st": i64(*starts), "en": i64(*ends)}
    order = ["x", "st", "en"]
    if axes is not None or steps is not None:
        consts["ax"] = i64(*(axes if axes is not None else range(len(starts))))
        order.append("ax")
    if steps is not None:
        consts["sp"] = i64(*steps)
        order.append("sp")
    check_gradient(one_op("Slice", [("x", (2, 5, 6))], consts=consts, order=order), {"x": rnd(2, 5, 6)}, ["x"])


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ((1,), (-1,), (1,), None),
    ((-2, 0), (BIG, BIG), (0, 2), (1, 2)),
    ((-1,), (-BIG,), (-2,), (-2,)),
    ((1, 5), (-1, -100), (-3, 1), (3, -1)),
    ((1, 1), (-1, 4), (1, 2), None),                   # run-time positions on S, Pad on the static axis
])
def test_slice_symbolic(starts, ends, axes, steps):
    consts = {"st": i64(*starts), "en": i64(*ends), "ax": i64(*axes)}
    if steps is not None:
        consts["sp"] = i64(*steps)
    build = one_op("Slice", [("x", ("B", "S", 6))], consts=consts)
    check_gradient(build, {"x": rnd(3, 5, 6)}, ["x"], more_feeds=[{"x": rnd(5, 2, 6)}, {"x": rnd(1, 7, 6)}])


def test_slice_runtime_starts_int32():
    # starts/ends are graph inputs (not constants), of type int32
    def build(elem):
        node = helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])
        inits = [helper.make_tensor("ax", TensorProto.INT32, [2], [0, 1]),
                 helper.make_tensor("sp", TensorProto.INT32, [2], [1, -2])]
        ins = [vi("x", elem, [4, "S"]), vi("st", TensorProto.INT32, [2]), vi("en", TensorProto.INT32, [2])]
        return model([node], ins, [vi("y", elem, None)], initializers=inits)
    st, en = np.asarray([1, -1], np.int32), np.asarray([3, -100], np.int32)
    check_gradient(build, {"x": rnd(4, 6), "st": st, "en": en}, ["x"],
                   more_feeds=[{"x": rnd(4, 3), "st": np.asarray([-2, 10], np.int32),
                                "en": np.asarray([100, 0], np.int32)}])


# ---------------------------------------------------------------- gather
@pytest.mark.parametrize("opset", [13, 16, 18])
@pytest.mark.parametrize("axis,indices", [
    (0, np.asarray([1, 3, 1, 0], np.int64)),           # repeated indices accumulate
    (0, np.asarray(2, np.int64)),                      # scalar index
    (1, np.asarray([[0, -1], [2, 0]], np.int64)),      # rank-2 indices, negative
    (-1, np.asarray([-3, 3, 3], np.int32)),            # negative axis, int32 indices
    (2, np.asarray(-1, np.int64)),
])
def test_gather(opset, axis, indices):
    build = one_op("Gather", [("x", (4, 3, 5))], consts={"i": indices}, axis=axis, opset=opset)
    check_gradient(build, {"x": rnd(4, 3, 5)}, ["x"])


@pytest.mark.parametrize("opset", [13, 17])
def test_gather_symbolic_embedding(opset):
    # an embedding lookup: table [V, D] with V symbolic, token ids [B, S] a run-time input
    def build(elem):
        node = helper.make_node("Gather", ["w", "ids"], ["y"], axis=0)
        ins = [vi("w", elem, ["V", 4]), vi("ids", TensorProto.INT64, ["B", "S"])]
        return model([node], ins, [vi("y", elem, None)], opset=opset)
    check_gradient(build, {"w": rnd(5, 4), "ids": np.asarray([[0, 4, 0], [-1, 2, 0]], np.int64)}, ["w"],
                   more_feeds=[{"w": rnd(7, 4), "ids": np.asarray([[6, 6, -7, 1, 0]], np.int64)}])


@pytest.mark.parametrize("opset", [13, 18])
def test_gather_symbolic_axis1(opset):
    build = one_op("Gather", [("x", ("B", "S", 3))], consts={"i": np.asarray([[1, 0, 1]], np.int64)},
                   axis=1, opset=opset)
    check_gradient(build, {"x": rnd(2, 3, 3)}, ["x"], more_feeds=[{"x": rnd(4, 2, 3)}])


@pytest.mark.parametrize("opset", [13, 16, 18])
@pytest.mark.parametrize("axis,ishape", [(0, (5, 4)), (1, (3, 6)), (-1, (3, 4)), (0, (1, 4))])
def test_gather_elements(opset, axis, ishape):
    rng = np.random.default_rng(1)
    d = (3, 4)[axis]
    idx = rng.integers(-d, d, size=ishape).astype(np.int64)  # repeats and negatives
    build = one_op("GatherElements", [("x", (3, 4))], consts={"i": idx}, axis=axis, opset=opset)
    check_gradient(build, {"x": rnd(3, 4)}, ["x"])


@pytest.mark.parametrize("opset", [13, 17])
def test_gather_elements_symbolic(opset):
    def build(elem):
        node = helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)
        ins = [vi("x", elem, ["B", "N"]), vi("i", TensorProto.INT64, ["B", "K"])]
        return model([node], ins, [vi("y", elem, None)], opset=opset)
    check_gradient(build, {"x": rnd(2, 4), "i": np.asarray([[0, 3, 3], [1, 1, -1]], np.int64)}, ["x"],
                   more_feeds=[{"x": rnd(3, 2), "i": np.asarray([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, -2, 0, 1, 0]],
                                                                np.int64)}])


@pytest.mark.parametrize("opset", [13, 17])
def test_gather_elements_smaller_index_ort(opset):
    # idx smaller than x on a non-gathered axis: ONNX allows it (ORT runs it), the reference evaluator does not
    def build(elem):
        node = helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)
        ins = [vi("x", elem, ["B", 4]), vi("i", TensorProto.INT64, ["C", 2])]
        return model([node], ins, [vi("y", elem, None)], opset=opset)
    ort_check(build, {"x": rnd(3, 4), "i": np.asarray([[0, 3], [-2, 2]], np.int64)}, ["x"], samples=None)


# ---------------------------------------------------------------- expand / tile
@pytest.mark.parametrize("xs,target", [((3, 1), (2, 3, 4)), ((4,), (3, 1)), ((2, 3), (2, 3)), ((1, 1), (1,)),
                                       ((2, 1, 3), (1, 4, 1))])
def test_expand(xs, target):
    build = one_op("Expand", [("x", xs)], consts={"s": i64(*target)})
    check_gradient(build, {"x": rnd(*xs)}, ["x"])


def test_expand_symbolic():
    def build(elem):
        nodes = [helper.make_node("Shape", ["z"], ["s"]), helper.make_node("Expand", ["x", "s"], ["y"])]
        return model(nodes, [vi("x", elem, ["M", 1]), vi("z", elem, ["B", "N", "K"])], [vi("y", elem, None)])
    check_gradient(build, {"x": rnd(3, 1), "z": rnd(2, 3, 4)}, ["x"],
                   more_feeds=[{"x": rnd(1, 1), "z": rnd(2, 5, 3)}, {"x": rnd(4, 1), "z": rnd(1, 4, 1)}])


@pytest.mark.parametrize("xs,reps", [((2, 3), (1, 1)), ((2, 3), (3, 1)), ((2, 3), (2, 4)), ((2, 1, 3), (1, 3, 2)),
                                     ((4,), (3,))])
def test_tile(xs, reps):
    check_gradient(one_op("Tile", [("x", xs)], consts={"r": i64(*reps)}), {"x": rnd(*xs)}, ["x"])


def test_tile_symbolic():
    build = one_op("Tile", [("x", ("B", 3, "K"))], consts={"r": i64(2, 1, 3)})
    check_gradient(build, {"x": rnd(2, 3, 2)}, ["x"], more_feeds=[{"x": rnd(1, 3, 4)}])


def test_tile_runtime_repeats():
    def build(elem):
        node = helper.make_node("Tile", ["x", "r"], ["y"])
        return model([node], [vi("x", elem, ["B", 3]), vi("r", TensorProto.INT64, [2])], [vi("y", elem, None)])
    check_gradient(build, {"x": rnd(2, 3), "r": i64(3, 2)}, ["x"], more_feeds=[{"x": rnd(4, 3), "r": i64(1, 3)}])


# ---------------------------------------------------------------- pad
@pytest.mark.parametrize("pads,with_value,opset", [
    ((0, 1, 2, 1, 0, 3), False, 13),
    ((1, 0, 0, 2, 2, 1), True, 13),
    ((0, 0, 0, 0, 0, 0), False, 17),
    ((0, 0, 2, 0, 0, 1), True, 18),
])
def test_pad_constant(pads, with_value, opset):
    consts = {"p": i64(*pads)}
    inputs = [("x", (3, 4, 5))] + ([("v", ())] if with_value else [])
    order = ["x", "p"] + (["v"] if with_value else [])
    feeds = {"x": rnd(3, 4, 5)}
    if with_value:
        feeds["v"] = rnd()
    build = one_op("Pad", inputs, consts=consts, order=order, mode="constant", opset=opset)
    check_gradient(build, feeds, list(feeds))


@pytest.mark.parametrize("axes", [(1,), (-1, 0)])
def test_pad_axes_input(axes):
    pads = {1: (2, 1), 2: (1, 0, 0, 3)}[len(axes)]
    build = one_op("Pad", [("x", ("B", 4, 5)), ("v", ())], consts={"p": i64(*pads), "ax": i64(*axes)},
                   order=["x", "p", "v", "ax"], opset=18)
    check_gradient(build, {"x": rnd(2, 4, 5), "v": rnd()}, ["x", "v"], more_feeds=[{"x": rnd(3, 4, 5), "v": rnd()}])


def test_pad_symbolic_and_runtime_pads():
    def build(elem):
        node = helper.make_node("Pad", ["x", "p", "v"], ["y"])
        ins = [vi("x", elem, ["B", "S"]), vi("p", TensorProto.INT64, [4]), vi("v", elem, [1])]
        return model([node], ins, [vi("y", elem, None)])
    check_gradient(build, {"x": rnd(2, 3), "p": i64(1, 0, 0, 2), "v": rnd(1)}, ["x", "v"],
                   more_feeds=[{"x": rnd(4, 5), "p": i64(0, 3, 2, 1), "v": rnd(1)}])


# Negative pads crop (ONNX Pad; ORT runs them, the reference evaluator's np.pad does not).
@pytest.mark.parametrize("pads,axes,opset", [((0, -1, 1, 1, 2, -2), None, 13), ((-1, -1, 0, 0, 0, -3), None, 18),
                                             ((-1, 1, 0, -2), (0, -1), 18)])
def test_pad_negative_ort(pads, axes, opset):
    consts = {"p": i64(*pads)} | ({"ax": i64(*axes)} if axes else {})
    order = ["x", "p", "v"] + (["ax"] if axes else [])
    build = one_op("Pad", [("x", (3, 4, 5)), ("v", ())], consts=consts, order=order, opset=opset)
    ort_check(build, {"x": rnd(3, 4, 5), "v": rnd()}, ["x", "v"], samples=None)


def test_pad_negative_runtime_ort():
    def build(elem):
        node = helper.make_node("Pad", ["x", "p", "v", "ax"], ["y"])
        inits = [helper.make_tensor("ax", TensorProto.INT64, [2], [-1, 0])]
        ins = [vi("x", elem, ["B", "S"]), vi("p", TensorProto.INT64, [4]), vi("v", elem, [])]
        return model([node], ins, [vi("y", elem, None)], opset=18, initializers=inits)
    ort_check(build, {"x": rnd(3, 5), "p": i64(-1, 2, 2, -1), "v": rnd()}, ["x", "v"], samples=None)
    ort_check(build, {"x": rnd(4, 2), "p": i64(1, 0, -1, 0), "v": rnd()}, ["x", "v"], samples=None)


@pytest.mark.parametrize("mode,opset", [("edge", 17), ("reflect", 17), ("wrap", 19)])
def test_pad_other_modes_refused(mode, opset):
    build = one_op("Pad", [("x", (3, 4))], consts={"p": i64(1, 1, 1, 1)}, mode=mode, opset=opset)
    with pytest.raises(GradientError, match=mode):
        check_gradient(build, {"x": rnd(3, 4)}, ["x"])


# ---------------------------------------------------------------- a chain
def test_chain_transformer_style():
    # split heads, transpose, slice the sequence, merge back: every rule on one path, symbolic B and S
    def build(elem):
        nodes = [
            helper.make_node("Reshape", ["x", "s4"], ["h"]),                  # [B, S, 2, 3]
            helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1, 3]),   # [B, 2, S, 3]
            helper.make_node("Slice", ["t", "st", "en", "ax"], ["sl"]),       # [B, 2, S-1, 3]
            helper.make_node("Split", ["sl"], ["a", "b"], axis=3, num_outputs=2),
            helper.make_node("Concat", ["b", "a", "b"], ["c"], axis=-1),
            helper.make_node("Unsqueeze", ["c", "u"], ["cu"]),
            helper.make_node("Squeeze", ["cu", "u"], ["y"]),
        ]
        inits = [helper.make_tensor("s4", TensorProto.INT64, [4], [0, 0, 2, 3]),
                 helper.make_tensor("st", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("en", TensorProto.INT64, [1], [BIG]),
                 helper.make_tensor("ax", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("u", TensorProto.INT64, [1], [0])]
        return model(nodes, [vi("x", elem, ["B", "S", 6])], [vi("y", elem, None)], opset=18, initializers=inits)
    check_gradient(build, {"x": rnd(2, 4, 6)}, ["x"], more_feeds=[{"x": rnd(3, 2, 6)}])
