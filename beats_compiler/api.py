"""Public Python API: ``compile`` returns the optimized model and one report.

A thin layer over ``beats_compiler.pipeline``: keyword arguments in, one
``CompileOptions`` to the pipeline."""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np
import onnx

from .errors import InternalError
from .io import LoadedModel
from .options import CompileOptions, PassOptions, Progress, TargetOptions, VerifyOptions
from .pipeline import CompileResult
from .pipeline import compile as run_pipeline

__all__ = ["CompileResult", "InternalError", "compile"]


def compile(  # noqa: A001 - the product's verb
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    target: str = "cpu",
    *,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    disable: Iterable[str] = (),
    max_rounds: int = 8,
    fold_size_limit: int | None = None,
    check_each_pass: bool = False,
    measure_latency: bool = True,
    progress: Progress | None = None,
    strict: bool = False,
    fold_memory_limit: int | None = None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    calib: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    fp32_ops: Iterable[str] = (),
    precompile: bool = False,
    activation_type: str = "uint8",
    weight_type: str = "uint8",
    per_channel: bool = False,
    min_cosine: float | None = None,
    soc_model: int | None = None,
    bisect: bool = False,
) -> CompileResult:
    """Optimize ``model`` for ``target`` and (unless ``verify=False``) prove on
    ONNX Runtime that the result computes the same outputs.

    Touches no file except reading ``model`` (and ``calib``) when it is a path.
    Never raises for a verification mismatch: ``result.report.verified`` is
    then False (also when ``strict`` and a node falls back off the target's
    provider).  Raises ``InputError`` for bad input and ``InternalError`` for a bug.

    gpu: ``fp32_ops`` extends the fp16 block list.  npu: ``input_shapes``
    fixes dynamic dims; ``calib`` is an .npz path or a dict of arrays stacked
    on a first (sample) axis, or "random"; ``precompile`` adds an EPContext
    model (``result.precompiled``); ``min_cosine`` overrides the profile's bar;
    ``activation_type`` "uint8"/"uint16" quantizes (QDQ), "float16" keeps the
    float model for the HTP's fp16 mode (``soc_model``: QNN's SoC number).

    When verification fails, ``report.culprit`` names the first pass whose
    output differs and the node of that output; ``bisect=True`` searches even
    when verification passes (the largest divergence, within tolerance).
    """
    options = CompileOptions(
        target=target,
        passes=PassOptions(disable=tuple(disable or ()), max_rounds=max_rounds, check_each_pass=check_each_pass,
                           fold_size_limit=fold_size_limit, fold_memory_limit=fold_memory_limit),
        verify=VerifyOptions(enabled=verify, inputs=inputs, rtol=rtol, atol=atol, measure_latency=measure_latency),
        target_options=TargetOptions(input_shapes=input_shapes, calib=calib,
                                     fp32_ops=tuple(o.strip() for o in fp32_ops if o and o.strip()),
                                     precompile=precompile, activation_type=activation_type, weight_type=weight_type,
                                     per_channel=per_channel, min_cosine=min_cosine, soc_model=soc_model),
        strict=strict,
        bisect=bisect,
    )
    return run_pipeline(model, options, progress)
