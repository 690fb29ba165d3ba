"""Public Python API: ``compile`` returns the optimized model and one report."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes import Envelope, PassError, PassManager, to_graph, to_model
from passes.convert import quiet, uses_external_refs

from .errors import BeatsError, InputError
from .io import LoadedModel, check_model, load_model, serialized_size
from .report import CompileReport, ModelStats
from .validate import Limits, UnsortedGraph, check_verify_inputs, sort_nodes, validate_model
from .targets import PipelineOptions, build_passes, check_disabled, get_target
from .verify import Verification, verify as run_verification

Progress = Callable[[str], None]


class InternalError(BeatsError):
    """A pass or the exporter produced something invalid: a bug in beats-compile."""

    exit_code = 3


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: CompileReport
    # Set when ``model`` still references external data files (inputs that
    # used external data are read lazily): those references resolve here.
    base_dir: Path | None = None
    precompiled: bytes | None = None  # npu --precompile: the EPContext model

    def save(self, path: str | os.PathLike, *, external_data: bool = False):
        """Write the model atomically (external data streamed from ``base_dir``)."""
        from .io import save_model

        return save_model(self.model, path, external_data=external_data, base_dir=self.base_dir)

    @property
    def ok(self) -> bool:
        return self.report.verified is not False


def _is_sorted(graph: gs.Graph, outer: set[str]) -> bool:
    known = set(outer)
    known.update(t.name for t in graph.inputs)
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and t.name not in known:
                return False
        for sub in node.subgraphs():
            if not _is_sorted(sub, known):
                return False
        known.update(t.name for t in node.outputs if t.name)
    return True


def _as_loaded(model: onnx.ModelProto | LoadedModel | str | os.PathLike) -> tuple[onnx.ModelProto, LoadedModel | None]:
    if isinstance(model, LoadedModel):
        return model.model, model
    if isinstance(model, onnx.ModelProto):
        try:
            validate_model(model, Limits())
        except UnsortedGraph:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # the caller's model is not modified
            if not sort_nodes(copy):
                raise
            model = copy
            validate_model(model, Limits())
        if uses_external_refs(model):
            raise InputError("an in-memory model references external data files: load it with "
                             "beats_compiler.load_model(path) instead")
        check_model(model)
        return model, None
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model)  # eager: the result is self-contained
        return loaded.model, loaded
    raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _size_estimate(model: onnx.ModelProto, stats: ModelStats) -> int:
    """Serialized size; over 2 GB (external data) the weights plus a margin."""
    size = serialized_size(model)
    return size if size is not None else stats.weight_bytes


@dataclass
class _Edit:
    """What an edit of the graph reports back to ``transform``."""

    records: list = None  # PassRecords (compile)
    rounds: int = 0
    converged: bool = True
    reparam: dict | None = None
    reference: onnx.ModelProto | None = None  # verify against this instead of the input
    warnings: list = None
    pipeline: object = None  # bisect.Pipeline: how to run the passes again one by one (compile)


def transform(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    command: str,
    edit: Callable[[gs.Graph, "Envelope"], _Edit],
    *,
    target: str = "cpu",
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    measure_latency: bool = True,
    progress: Progress | None = None,
    bisect: bool = False,
) -> CompileResult:
    """Load, edit the graph in place, export, check, verify, report: the
    skeleton shared by compile, insert, fold and unfold.  When verification
    fails, or with ``bisect``, ``report.culprit`` names the pass (and node)
    that makes the result differ (``beats_compiler.bisect``)."""
    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    profile = get_target(target)
    say("loading model")
    original, loaded = _as_loaded(model)
    if verify and inputs is None:
        check_verify_inputs(original, str(loaded.path) if loaded is not None else "model")
    before = ModelStats.of(original)
    base_dir = loaded.base_dir if loaded is not None else None
    try:
        graph, env = to_graph(original, base_dir)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    done = edit(graph, env)
    with quiet():
        if not _is_sorted(graph, set()):
            graph.toposort()
    result = to_model(graph, env, consume=True)
    del graph  # its constants are now in ``result``; keep one copy of each weight
    gc.collect()  # gs graphs are reference cycles
    try:
        check_model(result)
    except InputError as exc:
        raise InternalError(f"the {command} result fails the ONNX checker: {exc}") from None
    after = ModelStats.of(result)
    rtol = profile.rtol if rtol is None else rtol
    atol = profile.atol if atol is None else atol
    ver: Verification | None = None
    if verify:
        say("verifying on ONNX Runtime")
        ref_in_memory = done.reference if done.reference is not None else (None if loaded is not None else original)
        ver = run_verification(
            ref_in_memory,
            result,
            original_path=loaded.path if (loaded is not None and done.reference is None) else None,
            inputs=inputs,
            rtol=rtol,
            atol=atol,
            measure_latency=measure_latency,
            base_dir=base_dir,
        )
    warnings = (list(loaded.notes) if loaded is not None else []) + list(done.warnings or [])
    if not done.converged:
        warnings.append(f"passes still changing the graph after {done.rounds} rounds (raise max_rounds)")
    report = CompileReport(
        target=profile.name,
        input=str(loaded.path) if loaded is not None else None,
        output=None,
        verified=None if ver is None else ver.verified,
        max_abs_diff=None if ver is None else ver.max_abs_diff,
        max_rel_diff=None if ver is None else ver.max_rel_diff,
        rtol=rtol,
        atol=atol,
        nodes_before=before.nodes,
        nodes_after=after.nodes,
        initializers_before=before.initializers,
        initializers_after=after.initializers,
        weight_bytes_before=before.weight_bytes,
        weight_bytes_after=after.weight_bytes,
        file_size_before=loaded.file_bytes if loaded is not None else _size_estimate(original, before),
        file_size_after=_size_estimate(result, after),
        latency_ms_before=None if ver is None else ver.latency_ms_before,
        latency_ms_after=None if ver is None else ver.latency_ms_after,
        op_histogram_before=before.op_histogram,
        op_histogram_after=after.op_histogram,
        passes=[r.to_dict() for r in (done.records or [])],
        rounds=done.rounds,
        converged=done.converged,
        seconds=round(time.perf_counter() - t_start, 4),
        outputs=[] if ver is None else [o.to_dict() for o in ver.outputs],
        verify_inputs={} if ver is None else ver.inputs,
        verify_input_source=None if ver is None else ver.input_source,
        verify_inputs_generated={} if ver is None else ver.generated,
        warnings=warnings,
        command=command,
        reparam=done.reparam,
    )
    if bisect or (ver is not None and not ver.verified):
        say("looking for the pass that changes the outputs")
        report.culprit = _find_culprit(command, original, loaded, done, result, inputs, rtol, atol,
                                       failed=ver is not None and not ver.verified)
        report.seconds = round(time.perf_counter() - t_start, 4)
    return CompileResult(result, report, base_dir if uses_external_refs(result) else None)


def _find_culprit(command, original, loaded, done: _Edit, result, inputs, rtol, atol, *, failed: bool) -> dict:
    """``report.culprit``: re-run the edit pass by pass against the reference
    verification used, on the same inputs (``beats_compiler.bisect``)."""
    from . import bisect as bs

    base_dir = loaded.base_dir if loaded is not None else None
    try:
        if done.reference is not None:
            ref_model, path = done.reference, None
        else:
            ref_model, path = original, (loaded.path if loaded is not None else None)
        ref = bs.Reference(None if path is not None else ref_model, path, inputs=inputs, analysis_model=ref_model,
                           base_dir=base_dir)
        if done.pipeline is not None:
            import dataclasses

            pipe = dataclasses.replace(done.pipeline, base_dir=base_dir)
            return bs.find([pipe.run], original, ref, rtol=rtol, atol=atol, failed=failed, base_dir=base_dir)
        return bs.single_step(command, ref_model, result, ref, rtol=rtol, atol=atol, failed=failed,
                              base_dir=base_dir)
    except Exception as exc:  # noqa: BLE001 - the search must not hide the verification result
        return bs.failed_search(exc)


def _limit_warnings(records, options: PipelineOptions) -> list[str]:
    """One warning per fold limit that stopped a fold, naming its flag."""
    skipped: dict[str, int] = {}
    for r in records:
        for k, v in r.stats.items():
            if k in ("skipped_growth_limit", "skipped_size_limit", "skipped_memory_limit"):
                skipped[k] = max(skipped.get(k, 0), v)
    text = {
        "skipped_growth_limit": f"would each add more than {options.fold_size_limit} bytes (raise with --fold-size-limit)",
        "skipped_size_limit": f"would each create a tensor over {min(options.fold_max_tensor, options.fold_memory_limit)} "
                              "bytes (raise with --fold-memory-limit)",
        "skipped_memory_limit": f"would take constant folding over {options.fold_memory_limit} bytes in all "
                                "(raise with --fold-memory-limit)",
    }
    return [f"{n} constant fold(s) skipped: they {text[k]}" for k, n in skipped.items()]


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
    profile = get_target(target)
    if profile.convert == "none":
        given = [flag for flag, v in (("--input-shape", input_shapes), ("--calib", calib), ("--fp32-ops", list(fp32_ops)),
                                      ("--precompile", precompile), ("--activation-type", activation_type != "uint8"),
                                      ("--weight-type", weight_type != "uint8"), ("--per-channel", per_channel),
                                      ("--min-cosine", min_cosine is not None), ("--soc-model", soc_model is not None))
                 if v]
        if given:
            raise InputError(f"{', '.join(given)}: not used by target {profile.name} (see --target gpu|npu)")
        knobs = {k: v for k, v in (("fold_size_limit", fold_size_limit), ("fold_memory_limit", fold_memory_limit))
                 if v is not None}
        return _optimize(model, profile, PipelineOptions(**knobs), verify=verify, inputs=inputs, rtol=rtol,
                         atol=atol, disable=disable, max_rounds=max_rounds, check_each_pass=check_each_pass,
                         measure_latency=measure_latency, progress=progress, bisect=bisect)
    from .lowering import compile_lowered

    return compile_lowered(
        model, profile, verify=verify, inputs=inputs, rtol=rtol, atol=atol, disable=disable, max_rounds=max_rounds,
        fold_size_limit=fold_size_limit, check_each_pass=check_each_pass, measure_latency=measure_latency,
        progress=progress, strict=strict, input_shapes=input_shapes, calib=calib, fp32_ops=fp32_ops,
        precompile=precompile, activation_type=activation_type, weight_type=weight_type, per_channel=per_channel,
        min_cosine=min_cosine, fold_memory_limit=fold_memory_limit, soc_model=soc_model, bisect=bisect,
    )


def _optimize(model, profile, options: PipelineOptions, *, verify, inputs, rtol, atol, disable, max_rounds,
              check_each_pass, measure_latency, progress, bisect: bool = False) -> CompileResult:
    """The target's fp32 pipeline through ``transform``."""
    say = progress or (lambda _msg: None)
    env_box: list = []
    try:
        manager = PassManager(
            build_passes(profile, options),
            max_rounds=max_rounds,
            disabled=check_disabled(profile, disable) & set(profile.passes),
            check=(lambda g: check_model(to_model(g, env_box[0]))) if check_each_pass else None,
            on_pass=lambda rec: say(f"round {rec.round}: {rec.name}"),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None

    def optimize(graph: gs.Graph, env) -> _Edit:
        env_box.append(env)
        say("optimizing")
        try:
            run = manager.run(graph)
        except PassError as exc:
            if isinstance(exc.cause, BeatsError):
                raise exc.cause from None
            if isinstance(exc.cause, ValueError) and exc.pass_name == "fix_input_shapes":
                raise InputError(str(exc.cause)) from None
            raise InternalError(str(exc)) from exc
        from .bisect import Pipeline

        return _Edit(records=run.records, rounds=run.rounds, converged=run.converged,
                     warnings=_limit_warnings(run.records, options),
                     pipeline=Pipeline(lambda: build_passes(profile, options), frozenset(manager.disabled),
                                       max_rounds))

    return transform(model, "compile", optimize, target=profile.name, verify=verify, inputs=inputs, rtol=rtol,
                     atol=atol, measure_latency=measure_latency, progress=progress, bisect=bisect)
