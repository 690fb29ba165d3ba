"""gpu and npu compiles: the target's fp32 pipeline (``api._optimize``), then
the lowering (fp16 or QDQ), cleanup passes, legality and the target's own
verification, all in the one ``CompileReport``."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from passes import PassError, PassManager, to_graph, to_model
from passes.convert import quiet, uses_external_refs

from . import legality as legal
from .errors import BeatsError, InputError, TargetError
from .io import check_model, serialized_size
from .report import ModelStats
from .targets import PipelineOptions, TargetProfile, build_passes, check_disabled


def _say(progress):
    return progress or (lambda _msg: None)


def _run_post(model: onnx.ModelProto, profile: TargetProfile, options: PipelineOptions, max_rounds: int,
              disable=()):
    from .api import InternalError

    graph, env = to_graph(model)
    manager = PassManager(build_passes(profile, options, post=True), max_rounds=max_rounds,
                          disabled=check_disabled(profile, disable) & set(profile.post_passes))
    try:
        run = manager.run(graph)
    except PassError as exc:
        if isinstance(exc.cause, BeatsError):
            raise exc.cause from None
        raise InternalError(str(exc)) from exc
    with quiet():
        graph.toposort()
    out = to_model(graph, env, consume=True)
    del graph
    gc.collect()
    return out, run


def _check(model: onnx.ModelProto, what: str) -> None:
    from .api import InternalError

    try:
        check_model(model)
    except InputError as exc:
        raise InternalError(f"the {what} fails the ONNX checker: {exc}") from None


def _update_after(report, model: onnx.ModelProto) -> None:
    after = ModelStats.of(model)
    report.nodes_after = after.nodes
    report.initializers_after = after.initializers
    report.weight_bytes_after = after.weight_bytes
    report.op_histogram_after = after.op_histogram
    size = serialized_size(model)
    report.file_size_after = size if size is not None else after.weight_bytes


def compile_lowered(model, profile: TargetProfile, *, verify: bool, inputs, rtol, atol, disable, max_rounds,
                    fold_size_limit, check_each_pass, measure_latency, progress, strict: bool, input_shapes,
                    calib, fp32_ops: Iterable[str], precompile: bool, activation_type: str, weight_type: str,
                    per_channel: bool, min_cosine: float | None, fold_memory_limit: int | None = None,
                    soc_model: int | None = None, bisect: bool = False):
    from .api import _as_loaded, _optimize
    from . import bisect as bs

    t0 = time.perf_counter()
    say = _say(progress)
    say("loading model")
    original, loaded = _as_loaded(model)
    if (loaded is not None and loaded.uses_external_data) or uses_external_refs(original):
        raise InputError(f"target {profile.name}: models with external data are not supported yet")
    if precompile and profile.convert != "qdq":
        raise InputError("--precompile applies to the npu target only")
    fp32_ops = tuple(o.strip() for o in fp32_ops if o and o.strip())
    if fp32_ops and profile.convert != "fp16":
        raise InputError("--fp32-ops applies to the gpu target only")
    base_opts = {k: v for k, v in (("fold_size_limit", fold_size_limit), ("fold_memory_limit", fold_memory_limit))
                 if v is not None}
    if profile.convert != "qdq" and (soc_model is not None or activation_type != "uint8" or weight_type != "uint8"
                                     or per_channel or min_cosine is not None):
        raise InputError("--activation-type, --weight-type, --per-channel, --soc-model and --min-cosine apply to "
                         "the npu target only")
    if profile.convert == "qdq" and (rtol is not None or atol is not None):
        raise InputError("--rtol/--atol: the npu target is checked by cosine similarity to fp32 (--min-cosine)")
    fp16_htp = activation_type == "float16"
    if fp16_htp and (per_channel or weight_type != "uint8"):
        raise InputError("--per-channel and --weight-type choose how weights are quantized: "
                         "--activation-type float16 quantizes nothing")
    common = dict(disable=disable, max_rounds=max_rounds, check_each_pass=check_each_pass, progress=progress)
    if profile.convert == "fp16":
        if input_shapes or calib is not None:
            raise InputError("--input-shape and --calib apply to the npu target only")
        base = _optimize(loaded if loaded is not None else original, profile, PipelineOptions(**base_opts),
                         verify=False, inputs=None, rtol=rtol, atol=atol, measure_latency=False, **common)
        result = _finish_fp16(base, original, loaded, profile, fp32_ops, verify=verify, inputs=inputs, rtol=rtol,
                              atol=atol, max_rounds=max_rounds, measure_latency=measure_latency, strict=strict,
                              say=say, t0=t0, disable=disable)
        return bs.for_fp16(result, bisect=bisect, original=original, loaded=loaded, profile=profile,
                           options=PipelineOptions(**base_opts), disable=disable, max_rounds=max_rounds,
                           fp32_ops=fp32_ops, inputs=inputs, say=say)
    from . import npu

    shapes, data = resolve_npu_inputs(original, input_shapes, calib, inputs)
    base = _optimize(loaded if loaded is not None else original, profile,
                     PipelineOptions(input_shapes=tuple(shapes.items()), **base_opts),
                     verify=False, inputs=None, rtol=rtol, atol=atol, measure_latency=False, **common)
    result = _finish_qdq(base, original, loaded, profile, data, verify=verify, strict=strict, precompile=precompile,
                         activation_type=activation_type, weight_type=weight_type, per_channel=per_channel,
                         min_cosine=min_cosine, soc_model=soc_model, say=say, t0=t0, npu=npu)
    return bs.for_qdq(result, bisect=bisect, original=original, loaded=loaded, profile=profile,
                      options=PipelineOptions(input_shapes=tuple(shapes.items()), **base_opts), disable=disable,
                      max_rounds=max_rounds, samples=data.held_out, activation_type=activation_type, say=say)


# --------------------------------------------------------------------------- gpu


def _finish_fp16(base, original, loaded, profile, fp32_ops, *, verify, inputs, rtol, atol, max_rounds,
                 measure_latency, strict, say, t0, disable=()):
    from . import gpu
    from .verify import verify as run_verification

    report = base.report
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(base.model)
    gpu.name_unnamed_casts(fp32)
    protected = gpu.cast_names(fp32)
    block = tuple(profile.fp32_ops) + fp32_ops
    skip = gpu.conversion_skip_reason(fp32)
    t = time.perf_counter()
    if skip:
        fp16 = fp32
        report.warnings.append(f"fp16 conversion skipped: {skip}")
    else:
        say("converting to fp16")
        fp16 = gpu.to_fp16(fp32, block)
    convert_s = time.perf_counter() - t
    casts_after_convert = sum(1 for n in fp16.graph.node if n.op_type == "Cast")
    say("removing redundant casts")
    final, run = _run_post(fp16, profile, PipelineOptions(protected_casts=protected, drop_new_lossy_casts=True),
                           max_rounds, disable)
    _check(final, "fp16 result")
    report.passes.append({"name": "convert_float_to_float16", "round": 0, "modified": not skip,
                          "seconds": round(convert_s, 6),
                          "stats": {"skipped": skip} if skip else {"casts": casts_after_convert}})
    report.passes.extend(r.to_dict() for r in run.records)
    report.rounds += run.rounds
    report.converged = report.converged and run.converged
    _update_after(report, final)
    leg = legal.static_check(final, profile, strict)
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
    report.rtol = profile.rtol if rtol is None else rtol
    report.atol = profile.atol if atol is None else atol
    if verify:
        say("verifying on ONNX Runtime (CPU provider)")
        ver = run_verification(None if loaded is not None else original, final,
                               original_path=loaded.path if loaded is not None else None, inputs=inputs,
                               rtol=report.rtol, atol=report.atol, measure_latency=measure_latency,
                               base_dir=loaded.base_dir if loaded is not None else None,
                               # ORT's CPU-only optimization level (NCHWc, layout) is not what a GPU runs,
                               # and it segfaults on some fp16 graphs (a TorchScript ViT)
                               optimize="extended")
        report.verified = ver.verified
        report.max_abs_diff = ver.max_abs_diff
        report.max_rel_diff = ver.max_rel_diff
        report.outputs = [o.to_dict() for o in ver.outputs]
        report.verify_inputs = ver.inputs
        report.verify_input_source = ver.input_source
        report.verify_inputs_generated = ver.generated
        report.latency_ms_before = ver.latency_ms_before
        report.latency_ms_after = ver.latency_ms_after
    else:  # unverified, but never a model ONNX Runtime cannot load
        from .verify import _Session, short_message

        try:
            _Session(final, None, optimize="extended").close()
        except Exception as exc:
            raise TargetError(f"ONNX Runtime cannot load the fp16 result: {short_message(exc, 120)}") from None
    _apply_strict(report, leg, strict)
    report.seconds = round(time.perf_counter() - t0, 4)
    base.model = final
    base.base_dir = None
    return base


def _apply_strict(report, leg, strict: bool) -> None:
    if leg.fallback:
        names = ", ".join(f"{i.node} ({i.op})" for i in leg.fallback[:5]) + (" ..." if len(leg.fallback) > 5 else "")
        report.warnings.append(f"{len(leg.fallback)} node(s) not taken by {report.target}'s provider: {names}")
        if strict:
            report.verified = False
            report.warnings.append("--strict: a node falls back off the target's provider; the compile fails")


# --------------------------------------------------------------------------- npu


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
    from .inputs import InputGenerator
    from .verify import _Session, pick_generated

    ref = _Session(original, None)
    try:
        cand, _ = pick_generated(ref.sess, InputGenerator(ref.sess.get_inputs(), original, sizes=NPU_DIM_SIZES))
    finally:
        ref.close()
    return {n: list(np.shape(cand.feeds[n])) for n in missing}


def resolve_npu_inputs(original: onnx.ModelProto, input_shapes, calib, inputs):
    """Static shapes for every input (given, else from the calibration or
    verification samples) and the calibration/held-out split."""
    from . import npu

    ins = npu.graph_inputs(original)
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
        arrays, source = npu.load_calib(calib), "file"
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
        samples = npu.split_samples(original, arrays, shapes)
        data = npu.make_calib(samples, source)
    else:
        samples = npu.random_samples(original, shapes, 20, seed=0)
        data = npu.make_calib(samples, "random")
        data.warnings.append("calibrated on random data (--calib random): accuracy on real inputs is unknown")
        if data_note:
            data.warnings.append(data_note)
    if inputs is not None:
        given = npu.split_samples(original, {k: np.asarray(v)[None] for k, v in inputs.items()}, shapes)
        data.held_out = given + data.held_out
    return shapes, data


def _finish_qdq(base, original, loaded, profile, data, *, verify, strict, precompile, activation_type, weight_type,
                per_channel, min_cosine, soc_model, say, t0, npu):
    from .verify import _Session

    report = base.report
    fp32 = base.model
    fp16_htp = activation_type == npu.FLOAT16
    provider = npu.htp_options(fp16=fp16_htp, soc_model=soc_model)
    if fp16_htp:  # nothing to quantize: the HTP computes the float graph in fp16
        q = npu.Quantized(fp32, False, npu.FLOAT16, npu.FLOAT16, False, 0)
        data.held_out = data.calib + data.held_out  # no calibration: every sample checks accuracy
        data.calib = []
    else:
        form, node = npu.quantized_form(fp32)
        if form == "integer":
            raise InputError(f"npu: node '{node.name[:40]}' ({node.op_type}) is quantized already (dynamic/QLinear "
                             "int8): the QNN HTP cannot run it; give the float model")
        if form == "qdq":  # its own scales are kept: nothing to calibrate
            q = npu.Quantized(fp32, False, "from the model", "from the model", False, 0)
            data.held_out = data.calib + data.held_out
            data.calib = []
            data.warnings = [w for w in data.warnings if not w.startswith("calibrated on")]
            report.warnings.append("the model is QDQ-quantized already: its scales are kept (no calibration)")
        else:
            say("quantizing (QDQ)")
            t = time.perf_counter()
            q = npu.quantize_qdq(fp32, data.calib, activation_type=activation_type, weight_type=weight_type,
                                 per_channel=per_channel)
            _check(q.model, "quantized model")
            report.passes.append({"name": "quantize_qdq", "round": 0, "modified": True,
                                  "seconds": round(time.perf_counter() - t, 6),
                                  "stats": {"qnn_preprocessed": int(q.preprocessed), "calib_samples": q.calib_samples}})
    _update_after(report, q.model)
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
    ok_qnn, why = npu.qnn_available()
    if not ok_qnn:
        leg = legal.static_check(fp32, profile, strict)
        report.legality = leg.to_dict()
        if verify or precompile:
            raise InputError(f"cannot verify on the QNN HTP backend: {why}; use --no-verify to skip")
        report.warnings.append(f"QNN HTP not available ({why}): legality is the static check only")
        _apply_strict(report, leg, strict)
        base.model = q.model
        report.seconds = round(time.perf_counter() - t0, 4)
        return base
    say("placing nodes on the QNN HTP backend")
    try:
        sess, place = npu.placement(q.model, provider)
    except npu.QnnSessionError as exc:
        if not exc.capacity:
            raise
        say("finding the node the QNN HTP cannot take")
        node = npu.capacity_culprit(q.model, provider)
        where = f"node '{node.name}' ({node.op_type})" if node is not None else "a node it does not name"
        more = "" if fp16_htp else "; try --activation-type float16 (the HTP's fp16 mode)"
        raise TargetError(f"the QNN HTP cannot finalize its graph at {where}: out of HTP memory or resources"
                          f"{more}") from None
    leg = legal.from_placement(q.model, place, profile, fp32_reasons, strict)
    report.legality = leg.to_dict()
    if verify:
        say("measuring accuracy on the QNN HTP backend")
        ref = _Session(None if loaded is not None else original, loaded.path if loaded is not None else None)
        try:
            names = [o.name for o in ref.sess.get_outputs()]
            try:
                acc = npu.accuracy(ref.sess, names, sess, data.held_out)
            except BeatsError:
                raise
            except Exception as exc:
                raise InputError(f"cannot verify: a held-out sample fails on ONNX Runtime ({npu.short_message(exc)})") from None
        finally:
            ref.close()
        details["accuracy"] = acc
        worst = min((o["cosine_min"] for o in acc["outputs"] if o["cosine_min"] is not None), default=1.0)
        report.verified = worst >= bar
        if not report.verified:
            more = {"uint8": "--activation-type uint16 --per-channel (16-bit activations), or float16",
                    "uint16": ("--per-channel, or " if not q.per_channel else "") + "--activation-type float16"}
            hint = more.get(q.activation_type)
            if q.calib_samples == 0 and q.activation_type == "from the model":
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
        ctx = npu.precompile(q.model, provider)
        feed = data.held_out[0]
        got = npu.run_context_model(ctx, feed, provider)
        want = sess.run(None, feed)
        details["precompiled"] = {"bytes": len(ctx), "loads_and_runs": True,
                                  "cosine_vs_qdq": min(npu.cosine(a, b) for a, b in zip(want, got))}
        base.precompiled = ctx
    _apply_strict(report, leg, strict)
    del sess
    base.model = q.model
    base.base_dir = None
    report.seconds = round(time.perf_counter() - t0, 4)
    return base
