"""LayerNormalization models for the training legalization passes' tests."""

import numpy as np
from onnx import TensorProto, helper

from tests.helpers import f32, make_model, vi

H = helper.make_node


def ln_model(n_out=1, axis=-1, stash=None, bias=True, dtype=TensorProto.FLOAT):
    np_dt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    attrs = {"axis": axis}
    if stash is not None:
        attrs["stash_type"] = stash
    outs = ["y", "mean", "isd"][:n_out]
    ins = ["x", "s"] + (["b"] if bias else [])
    norm = [2, 3, 4, 5][axis % 4 :]
    inits = {"s": f32(*norm, seed=1).astype(np_dt)}
    if bias:
        inits["b"] = f32(*norm, seed=2).astype(np_dt)
    ax = axis % 4
    stat = [d if k < ax else 1 for k, d in enumerate([2, 3, 4, 5])]
    return make_model(
        [H("LayerNormalization", ins, outs, name="ln1", **attrs)],
        [vi("x", [2, 3, 4, 5], dtype)],
        [vi(o, [2, 3, 4, 5] if o == "y" else stat, dtype if o == "y" else TensorProto.FLOAT) for o in outs],
        inits,
    )


def value_info(model, name):
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.name == name:
            return v
    return None


def dims(v):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
