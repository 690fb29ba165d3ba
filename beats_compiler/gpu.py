"""GPU target: fp16 conversion through onnxruntime's own converter
(``onnxruntime.transformers.float16``), inputs and outputs kept in their
types, the block list's ops kept in fp32.  The Casts the converter leaves
behind are cleaned by ``passes.fp16.RemoveRedundantCasts`` (run by the driver)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import onnx

from .errors import InputError


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


def to_fp16(model: onnx.ModelProto, block_ops: Iterable[str]) -> onnx.ModelProto:
    """fp16 copy of ``model`` (the input is not modified)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    work = onnx.ModelProto()
    work.CopyFrom(model)
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(work, keep_io_types=True, op_block_list=sorted(set(block_ops)))
    except Exception as exc:
        raise InputError(f"fp16 conversion failed: {' '.join(str(exc).split())[:300]}") from None
    finally:
        logging.disable(previous)
    return out
