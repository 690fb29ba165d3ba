"""GPU target: fp16 conversion through onnxruntime's own converter
(``onnxruntime.transformers.float16``), inputs and outputs kept in their
types, the block list's ops kept in fp32.  The Casts the converter leaves
behind are cleaned by ``passes.fp16.RemoveRedundantCasts`` (run by the driver)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable

import onnx

from .errors import TargetError
from .validate import sort_nodes
from .verify import short_message


def cast_names(model: onnx.ModelProto) -> frozenset[str]:
    return frozenset(n.name for n in model.graph.node if n.op_type == "Cast")


def name_unnamed_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the model's own Casts names, so the cleanup can tell them from the
    converter's (an unnamed Cast would otherwise look new)."""
    taken = {n.name for n in model.graph.node}
    k = 0
    for n in model.graph.node:
        if n.op_type == "Cast" and not n.name:
            while f"beats_cast_{k}" in taken:
                k += 1
            n.name = f"beats_cast_{k}"
            taken.add(n.name)
    return model


_LOW = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.FLOAT16: "fp16",
        onnx.TensorProto.BFLOAT16: "fp16", onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.DOUBLE: "fp32"}


def conversion_skip_reason(model: onnx.ModelProto) -> str:
    """Why the fp16 conversion should leave ``model`` alone ("" to convert): most of
    its weight elements are int8 already (a quantized model: converting the float
    glue around its integer kernels would only move its rounding) or fp16 already."""
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    for t in model.graph.initializer:
        kind = _LOW.get(t.data_type)
        if kind:
            n = 1
            for d in t.dims:
                n *= d
            counts[kind] += n
    total = sum(counts.values())
    if not total or counts["fp32"] * 2 > total:
        return ""
    kind = max(("int8", "fp16"), key=counts.get)
    share = 100.0 * counts[kind] / total
    return (f"{share:.0f}% of the weights are int8 already (a quantized model keeps its int8/fp32 arithmetic)"
            if kind == "int8" else f"{share:.0f}% of the weights are fp16 already")


# Names the converter gives the Casts it adds at the graph's edges: a model that
# already has them (an earlier keep_io_types conversion) would get duplicates.
_CONVERTER_NAMES = re.compile(r"^graph_(input|output)_cast")


def _free_converter_names(model: onnx.ModelProto) -> None:
    io_names = {v.name for v in [*model.graph.input, *model.graph.output]}
    renamed: dict[str, str] = {}
    for n in model.graph.node:
        if _CONVERTER_NAMES.match(n.name):
            n.name = "beats_" + n.name
        for i, o in enumerate(n.output):
            if _CONVERTER_NAMES.match(o) and o not in io_names:
                renamed[o] = n.output[i] = "beats_" + o
    if renamed:
        for n in model.graph.node:
            for i, x in enumerate(n.input):
                if x in renamed:
                    n.input[i] = renamed[x]
        for vi in model.graph.value_info:
            if vi.name in renamed:
                vi.name = renamed[vi.name]


def to_fp16(model: onnx.ModelProto, block_ops: Iterable[str]) -> onnx.ModelProto:
    """fp16 copy of ``model`` (the input is not modified)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    work = onnx.ModelProto()
    work.CopyFrom(model)
    _free_converter_names(work)
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(work, keep_io_types=True, op_block_list=sorted(set(block_ops)))
    except Exception as exc:
        raise TargetError(f"onnxruntime's fp16 converter failed: {short_message(exc)}") from None
    finally:
        logging.disable(previous)
    sort_nodes(out)  # the converter appends its input Casts after their readers
    return out
