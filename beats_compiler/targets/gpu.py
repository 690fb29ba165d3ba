"""gpu: the cpu pipeline, then fp16 conversion through onnxruntime's own
converter (``onnxruntime.transformers.float16``, the ``convert_float_to_float16``
step), inputs and outputs kept in their types, the block list's ops kept in
fp32; the Casts the converter leaves behind are cleaned by the
``remove_redundant_casts`` pass."""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterable

import onnx

from ..errors import TargetError, short_message
from ..validate import sort_nodes
from ..verify import Session
from ..verify import verify as run_verification
from . import legality as legal
from .cpu import CPU_PASSES
from .lowering import Lowering, ModelPass, ModelPassResult, apply_strict, check, run_post, update_after
from .profile import PipelineOptions, TargetProfile

# Precision-sensitive ops kept in fp32 by the gpu target: reductions and
# normalizations whose sums overflow or lose precision in fp16, exponentials and
# logs, and onnxruntime's own list of ops without fp16 kernels (or whose fp16
# results differ: TopK/ArgMax ties, Range, CumSum ...).  Extend with --fp32-ops.
FP16_BLOCK_LIST = (
    # onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST (ops without fp16 kernels)
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier",
    "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap", "NonMaxSuppression", "TopK", "RoiAlign", "Range",
    "CumSum", "Min", "Max", "Upsample",
    # precision: long sums, exp/log, variance
    "ReduceSum", "ReduceMean", "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare", "ReduceL2",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Erf",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
    # recurrent ops: no fp16 kernels in ONNX Runtime's CPU provider, where the gpu target verifies
    "LSTM", "GRU", "RNN",
    # already quantized models: their scales stay fp32 (an fp16 scale needs opset 19)
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
)

PROFILE = TargetProfile(
    name="gpu",
    description="fp16 weights and activations (I/O types kept, precision-sensitive ops in fp32), for CUDA",
    passes=CPU_PASSES,
    rtol=2e-2,
    atol=2e-3,
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    convert="fp16",
    post_passes=("remove_redundant_casts", "eliminate_common_subexpressions", "eliminate_dead_code"),
    dtype_policy="fp16 compute; model inputs/outputs keep their types; FP16_BLOCK_LIST ops in fp32",
    legal_dtypes=frozenset({"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32",
                            "int64", "bool"}),
    fp32_ops=FP16_BLOCK_LIST,
    flags=frozenset({"fp32_ops"}),
    verify_metric="allclose",
)


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


class ConvertFloatToFloat16(ModelPass):
    """fp16 conversion (the input is not modified); skipped, with the reason in
    its stats, for a model that is mostly int8 or fp16 already.  ``protected``:
    the Casts the model had before (the cleanup keeps them)."""

    name = "convert_float_to_float16"

    def __init__(self, block_ops: Iterable[str]):
        self.block_ops = tuple(block_ops)
        self.protected: frozenset[str] = frozenset()

    def call(self, model: onnx.ModelProto) -> ModelPassResult:
        fp32 = onnx.ModelProto()
        fp32.CopyFrom(model)
        name_unnamed_casts(fp32)
        self.protected = cast_names(fp32)
        skip = conversion_skip_reason(fp32)
        if skip:
            return ModelPassResult(fp32, False, {"skipped": skip})
        fp16 = to_fp16(fp32, self.block_ops)
        return ModelPassResult(fp16, True, {"casts": sum(1 for n in fp16.graph.node if n.op_type == "Cast")})


def block_ops(profile: TargetProfile, fp32_ops: Iterable[str]) -> tuple[str, ...]:
    return tuple(profile.fp32_ops) + tuple(fp32_ops)


def post_options(protected: frozenset[str]) -> PipelineOptions:
    return PipelineOptions(protected_casts=protected, drop_new_lossy_casts=True)


def prepare(ctx: Lowering) -> None:
    """Nothing to fix before the fp32 pipeline."""


def lower(base, ctx: Lowering):
    """fp16 conversion, cleanup, legality and verification of the fp32 result ``base``."""
    profile, opts, say = ctx.profile, ctx.options, ctx.say
    report = base.report
    block = block_ops(profile, opts.target_options.fp32_ops)
    say("converting to fp16")
    convert = ConvertFloatToFloat16(block)
    converted, record = convert.run(base.model)
    fp16 = converted.model
    skip = converted.stats.get("skipped")
    if skip:
        report.warnings.append(f"fp16 conversion skipped: {skip}")
    casts_after_convert = sum(1 for n in fp16.graph.node if n.op_type == "Cast")
    say("removing redundant casts")
    final, run = run_post(fp16, profile, post_options(convert.protected), opts.passes.max_rounds, ctx.disabled)
    check(final, "fp16 result")
    report.passes.append(record.to_dict())
    report.passes.extend(r.to_dict() for r in run.records)
    report.rounds += run.rounds
    report.converged = report.converged and run.converged
    update_after(report, final)
    leg = legal.static_check(final, profile, opts.strict)
    report.legality = leg.to_dict()
    kept = sorted({n.op_type for n in final.graph.node if n.op_type in set(block)})
    report.target_details = {
        "dtype_policy": profile.dtype_policy,
        "fp32_ops": sorted(set(block)),
        "fp32_ops_present": kept,
        "casts_after_conversion": casts_after_convert,
        "casts_after_cleanup": sum(1 for n in final.graph.node if n.op_type == "Cast"),
        "verified_on": "ONNX Runtime CPU provider, graph optimizations up to the extended level",
    }
    ver_opts, loaded, original = opts.verify, ctx.loaded, ctx.original
    report.rtol = profile.rtol if ver_opts.rtol is None else ver_opts.rtol
    report.atol = profile.atol if ver_opts.atol is None else ver_opts.atol
    if ver_opts.enabled:
        say("verifying on ONNX Runtime (CPU provider)")
        ver = run_verification(None if loaded is not None else original, final,
                               original_path=loaded.path if loaded is not None else None, inputs=ver_opts.inputs,
                               rtol=report.rtol, atol=report.atol, measure_latency=ver_opts.measure_latency,
                               base_dir=loaded.base_dir if loaded is not None else None,
                               # ORT's CPU-only optimization level (NCHWc, layout) is not what a GPU runs,
                               # and it segfaults on some fp16 graphs (a TorchScript ViT)
                               optimize="extended")
        report.take_verification(ver)
    else:  # unverified, but never a model ONNX Runtime cannot load
        try:
            Session(final, None, optimize="extended").close()
        except Exception as exc:
            raise TargetError(f"ONNX Runtime cannot load the fp16 result: {short_message(exc, 120)}") from None
    apply_strict(report, leg, opts.strict)
    report.seconds = round(time.perf_counter() - ctx.t0, 4)
    base.model = final
    base.base_dir = None
    return base
