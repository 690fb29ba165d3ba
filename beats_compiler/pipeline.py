"""The one pipeline: load -> validate -> (target prepare) -> pass manager ->
(target lowering) -> check -> verify -> report; writing is ``CompileResult.save``.

``compile`` is the compile job, ``transform`` the skeleton it shares with
insert, fold and unfold (``beats_compiler.reparam``).  Targets come in as data
(``beats_compiler.targets``): this module names none of them."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from passes import Envelope, PassError, PassManager, to_graph, to_model
from passes.convert import quiet, uses_external_refs
from passes.graph import file_ranges, is_sorted

from . import bisect as culprits  # (``bisect`` is also a flag of transform)
from .errors import BeatsError, InputError, InternalError
from .io import LoadedModel, check_model, load_model, serialized_size
from .options import CompileOptions, PassOptions, Progress, TargetOptions, VerifyOptions
from .report import CompileReport, ModelStats
from .targets import (PipelineOptions, TargetProfile, build_passes, check_disabled, check_flags, get_target,
                      target_module)
from .targets.lowering import Lowering
from .validate import Limits, UnsortedGraph, check_verify_inputs, sort_nodes, validate_model
from .verify import Verification
from .verify import verify as run_verification

__all__ = [
    "CompileOptions",
    "CompileResult",
    "Edit",
    "PassOptions",
    "TargetOptions",
    "VerifyOptions",
    "as_loaded",
    "compile",
    "transform",
]

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


def as_loaded(model) -> tuple[onnx.ModelProto, LoadedModel | None]:
    """(checked model, its LoadedModel when it came from a file): a path is read
    eagerly; an in-memory model is validated (sorted on a copy if unsorted)."""
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
class Edit:
    """What an edit of the graph reports back to ``transform``."""

    records: list = None  # PassRecords (compile)
    rounds: int = 0
    converged: bool = True
    reparam: dict | None = None
    reference: onnx.ModelProto | None = None  # verify against this instead of the input
    warnings: list = None
    pipeline: object = None  # bisect.Pipeline: how to run the passes again one by one (compile)


def transform(model, command: str, edit: Callable[[gs.Graph, Envelope], Edit], *, target: str = "cpu",
              verify: VerifyOptions = VerifyOptions(), progress: Progress | None = None,
              bisect: bool = False) -> CompileResult:
    """Load, edit the graph in place, export, check, verify, report: the
    skeleton shared by compile, insert, fold and unfold.  When verification
    fails, or with ``bisect``, ``report.culprit`` names the pass (and node)
    that makes the result differ (``beats_compiler.bisect``)."""
    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    profile = get_target(target)
    say("loading model")
    original, loaded = as_loaded(model)
    if verify.enabled and verify.inputs is None:
        check_verify_inputs(original, str(loaded.path) if loaded is not None else "model")
    before = ModelStats.of(original)
    base_dir = loaded.base_dir if loaded is not None else None
    try:
        graph, env = to_graph(original, base_dir)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    ranges = loaded.raw_ranges if loaded is not None else None
    with file_ranges(original, loaded.path if loaded is not None else "", ranges):
        done = edit(graph, env)
    with quiet():
        if not is_sorted(graph):
            graph.toposort()
    result = to_model(graph, env, consume=True)
    del graph  # its constants are now in ``result``; keep one copy of each weight
    gc.collect()  # gs graphs are reference cycles
    try:
        check_model(result)
    except InputError as exc:
        raise InternalError(f"the {command} result fails the ONNX checker: {exc}") from None
    after = ModelStats.of(result)
    rtol = profile.rtol if verify.rtol is None else verify.rtol
    atol = profile.atol if verify.atol is None else verify.atol
    ver: Verification | None = None
    if verify.enabled:
        say("verifying on ONNX Runtime")
        ref_in_memory = done.reference if done.reference is not None else (None if loaded is not None else original)
        ver = run_verification(
            ref_in_memory,
            result,
            original_path=loaded.path if (loaded is not None and done.reference is None) else None,
            inputs=verify.inputs,
            rtol=rtol,
            atol=atol,
            measure_latency=verify.measure_latency,
            base_dir=base_dir,
            memory_budget=verify.memory,
            scope=verify.scope,
            original_model=original if (loaded is not None and done.reference is None) else None,
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
        verify_method=None if ver is None else ver.method,
        warnings=warnings,
        command=command,
        reparam=done.reparam,
    )
    if ver is not None and ver.too_large and (bisect or not ver.verified):
        # the search holds both models in ORT sessions, pass after pass: what the
        # one-at-a-time verification was chosen to avoid
        report.culprit = culprits.culprit_dict(
            None, None, None, message="culprit search skipped: the models were too large to run side by side "
                                      f"({ver.method.split(';')[0]})")
    elif bisect or (ver is not None and not ver.verified):
        say("looking for the pass that changes the outputs")
        report.culprit = _find_culprit(command, original, loaded, done, result, verify.inputs, rtol, atol,
                                       failed=ver is not None and not ver.verified)
        report.seconds = round(time.perf_counter() - t_start, 4)
    return CompileResult(result, report, base_dir if uses_external_refs(result) else None)


def _find_culprit(command, original, loaded, done: Edit, result, inputs, rtol, atol, *, failed: bool) -> dict:
    """``report.culprit``: re-run the edit pass by pass against the reference
    verification used, on the same inputs (``beats_compiler.bisect``)."""
    base_dir = loaded.base_dir if loaded is not None else None
    try:
        if done.reference is not None:
            ref_model, path = done.reference, None
        else:
            ref_model, path = original, (loaded.path if loaded is not None else None)
        ref = culprits.Reference(None if path is not None else ref_model, path, inputs=inputs, analysis_model=ref_model,
                           base_dir=base_dir)
        if done.pipeline is not None:
            pipe = dataclasses.replace(done.pipeline, base_dir=base_dir)
            return culprits.find([pipe.run], original, ref, rtol=rtol, atol=atol, failed=failed, base_dir=base_dir)
        return culprits.single_step(command, ref_model, result, ref, rtol=rtol, atol=atol, failed=failed,
                              base_dir=base_dir)
    except Exception as exc:  # noqa: BLE001 - the search must not hide the verification result
        return culprits.failed_search(exc)


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


def _pass_options(options: PassOptions) -> PipelineOptions:
    knobs = {k: v for k, v in (("fold_size_limit", options.fold_size_limit),
                               ("fold_memory_limit", options.fold_memory_limit)) if v is not None}
    return PipelineOptions(**knobs)


def compile(model, options: CompileOptions = CompileOptions(),  # noqa: A001 - the product's verb
            progress: Progress | None = None) -> CompileResult:
    """Optimize ``model`` for ``options.target``: the target's passes, then its
    lowering (``prepare`` before the passes, ``lower`` after them) when it has
    one, verified unless ``options.verify.enabled`` is False."""
    profile = get_target(options.target)
    given = options.target_options.given()
    if profile.convert == "none":
        check_flags(profile, given)
        return _optimize(model, profile, _pass_options(options.passes), options, progress,
                         verify=options.verify, bisect=options.bisect)
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    say("loading model")
    original, loaded = as_loaded(model)
    if (loaded is not None and loaded.uses_external_data) or uses_external_refs(original):
        raise InputError(f"target {profile.name}: models with external data are not supported yet")
    check_flags(profile, given)
    target = target_module(profile)
    ctx = Lowering(original, loaded, profile, options, say, t0,
                   disabled=check_disabled(profile, options.passes.disable), pass_options=_pass_options(options.passes))
    target.prepare(ctx)
    base = _optimize(loaded if loaded is not None else original, profile, ctx.pass_options, options, progress,
                     verify=VerifyOptions(enabled=False, measure_latency=False), bisect=False)
    result = target.lower(base, ctx)
    return culprits.for_lowered(result, ctx)


def _optimize(model, profile: TargetProfile, pass_options: PipelineOptions, options: CompileOptions, progress,
              *, verify: VerifyOptions, bisect: bool) -> CompileResult:
    """The target's fp32 pipeline through ``transform``."""
    say = progress or (lambda _msg: None)
    env_box: list = []
    po = options.passes
    try:
        manager = PassManager(
            build_passes(profile.passes, pass_options),
            max_rounds=po.max_rounds,
            disabled=check_disabled(profile, po.disable) & set(profile.passes),
            check=(lambda g: check_model(to_model(g, env_box[0]))) if po.check_each_pass else None,
            check_idempotent=po.check_each_pass,  # a pass declared idempotent that changes its own result is a bug
            on_pass=lambda rec: say(f"round {rec.round}: {rec.name}"),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None

    def optimize(graph: gs.Graph, env) -> Edit:
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
        return Edit(records=run.records, rounds=run.rounds, converged=run.converged,
                    warnings=_limit_warnings(run.records, pass_options),
                    pipeline=culprits.Pipeline(lambda: build_passes(profile.passes, pass_options),
                                               frozenset(manager.disabled), po.max_rounds))

    return transform(model, "compile", optimize, target=profile.name, verify=verify, progress=progress, bisect=bisect)
