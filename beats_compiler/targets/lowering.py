"""What the lowering targets (gpu: fp16, npu: QDQ) share: the context a
target's ``lower`` gets, the model-level pass protocol of the conversion steps
(their records join the pass manager's in the report), the cleanup passes
after a conversion, the ONNX check, the report's after-figures and --strict."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx

from passes import PassError, PassManager, PassRecord, to_graph, to_model
from passes.convert import quiet

from ..errors import BeatsError, InputError, InternalError
from ..io import LoadedModel, check_model, serialized_size
from ..options import CompileOptions
from ..report import ModelStats
from .profile import PipelineOptions, TargetProfile, build_passes


@dataclass
class Lowering:
    """One lowered compile: what ``prepare`` and ``lower`` of a target get."""

    original: onnx.ModelProto
    loaded: LoadedModel | None
    profile: TargetProfile
    options: CompileOptions
    say: Callable[[str], None]
    t0: float
    disabled: frozenset = frozenset()  # pass names not to run (``targets.check_disabled``)
    pass_options: PipelineOptions = field(default_factory=PipelineOptions)  # of the fp32 pipeline
    state: dict = field(default_factory=dict)  # what ``prepare`` found (npu: shapes, calibration data)


@dataclass
class ModelPassResult:
    model: onnx.ModelProto
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class ModelPass:
    """A pass over the whole ModelProto (a conversion that an outside tool does:
    onnxruntime's fp16 converter, its quantizer), recorded like a graph pass."""

    name: ClassVar[str] = ""

    def call(self, model: onnx.ModelProto) -> ModelPassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, model: onnx.ModelProto) -> tuple[ModelPassResult, PassRecord]:
        t = time.perf_counter()
        result = self.call(model)
        return result, PassRecord(self.name, 0, result.modified, time.perf_counter() - t, dict(result.stats))


def run_post(model: onnx.ModelProto, profile: TargetProfile, options: PipelineOptions, max_rounds: int,
             disabled: frozenset = frozenset()):
    """The target's ``post_passes`` on ``model``: (cleaned model, manager report)."""
    graph, env = to_graph(model)
    manager = PassManager(build_passes(profile.post_passes, options), max_rounds=max_rounds,
                          disabled=disabled & set(profile.post_passes))
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


def check(model: onnx.ModelProto, what: str) -> None:
    try:
        check_model(model)
    except InputError as exc:
        raise InternalError(f"the {what} fails the ONNX checker: {exc}") from None


def update_after(report, model: onnx.ModelProto) -> None:
    after = ModelStats.of(model)
    report.nodes_after = after.nodes
    report.initializers_after = after.initializers
    report.weight_bytes_after = after.weight_bytes
    report.op_histogram_after = after.op_histogram
    size = serialized_size(model)
    report.file_size_after = size if size is not None else after.weight_bytes


def apply_strict(report, leg, strict: bool) -> None:
    if leg.fallback:
        names = ", ".join(f"{i.node} ({i.op})" for i in leg.fallback[:5]) + (" ..." if len(leg.fallback) > 5 else "")
        report.warnings.append(f"{len(leg.fallback)} node(s) not taken by {report.target}'s provider: {names}")
        if strict:
            report.verified = False
            report.warnings.append("--strict: a node falls back off the target's provider; the compile fails")
