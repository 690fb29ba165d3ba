"""npu: static shapes, the cpu pipeline with the HTP's own preparation passes,
then QDQ quantization with onnxruntime's quantizer (the ``quantize_qdq`` step)
for Qualcomm's QNN HTP, legality from a real QNN session's node placement and
accuracy (cosine similarity) measured on the HTP backend (``targets.qnn``)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

import numpy as np
import onnx

from ..errors import BeatsError, InputError, TargetError
from ..inputs import InputGenerator
from ..verify import Session, pick_generated
from . import legality as legal
from . import qnn
from .cpu import CPU_PASSES
from .lowering import Lowering, ModelPass, ModelPassResult, apply_strict, check, update_after
from .profile import TargetProfile

# ONNX ops the QNN execution provider lists as supported (onnxruntime-qnn 2.7
# docs, "Supported ONNX operators"); the HTP backend's real verdict per node
# comes from a QNN session (targets.qnn), this list is the static check.
QNN_OPS = frozenset(
    "Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv "
    "ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor "
    "Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual "
    "GridSample GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization Inverse IsNaN LRN LSTM "
    "LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization MatMul Max MaxPool Mean Min "
    "Mod Mul Neg NonZero Not Or PRelu Pad Pow QuantizeLinear RandomNormalLike RandomUniformLike Reciprocal "
    "ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu RMSNormalization Reshape Resize RoiAlign "
    "Round RotaryEmbedding STFT ScatterElements ScatterND Sigmoid Sign Sin Slice Softmax Softplus SpaceToDepth "
    "Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where "
    "Shape GRU IsInf LpPool OneHot Selu Xor".split()
)
FROM_MODEL = "from the model"  # the types of a model quantized (QDQ) already: its own scales are kept
QNN_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "bool"})

PROFILE = TargetProfile(
    name="npu",
    description="static shapes, QDQ int8/uint8 (uint16 activations optional) or fp16, for Qualcomm's QNN HTP",
    passes=("fix_input_shapes", "upcast_float16", "bound_infinite_constants", "lower_mask_where", "drop_nan_guards")
    + CPU_PASSES + ("transpose_to_reshape",),
    rtol=0.0,
    atol=0.0,
    providers=("QNNExecutionProvider", "CPUExecutionProvider"),
    convert="qdq",
    dtype_policy="uint8 activations (or uint16), uint8/int8 weights, int32 biases; fp32 I/O with Q/DQ at the edges; "
                 "or (--activation-type float16) no quantization, the HTP computing in fp16",
    static_shapes=True,
    legal_ops=QNN_OPS,
    legal_dtypes=QNN_DTYPES,
    flags=frozenset({"input_shapes", "calib", "precompile", "activation_type", "weight_type", "per_channel",
                     "min_cosine", "soc_model"}),
    verify_metric="accuracy",
    verify_providers=("QNNExecutionProvider",),
    min_cosine=0.99,
    min_top1=None,  # reported; a threshold only where the user asks (--min-top1)
)


def _parse_dims(name: str, dims) -> list[int]:
    try:
        out = [int(d) for d in dims]
    except (TypeError, ValueError):
        raise InputError(f"input shape for {name!r}: not a list of integers") from None
    if not out or any(d < 1 for d in out):
        raise InputError(f"input shape for {name!r}: every dim must be a positive integer, got {out}")
    return out


NPU_DIM_SIZES = (1, 16, 8, 4, 3)  # symbolic dims of --calib random: batch-like first, then sequence-like


def _generated_shapes(original: onnx.ModelProto, missing) -> dict[str, list[int]]:
    """Static shapes for the inputs in ``missing`` as verification's generated inputs
    bind the model's symbolic dims (relations such as total = past + new kept)."""
    ref = Session(original, None)
    try:
        cand, _ = pick_generated(ref.sess, InputGenerator(ref.sess.get_inputs(), original, sizes=NPU_DIM_SIZES))
    finally:
        ref.close()
    return {n: list(np.shape(cand.feeds[n])) for n in missing}


def resolve_npu_inputs(original: onnx.ModelProto, input_shapes, calib, inputs):
    """Static shapes for every input (given, else from the calibration or
    verification samples) and the calibration/held-out split."""
    ins = qnn.graph_inputs(original)
    shapes: dict[str, list[int]] = {}
    for name, dims in dict(input_shapes or {}).items():
        if name not in ins:
            raise InputError(f"--input-shape {name}: the model has no input {name!r} (inputs: {', '.join(ins)})")
        shapes[name] = _parse_dims(name, dims)
    if calib is None:
        raise InputError("the npu target quantizes with calibration data: pass --calib data.npz (per input, samples "
                         "stacked on a first axis) or --calib random (accuracy on real data is then unknown)")
    arrays = None
    if isinstance(calib, Mapping):
        arrays, source = {k: np.asarray(v) for k, v in calib.items()}, "arrays"
    elif isinstance(calib, (str, os.PathLike)) and str(calib) != "random":
        arrays, source = qnn.load_calib(calib), "file"
    elif str(calib) != "random":
        raise InputError(f"calib: expected an .npz path, a dict of arrays or 'random', got {type(calib).__name__}")
    for name, (_dt, dims) in ins.items():
        if name in shapes:
            continue
        if dims is not None and all(d is not None and d > 0 for d in dims):
            shapes[name] = list(dims)
        elif arrays is not None and name in arrays and np.ndim(arrays[name]) >= 1:
            shapes[name] = list(np.shape(arrays[name])[1:])
        elif inputs is not None and name in inputs:
            shapes[name] = list(np.shape(inputs[name]))
    missing = {n: [i for i, d in enumerate(dims or [None]) if d is None] for n, (_dt, dims) in ins.items()
               if n not in shapes}
    if missing and arrays is None and inputs is None:  # --calib random: dims as generated inputs bind them
        shapes.update(_generated_shapes(original, missing))
        data_note = ("static shapes from generated inputs: "
                     + ", ".join(f"{n}={','.join(map(str, shapes[n]))}" for n in missing)
                     + " (choose with --input-shape)")
        missing = {}
    else:
        data_note = None
    if missing:
        desc = "; ".join(f"{n} (dynamic dims {d})" for n, d in missing.items())
        raise InputError(f"the npu target needs static shapes: no size for {desc}; pass --input-shape NAME=D0,D1,...")
    if arrays is not None:
        samples = qnn.split_samples(original, arrays, shapes)
        data = qnn.make_calib(samples, source)
    else:
        samples = qnn.random_samples(original, shapes, 20, seed=0)
        data = qnn.make_calib(samples, "random")
        data.warnings.append("calibrated on random data (--calib random): accuracy on real inputs is unknown")
        if data_note:
            data.warnings.append(data_note)
    if inputs is not None:
        given = qnn.split_samples(original, {k: np.asarray(v)[None] for k, v in inputs.items()}, shapes)
        data.held_out = given + data.held_out
    return shapes, data


class QuantizeQDQ(ModelPass):
    """QDQ quantization with onnxruntime's quantizer, calibrated on ``calib``."""

    name = "quantize_qdq"

    def __init__(self, calib, *, activation_type: str, weight_type: str, per_channel: bool):
        self.calib = calib
        self.options = dict(activation_type=activation_type, weight_type=weight_type, per_channel=per_channel)
        self.quantized: qnn.Quantized | None = None

    def call(self, model: onnx.ModelProto) -> ModelPassResult:
        q = self.quantized = qnn.quantize_qdq(model, self.calib, **self.options)
        check(q.model, "quantized model")
        return ModelPassResult(q.model, True, {"qnn_preprocessed": int(q.preprocessed),
                                               "calib_samples": q.calib_samples})


def prepare(ctx: Lowering) -> None:
    """Static shapes and calibration data, before the fp32 pipeline (which
    fixes the input shapes); the rest of the checks of the npu options."""
    t, v = ctx.options.target_options, ctx.options.verify
    if v.rtol is not None or v.atol is not None:
        raise InputError("--rtol/--atol: the npu target is checked by cosine similarity to fp32 (--min-cosine)")
    if t.activation_type == "float16" and (t.per_channel or t.weight_type != "uint8"):
        raise InputError("--per-channel and --weight-type choose how weights are quantized: "
                         "--activation-type float16 quantizes nothing")
    shapes, data = resolve_npu_inputs(ctx.original, t.input_shapes, t.calib, v.inputs)
    ctx.state["data"] = data
    ctx.pass_options = dataclasses.replace(ctx.pass_options, input_shapes=tuple(shapes.items()))


def lower(base, ctx: Lowering):
    """Quantize (or keep the float graph for the HTP's fp16 mode), place on the
    HTP, measure accuracy on held-out samples, precompile if asked."""
    t, verify, strict, say = ctx.options.target_options, ctx.options.verify.enabled, ctx.options.strict, ctx.say
    activation_type, weight_type, per_channel = t.activation_type, t.weight_type, t.per_channel
    min_cosine, soc_model, precompile = t.min_cosine, t.soc_model, t.precompile
    original, loaded, profile, data, t0 = ctx.original, ctx.loaded, ctx.profile, ctx.state["data"], ctx.t0
    report = base.report
    fp32 = base.model
    fp16_htp = activation_type == qnn.FLOAT16
    provider = qnn.htp_options(fp16=fp16_htp, soc_model=soc_model)
    if fp16_htp:  # nothing to quantize: the HTP computes the float graph in fp16
        q = qnn.Quantized(fp32, False, qnn.FLOAT16, qnn.FLOAT16, False, 0)
        data.held_out = data.calib + data.held_out  # no calibration: every sample checks accuracy
        data.calib = []
    else:
        form, node = qnn.quantized_form(fp32)
        if form == "integer":
            raise InputError(f"npu: node '{node.name[:40]}' ({node.op_type}) is quantized already (dynamic/QLinear "
                             "int8): the QNN HTP cannot run it; give the float model")
        if form == "qdq":  # its own scales are kept: nothing to calibrate
            q = qnn.Quantized(fp32, False, FROM_MODEL, FROM_MODEL, False, 0)
            data.held_out = data.calib + data.held_out
            data.calib = []
            data.warnings = [w for w in data.warnings if not w.startswith("calibrated on")]
            report.warnings.append("the model is QDQ-quantized already: its scales are kept (no calibration)")
        else:
            say("quantizing (QDQ)")
            quantize = QuantizeQDQ(data.calib, activation_type=activation_type, weight_type=weight_type,
                                   per_channel=per_channel)
            _result, record = quantize.run(fp32)
            q = quantize.quantized
            report.passes.append(record.to_dict())
    update_after(report, q.model)
    report.warnings.extend(data.warnings)
    fp32_reasons = legal.node_reasons(fp32, profile)
    bar = profile.min_cosine if min_cosine is None else min_cosine
    details = {
        "dtype_policy": profile.dtype_policy,
        "static_input_shapes": {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                                for i in q.model.graph.input},
        "activation_type": q.activation_type,
        "weight_type": q.weight_type,
        "per_channel": q.per_channel,
        "qnn_preprocessed": q.preprocessed,
        "calibration": {"source": data.source, "samples": len(data.calib), "held_out": len(data.held_out)},
        "min_cosine": bar,
        "qnn_provider_options": provider,
    }
    if fp16_htp:
        report.warnings.append("float16 on the HTP: the model is written in fp32; run it with the QNN provider options "
                               + ", ".join(f"{k}={v}" for k, v in provider.items())
                               + " (an HTP with fp16 support), or use the --precompile context")
    report.target_details = details
    ok_qnn, why = qnn.qnn_available()
    if not ok_qnn:
        leg = legal.static_check(fp32, profile, strict)
        report.legality = leg.to_dict()
        if verify or precompile:
            raise InputError(f"cannot verify on the QNN HTP backend: {why}; use --no-verify to skip")
        report.warnings.append(f"QNN HTP not available ({why}): legality is the static check only")
        apply_strict(report, leg, strict)
        base.model = q.model
        report.seconds = round(time.perf_counter() - t0, 4)
        return base
    say("placing nodes on the QNN HTP backend")
    try:
        sess, place = qnn.placement(q.model, provider)
    except qnn.QnnSessionError as exc:
        if not exc.capacity:
            raise
        say("finding the node the QNN HTP cannot take")
        node = qnn.capacity_culprit(q.model, provider)
        where = f"node '{node.name}' ({node.op_type})" if node is not None else "a node it does not name"
        more = "" if fp16_htp else "; try --activation-type float16 (the HTP's fp16 mode)"
        raise TargetError(f"the QNN HTP cannot finalize its graph at {where}: out of HTP memory or resources"
                          f"{more}") from None
    leg = legal.from_placement(q.model, place, profile, fp32_reasons, strict)
    report.legality = leg.to_dict()
    if verify:
        say("measuring accuracy on the QNN HTP backend")
        ref = Session(None if loaded is not None else original, loaded.path if loaded is not None else None)
        try:
            names = [o.name for o in ref.sess.get_outputs()]
            try:
                acc = qnn.accuracy(ref.sess, names, sess, data.held_out)
            except BeatsError:
                raise
            except Exception as exc:
                raise InputError(f"cannot verify: a held-out sample fails on ONNX Runtime ({qnn.short_message(exc)})") from None
        finally:
            ref.close()
        details["accuracy"] = acc
        worst = min((o["cosine_min"] for o in acc["outputs"] if o["cosine_min"] is not None), default=1.0)
        report.verified = worst >= bar
        if not report.verified:
            more = {"uint8": "--activation-type uint16 --per-channel (16-bit activations), or float16",
                    "uint16": ("--per-channel, or " if not q.per_channel else "") + "--activation-type float16"}
            hint = more.get(q.activation_type)
            if q.calib_samples == 0 and q.activation_type == FROM_MODEL:
                report.warnings.append(f"cosine {worst:.4f} < {bar} on held-out inputs with the model's own QDQ "
                                       "scales (the HTP's integer arithmetic vs ONNX Runtime's CPU): quantize the "
                                       "float model with this target instead")
            else:
                report.warnings.append(f"cosine {worst:.4f} < {bar} on held-out inputs"
                                       + (f": more precision: {hint} (the HTP's fp16 mode)" if hint else ""))
        report.max_abs_diff = 1.0 - worst  # cosine distance of the worst output (see target_details.accuracy)
        report.max_rel_diff = 1.0 - worst
        report.rtol = report.atol = 0.0
        report.outputs = [{"name": o["name"], "ok": (o["cosine_min"] or 0.0) >= bar,
                           "max_abs_diff": 1.0 - (o["cosine_min"] or 0.0), "max_rel_diff": 1.0 - (o["cosine_min"] or 0.0),
                           "detail": f"cosine min {o['cosine_min']:.5f} mean {o['cosine_mean']:.5f}"
                                     + (f", top-1 agreement {o['top1_agreement']:.3f}" if o["top1_agreement"] is not None else "")
                                     + (f" ({o['detail']})" if o["detail"] else "")}
                          for o in acc["outputs"]]
        report.verify_inputs = {k: list(np.shape(v)) for k, v in data.held_out[0].items()}
        report.verify_input_source = f"held-out ({data.source}), {len(data.held_out)} sample(s), QNN HTP"
        report.latency_ms_before = report.latency_ms_after = None
    if precompile:
        say("precompiling the QNN context (EPContext)")
        context_model = qnn.precompile(q.model, provider)
        feed = data.held_out[0]
        got = qnn.run_context_model(context_model, feed, provider)
        want = sess.run(None, feed)
        details["precompiled"] = {"bytes": len(context_model), "loads_and_runs": True,
                                  "cosine_vs_qdq": min(qnn.cosine(a, b) for a, b in zip(want, got))}
        base.precompiled = context_model
    apply_strict(report, leg, strict)
    del sess
    base.model = q.model
    base.base_dir = None
    report.seconds = round(time.perf_counter() - t0, 4)
    return base
