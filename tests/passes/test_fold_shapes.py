"""fold_shapes: Shape/Size and picks of static dims become constants; dynamic
dims stay dynamic."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import EliminateDeadCode, FoldShapes, infer_types, to_graph
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731


def fold(m, feed_shapes=((2, 3, 4),)):
    out, (res,) = apply(m, FoldShapes())
    for shape in feed_shapes:
        assert_same_on_ort(m, out, {"x": f32(*shape)})
    _, (res2,) = apply(out, FoldShapes())
    assert not res2.modified, "fold_shapes is not idempotent"
    return out, res


def dims(model, name):
    vi_ = next(v for v in [*model.graph.input, *model.graph.output] if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi_.type.tensor_type.shape.dim]


def shape_model(nodes, x_shape, out_shape, inits=None, opset=17, out_elem=TensorProto.INT64):
    return make_model(nodes, [vi("x", x_shape)], [vi("y", out_shape, out_elem)], inits or {}, opset=opset)


def test_shape_of_static_input_folded():
    m = shape_model([H("Shape", ["x"], ["s"]), H("Cast", ["s"], ["y"], to=TensorProto.INT64)], [2, 3, 4], [3])
    out, res = fold(m)
    assert ops(out) == ["Cast"] and init_names(out) == ["s"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), I64(2, 3, 4))
    assert res.stats["shape"] == 1


def test_shape_graph_output_becomes_constant_node():
    m = shape_model([H("Shape", ["x"], ["y"])], [2, 3, 4], [3])
    out, _ = fold(m)
    assert ops(out) == ["Constant"] and [o.name for o in out.graph.output] == ["y"]


def test_shape_of_dynamic_input_kept():
    m = shape_model([H("Shape", ["x"], ["y"])], ["N", 3, 4], [3])
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    assert ops(out) == ["Shape"] and not res.modified
    assert dims(out, "x") == ["N", 3, 4]


def test_shape_start_end_of_static_dims_folded():
    m = shape_model([H("Shape", ["x"], ["y"], start=1)], ["N", 3, 4], [2], opset=15)
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    assert ops(out) == ["Constant"] and res.stats["shape"] == 1
    assert dims(out, "x") == ["N", 3, 4]


def test_shape_start_end_including_dynamic_dim_kept():
    m = shape_model([H("Shape", ["x"], ["y"], start=0, end=2)], ["N", 3, 4], [2], opset=15)
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    assert ops(out) == ["Shape"] and not res.modified


@pytest.mark.parametrize("index,folds", [(1, True), (-1, True), (0, False), ([1, 2], True), ([0, 2], False)])
def test_gather_of_shape(index, folds):
    ind = np.array(index, np.int64)
    out_shape = list(ind.shape)
    m = shape_model([H("Shape", ["x"], ["s"]), H("Gather", ["s", "i"], ["y"], axis=0)], ["N", 3, 4], out_shape,
                    {"i": ind})
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    if folds:
        assert "Gather" not in ops(out) and res.stats["shape_gather"] == 1
        assert ops(apply(out, EliminateDeadCode())[0]) == ["Constant"]  # the Shape is left dead
    else:
        assert ops(out) == ["Shape", "Gather"] and not res.modified
    assert dims(out, "x") == ["N", 3, 4]


@pytest.mark.parametrize("start,end,folds", [(1, 2**62, True), (1, 3, True), (-2, 3, True), (0, 1, False), (0, 3, False)])
def test_slice_of_shape(start, end, folds):
    m = shape_model([H("Shape", ["x"], ["s"]), H("Slice", ["s", "st", "en"], ["y"])], ["N", 3, 4], [None],
                    {"st": I64(start), "en": I64(end)})
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    if folds:
        assert "Slice" not in ops(out) and res.stats["shape_slice"] == 1
        assert ops(apply(out, EliminateDeadCode())[0]) == ["Constant"]
    else:
        assert ops(out) == ["Shape", "Slice"] and not res.modified


def test_size_static_folded_dynamic_kept():
    m = shape_model([H("Size", ["x"], ["y"])], [2, 3, 4], [])
    out, res = fold(m)
    assert ops(out) == ["Constant"] and res.stats["size"] == 1
    m = shape_model([H("Size", ["x"], ["y"])], ["N", 3, 4], [])
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    assert ops(out) == ["Size"] and not res.modified


def test_shape_after_reshape_proved_by_data_propagation():
    # r = Reshape(x, [N, 12]) with N read from x: r's second dim is 12 only
    # through data propagation; r's first dim stays dynamic.
    nodes = [
        H("Shape", ["x"], ["s"]),
        H("Gather", ["s", "zero"], ["n"], axis=0),
        H("Concat", ["n", "twelve"], ["target"], axis=0),
        H("Reshape", ["x", "target"], ["r"]),
        H("Shape", ["r"], ["rs"]),
        H("Gather", ["rs", "one"], ["k"], axis=0),
        H("Gather", ["rs", "zero"], ["n2"], axis=0),
        H("Concat", ["k", "n2"], ["y"], axis=0),
    ]
    m = shape_model(nodes, ["N", 3, 4], [2], {"zero": I64(0), "one": I64(1), "twelve": I64(12)})
    out, res = fold(m, ((2, 3, 4), (5, 3, 4)))
    assert res.stats["shape_gather"] == 1  # rs[1] == 12
    assert ops(out).count("Gather") == 2  # both reads of N stay
    assert dims(out, "x") == ["N", 3, 4]


def test_infer_types_survives_long_1d_tensor():
    # ONNX's data propagation would spell out 2**40 dims of the Range result
    # (a C++ allocation of terabytes); inference must not ask for it.
    m = make_model([H("Range", ["a", "b", "c"], ["r"]), H("Cast", ["r"], ["y"], to=TensorProto.FLOAT)], [],
                   [vi("y", [1 << 40])],
                   {"a": np.array(0, np.int64), "b": np.array(1 << 40, np.int64), "c": np.array(1, np.int64)})
    graph, _ = to_graph(m)
    tm = infer_types(graph)
    assert tm.error is None
    assert tm.shapes["r"] == (1 << 40,)


def _bomb_chains():
    """1-D tensors whose length only data propagation computes: 2**40, 2**30, 2**40."""
    one = numpy_helper.from_array(np.ones(1, np.float32))
    k = {"k1": I64(1 << 20), "k2": I64(1 << 20)}
    return {
        # product of two constants, each harmless
        "constant_product": ([H("Mul", ["k1", "k2"], ["n"]), H("ConstantOfShape", ["n"], ["c"], value=one)], k),
        # a static dim times a constant
        "shape_product": ([H("Shape", ["x"], ["s"]), H("Mul", ["s", "k2"], ["n"]),
                           H("ConstantOfShape", ["n"], ["c"], value=one)], k),
        # a 2-D expand squeezed to 1-D
        "expand_squeeze": ([H("Mul", ["k1", "k2"], ["n"]), H("Concat", ["one", "n"], ["s2"], axis=0),
                            H("Expand", ["f1", "s2"], ["e"]), H("Squeeze", ["e", "zero"], ["c"])],
                           {**k, "one": I64(1), "zero": I64(0), "f1": np.ones(1, np.float32)}),
    }


def test_infer_types_bounds_data_propagation_in_a_capped_process():
    # Each chain ends in a Cast, whose data propagator would spell out 2**40
    # dims: a terabyte allocation in C++.  A child process with a 3 GiB cap
    # would see it as std::bad_alloc; the inference must not even try.
    import subprocess
    import sys
    import tempfile
    import textwrap
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, (nodes, inits) in _bomb_chains().items():
            m = make_model(nodes + [H("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
                                    H("ReduceMax", ["cf"], ["r"], keepdims=0), H("Add", ["x", "r"], ["y"])],
                           [vi("x", [1024])], [vi("y", [1024])], inits)
            paths.append(str(Path(d) / f"{name}.onnx"))
            Path(paths[-1]).write_bytes(m.SerializeToString())
        code = textwrap.dedent(f"""
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
            import onnx
            from passes import infer_types, to_graph
            for p in {paths!r}:
                print(p.rsplit("/", 1)[-1], infer_types(to_graph(onnx.load(p))[0]).error)
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")[:3]
    assert [ln.split(" ", 1)[1] for ln in lines] == ["None"] * 3, proc.stdout
