"""One base model, many fine-tunes: ONNX Runtime adapter bases and ``.onnx_adapter`` files.

- ``make_base``: the inserted model with every trainable tensor (D, V, A, B) of
  every record made an IR >= 4 *overridable initializer* (a graph input with a
  default initializer of the same name).  The defaults make the delta zero (V = 0;
  A [in, 0] and B [0, out] for ``rank:R``, their rank dim symbolic), so the base
  alone computes the original model.  Then the target's pipeline (cpu), which
  keeps such inputs as inputs; verified against the original (the inserted model
  folded with a zero delta).  The parameters are listed in the model's
  ``metadata_props[BASE_KEY]``.
- ``export_adapter``: trained values (an ``reparam.Adapter`` / ``adapter.npz``)
  checked against a base (``check_fit``: one-line ``InputError``) and written with
  ``onnxruntime.AdapterFormat``, verified first: the base on ONNX Runtime with the
  adapter active equals the folded model for those values (max abs diff
  <= ``ADAPTER_ATOL``), then renamed into place (nothing written otherwise).

The serving side (one session, adapters per run) is ``beats_compiler.serving``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes import Envelope
from passes import reparam as rp
from passes.convert import uses_external_refs
from passes.graph import const_value, is_const, replace_uses

from . import pipeline
from .errors import InputError, InternalError, short_message
from .inputs import InputGenerator
from .io import LoadedModel, load_model
from .options import CompileOptions, PassOptions, Progress, VerifyOptions
from .pipeline import CompileResult, Edit, as_loaded, transform
from .reparam import Adapter, fold, get_records
from .report import finite_json
from .targets import get_target
from .verify import Session, check_inputs_match, compare, pick_generated, time_alternating
from .verify import verify as run_verification

__all__ = [
    "ADAPTER_ATOL",
    "ADAPTER_SUFFIX",
    "AdapterReport",
    "BASE_KEY",
    "RANK_DIM",
    "base_parameters",
    "carrying",
    "check_fit",
    "export_adapter",
    "make_base",
    "refusal",
]

BASE_KEY = "beats.adapter_base"
BASE_VERSION = 1
# The symbolic rank dim of A [in, r] and B [r, out].  ORT's allocation planner
# takes one dim name for one size across the whole graph (a rank-4 and a rank-8
# record under one name fail with "Shape mismatch attempting to re-use buffer"),
# so a base whose records differ in rank gets one name per rank: beats_rank_4, ...
RANK_DIM = "beats_rank"
ADAPTER_SUFFIX = ".onnx_adapter"
# base + adapter on ORT vs the folded model: max abs diff.  A 16-bit float output
# is also allowed LOW_PRECISION_ULPS ulps of its dtype at the output's scale
# (max |expected|): the folded model rounds each weight to float16 once, while
# ORT may drop the base's Cast of the computed W0 + delta to float16 (its Cast
# elimination around kernels it runs in float32) and read it unrounded.
ADAPTER_ATOL = 1e-4
LOW_PRECISION_ULPS = 4
ADAPTER_FORMAT_VERSION = 1  # AdapterFormat's adapter and model version fields

_REFUSALS = {
    "npu": "target npu cannot take adapters: the QNN HTP needs static shapes and quantized weights, but adapter "
           "parameters are run-time graph inputs (A/B of a symbolic rank) that would have to be quantized per "
           "adapter with the base's QDQ scales; make the base for cpu",
    "gpu": "target gpu cannot take adapters yet: after its float16 conversion the base with an adapter active "
           "differs from the folded model by about 1e-2 (float16 arithmetic), over the 1e-4 an adapter is verified "
           "to, and the converted graph no longer folds; make the base for cpu",
}


def refusal(target: str) -> str | None:
    """Why ``target`` cannot take an adapter base (one line), or None."""
    get_target(target)  # an unknown target is an InputError naming the known ones
    return _REFUSALS.get(target)


# --------------------------------------------------------------------------- the base


def _rank_dims(records: list[rp.Record]) -> dict[int, str]:
    ranks = sorted({r.rank for r in records if r.factorization == "rank"})
    return {r: RANK_DIM if len(ranks) == 1 else f"{RANK_DIM}_{r}" for r in ranks}


def _declared(rec: rp.Record, dims: dict[int, str]) -> dict[str, list]:
    """The graph-input shape of each trainable tensor (key D/V/A/B)."""
    shapes = {k: [int(d) for d in v] for k, v in rp.shapes_for(rec.shape, rec.axis, rec.factorization,
                                                                   rec.rank).items()}
    if rec.factorization == "rank":
        shapes["A"][1] = dims[rec.rank]
        shapes["B"][0] = dims[rec.rank]
    return shapes


def _default(key: str, value: np.ndarray, declared: list) -> np.ndarray:
    """The identity element: D keeps its value; V is zero; A and B have rank 0."""
    if key == "D":
        return value
    return np.zeros([0 if isinstance(d, str) else d for d in declared], dtype=value.dtype)


def _summary(records: list[rp.Record], params: dict[str, dict], defaults: int) -> dict:
    elements = sum(math.prod(rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)[k])
                   for r in records for k in ("D", "V", "A", "B") if getattr(r, k))
    itemsize = {n: np.dtype(p["dtype"]).itemsize for n, p in params.items()}
    nbytes = sum(math.prod(rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)[k]) * itemsize[getattr(r, k)]
                 for r in records for k in ("D", "V", "A", "B") if getattr(r, k))
    return {
        "adapter_parameters": len(params),
        "adapter_weights": len(records),
        "adapter_elements": int(elements),
        "adapter_bytes": int(nbytes),
        "default_bytes": int(defaults),
        "ranks": sorted({r.rank for r in records if r.factorization == "rank"}),
        "factorizations": sorted({r.factorization for r in records}),
        "layouts": sorted({r.layout for r in records}),
        "parameters": params,
    }


def _base_edit(graph: gs.Graph, env: Envelope) -> Edit:
    if any(e.key == BASE_KEY for e in env.metadata_props):
        raise InputError("the model is already an adapter base")
    records = get_records(env)
    if not records:
        raise InputError("the model has no D/V (it was not made by `beats-compile insert`)")
    dims = _rank_dims(records)
    tensors = graph.tensors()
    params: dict[str, dict] = {}
    defaults = 0
    for rec in records:
        declared = _declared(rec, dims)
        want = rp.shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)
        for key in ("D", "V", "A", "B"):
            name = getattr(rec, key)
            if not name:
                continue
            t = tensors.get(name)
            if not is_const(t):
                raise InputError(f"trained tensor {name!r} of weight {rec.weight!r} is not an initializer of the "
                                 "model (an adapter base is made from an inserted model)")
            value = np.asarray(const_value(t))
            if tuple(value.shape) != tuple(want[key]):
                raise InputError(f"trained tensor {name!r} has shape {list(value.shape)}, its record expects "
                                 f"{list(want[key])}")
            default = _default(key, value, declared[key])
            var = gs.Variable(name, dtype=value.dtype, shape=declared[key])
            replace_uses(t, var)
            graph.inputs.append(var)
            env.overridable[name] = onnx.numpy_helper.from_array(np.ascontiguousarray(default), name)
            defaults += default.nbytes
            params[name] = {"dtype": value.dtype.name, "shape": declared[key]}
    env.ir_version = max(env.ir_version, 4)  # overridable initializers need IR >= 4
    meta = json.dumps({"version": BASE_VERSION, "parameters": params}, sort_keys=True)
    env.metadata_props = [e for e in env.metadata_props if e.key != BASE_KEY] + [
        onnx.StringStringEntryProto(key=BASE_KEY, value=meta)]
    return Edit(reparam=_summary(records, params, defaults))


def _weight_dtype(rec: rp.Record) -> np.dtype:
    """The record's weight dtype (bfloat16 and friends through ml_dtypes)."""
    try:
        return np.dtype(rec.dtype)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, rec.dtype))


def _zero_delta(records: list[rp.Record]) -> dict[str, np.ndarray]:
    """Values that make every record's delta zero (fold then keeps W0's bits)."""
    out = {}
    for r in records:
        shp = rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)
        key = "B" if r.factorization == "rank" else "V"
        out[getattr(r, key)] = np.zeros(shp[key], np.float32)
    return out


def _self_contained(model) -> tuple[onnx.ModelProto, LoadedModel | None]:
    """The model in memory: a lazily loaded one is read again eagerly (the
    defaults of the adapter inputs are rewritten, not streamed)."""
    original, loaded = as_loaded(model)
    if loaded is not None and uses_external_refs(original):
        loaded = load_model(loaded.path)
        original = loaded.model
    return original, loaded


def _refresh(model: onnx.ModelProto, records: list[rp.Record], params: dict[str, Any]) -> None:
    """The optimized base must still take every parameter as an overridable
    input, and still fold (``export_adapter`` folds it): each record's effective
    tensor (weight layout) or renamed outputs (branch) must be there.  Inserted
    nodes the passes removed (a no-op Reshape, a Mul that CSE merged) are
    dropped from the records, so fold removes exactly the ones left."""
    inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    lost = [n for n in params if n not in inputs or n not in inits]
    if lost:
        raise InternalError(f"the optimized adapter base lost parameter {lost[0]!r} as an overridable input")
    weights = [r.weight for r in records if r.weight not in inits]
    if weights:
        raise InternalError(f"the optimized adapter base lost weight {weights[0]!r}: it would not fold")
    nodes = {n.name for n in model.graph.node}
    made = {o for n in model.graph.node for o in n.output}
    for r in records:
        r.nodes = [n for n in r.nodes if n in nodes]
        need = [r.effective] if r.layout == "weight" else [t for pair in r.renamed.items() for t in pair]
        gone = [t for t in need if t not in made]
        if gone or not r.nodes:
            what = f"tensor {gone[0]!r}" if gone else "every inserted node"
            raise InternalError(f"the optimized adapter base lost {what} of weight {r.weight!r}: it would not fold")
    kept = [e for e in model.metadata_props if e.key != rp.RECORD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept + [onnx.StringStringEntryProto(key=rp.RECORD_KEY,
                                                                    value=rp.dump_records(records))])


def make_base(
    inserted: onnx.ModelProto | LoadedModel | str | os.PathLike,
    *,
    target: str = "cpu",
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    measure_latency: bool = True,
    progress: Progress | None = None,
) -> CompileResult:
    """The adapter base of an inserted model (see the module doc), optimized by
    ``target``'s pipeline and verified against the original model (with no
    adapter) at the target's tolerance.  ``report.command`` is "adapter-base";
    ``report.reparam`` counts the parameters (``adapter_parameters``,
    ``adapter_bytes`` of one full adapter, ``ranks``, ``parameters``: name ->
    dtype and shape).  A target that cannot take adapters is an ``InputError``
    saying why (``refusal``)."""
    why = refusal(target)
    if why:
        raise InputError(why)
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    say("loading model")
    original, loaded = _self_contained(inserted)
    source = loaded if loaded is not None else original
    say("making the adapter parameters graph inputs")
    base = transform(source, "adapter-base", _base_edit, target=target,
                     verify=VerifyOptions(enabled=False, measure_latency=False), progress=progress)
    records = get_records(base.model)
    params = base.report.reparam["parameters"]
    # A 16-bit weight of the weight layout is read as Cast(W0) to float32: folding
    # that Cast would store W0 as a float32 copy (twice its bytes) under another
    # name, and the base would no longer fold.
    narrow = sorted({r.dtype for r in records if r.layout == "weight" and _weight_dtype(r).itemsize < 4})
    disable = ("fold_constants",) if narrow else ()
    result = pipeline.compile(base.model, CompileOptions(target=target, verify=VerifyOptions(enabled=False),
                                                         passes=PassOptions(disable=disable)), progress)
    if narrow:
        result.report.warnings.append(f"fold_constants not run: it would fold the Cast of the {'/'.join(narrow)} "
                                      "weights into float32 copies")
    _refresh(result.model, records, params)
    report = result.report
    for f in ("input", "nodes_before", "initializers_before", "weight_bytes_before", "file_size_before",
              "op_histogram_before"):
        setattr(report, f, getattr(base.report, f))
    report.command = "adapter-base"
    report.reparam = base.report.reparam
    report.warnings = list(base.report.warnings) + list(report.warnings)
    profile = get_target(target)
    report.rtol = profile.rtol if rtol is None else rtol
    report.atol = profile.atol if atol is None else atol
    if verify:
        say("folding a zero delta: the original model")
        reference = fold(source, _zero_delta(records), verify=False).model
        say("verifying on ONNX Runtime (no adapter active)")
        ver = run_verification(reference, result.model, inputs=inputs, rtol=report.rtol, atol=report.atol,
                               measure_latency=measure_latency)
        report.take_verification(ver)
    else:
        report.verified = report.max_abs_diff = report.max_rel_diff = None
        report.latency_ms_before = report.latency_ms_after = None
    report.seconds = round(time.perf_counter() - t0, 4)
    return result


# --------------------------------------------------------------------------- reading a base


def _as_model(base) -> onnx.ModelProto:
    if isinstance(base, onnx.ModelProto):
        return base
    if isinstance(base, LoadedModel):
        return base.model
    if isinstance(base, (str, os.PathLike)):
        p = Path(base)
        if not p.is_file():
            raise InputError(f"{p}: base model not found")
        try:
            return onnx.load(str(p), load_external_data=False)
        except Exception as exc:
            raise InputError(f"{p}: not a readable ONNX model ({short_message(exc, 80)})") from None
    raise InputError(f"expected an adapter base (onnx.ModelProto or path), got {type(base).__name__}")


def base_parameters(base_model, *, where: str = "the model") -> dict[str, tuple[str, list]]:
    """name -> (dtype name, shape) of every adapter parameter of a base, from its
    ``BASE_KEY`` metadata; a rank dim is the string ``beats_rank`` (or
    ``beats_rank_<R>`` when the records differ in rank).  ``InputError`` when
    the model is not an adapter base."""
    model = _as_model(base_model)
    text = next((e.value for e in model.metadata_props if e.key == BASE_KEY), None)
    if text is None:
        raise InputError(f"{where} is not an adapter base (no {BASE_KEY} metadata; make one with "
                         "`beats-compile adapter-base`)")
    try:
        data = json.loads(text)
        if data.get("version") != BASE_VERSION:
            raise InputError(f"{where}: adapter base version {data.get('version')!r} is not supported")
        out = {}
        for name, p in data["parameters"].items():
            dtype, shape = p["dtype"], p["shape"]
            np.dtype(dtype)
            if not isinstance(shape, list) or not all(isinstance(d, (int, str)) and not isinstance(d, bool)
                                                      for d in shape):
                raise ValueError(f"bad shape of {name!r}")
            out[name] = (str(dtype), list(shape))
        return out
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{where}: unreadable {BASE_KEY} metadata ({short_message(exc, 80)})") from None


# --------------------------------------------------------------------------- fit


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(bfloat16)": "bfloat16"}


def _shape_dtype(v) -> tuple[list[int], str]:
    """Shape and dtype name of an array or an ``onnxruntime.OrtValue``."""
    if callable(getattr(v, "data_type", None)) and callable(getattr(v, "shape", None)):
        t = v.data_type()
        return [int(d) for d in v.shape()], _ORT_TYPES.get(t, t)
    a = np.asarray(v) if not hasattr(v, "dtype") else v
    return [int(d) for d in a.shape], np.dtype(a.dtype).name


_FIELDS = (("shape", "shape"), ("dtype", "dtype"), ("factorization", "factorization"), ("rank", "rank"),
           ("layout", "layout"), ("axis", "output axis"))


def _record_mismatch(a: rp.Record, b: rp.Record) -> str | None:
    for f, label in _FIELDS:
        va, vb = getattr(a, f), getattr(b, f)
        if f == "shape":
            va, vb = list(va), list(vb)
        if va != vb:
            return f"weight {b.weight!r} has {label} {va} in the adapter, {vb} in the base"
    for key in ("D", "V", "A", "B"):
        va, vb = getattr(a, key), getattr(b, key)
        if va != vb:
            return f"weight {b.weight!r}: its {key} tensor is {va!r} in the adapter, {vb!r} in the base"
    return None


def _fit_problem(adapter, base_model, where: str) -> str | None:
    params = base_parameters(base_model, where=where)
    records = get_records(_as_model(base_model))
    if isinstance(adapter, Adapter):
        mine = {r.weight: r for r in adapter.records}
        theirs = {r.weight: r for r in records}
        for r in records:
            if r.weight not in mine:
                return f"weight {r.weight!r} of the base is not in the adapter"
        for r in adapter.records:
            if r.weight not in theirs:
                return f"weight {r.weight!r} of the adapter is not in the base"
            why = _record_mismatch(r, theirs[r.weight])
            if why:
                return why
        values = adapter.values
    elif isinstance(adapter, Mapping):
        values = adapter
    else:
        raise InputError(f"expected a reparam.Adapter or a mapping of tensors, got {type(adapter).__name__}")
    owner = {n: (r, k) for r in records for k in ("D", "V", "A", "B") if (n := getattr(r, k))}
    order = [n for n in owner if n in params] + [n for n in params if n not in owner]  # the records' order
    for name in order:
        if name not in values:
            r, k = owner.get(name, (None, "?"))
            of = f" ({k} of weight {r.weight!r})" if r is not None else ""
            return f"tensor {name!r}{of} is missing from the adapter"
    for name in values:
        if name not in params:
            return f"tensor {name!r} is not a parameter of the base"
    for name in order:
        dtype = params[name][0]
        shape, got = _shape_dtype(values[name])
        r, k = owner.get(name, (None, None))
        if r is not None:
            want = [int(d) for d in rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)[k]]
            if shape != want:
                if k in ("A", "B") and len(shape) == 2:
                    other = shape[1] if k == "A" else shape[0]
                    same_rest = (shape[0] == want[0]) if k == "A" else (shape[1] == want[1])
                    if same_rest:
                        return f"weight {r.weight!r} has rank {other} in the adapter, {r.rank} in the base"
                return f"tensor {name!r} has shape {shape} in the adapter, {want} in the base"
        if got != dtype:
            return f"tensor {name!r} is {got} in the adapter, {dtype} in the base"
    return None


def check_fit(adapter, base_model, *, what: str = "adapter", where: str = "base") -> None:
    """``InputError`` (one line, the first mismatch) unless ``adapter`` fits the
    base: a ``reparam.Adapter`` must have the base's records (weights, shapes,
    dtype, factorization, rank, layout, axis, tensor names); its values (or a
    plain mapping name -> array or ``OrtValue``) exactly the base's parameters,
    each in the shape its record gives and the dtype of the base's input."""
    why = _fit_problem(adapter, base_model, where)
    if why:
        raise InputError(f"{what} does not fit {where}: {why}")


# --------------------------------------------------------------------------- export


@dataclass
class AdapterReport:
    """What ``export_adapter`` did (``to_dict`` for the JSON report)."""

    adapter: str | None
    base: str | None
    output: str | None  # None: nothing was written
    parameters: int
    elements: int
    bytes: int  # the parameters' bytes
    file_bytes: int | None
    weights: int
    ranks: list[int]
    verified: bool | None  # None: verification skipped
    max_abs_diff: float | None
    atol: float  # fp32 outputs; a 16-bit float output also gets ``low_precision_ulps`` at its scale
    low_precision_ulps: int
    outputs: list[dict] = field(default_factory=list)
    verify_inputs: dict[str, list[int]] = field(default_factory=dict)
    verify_input_source: str | None = None
    verify_inputs_generated: dict[str, str] = field(default_factory=dict)
    latency_ms_folded: float | None = None
    latency_ms_adapter: float | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str = "export-adapter"

    @property
    def ok(self) -> bool:
        return self.verified is not False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(finite_json(self.to_dict()), indent=2, allow_nan=False)

    def failure_line(self) -> str:
        bad = [o for o in self.outputs if not o.get("ok", True)]
        if not bad:
            return "verification failed: base + adapter does not match the folded model"
        worst = max(bad, key=lambda o: o["max_abs_diff"])
        detail = f" ({short_message(worst['detail'], 80, cut='hard')})" if worst.get("detail") else ""
        return (f"verification failed: base + adapter vs the folded model: max abs diff "
                f"{worst['max_abs_diff']:.3g} on {short_message(worst['name'], 40, cut='hard')!r}{detail}")


def _adapter_of(adapter) -> tuple[Adapter, str, Path | None]:
    if isinstance(adapter, Adapter):
        return adapter, "the adapter", None
    if isinstance(adapter, (str, os.PathLike)):
        p = Path(adapter)
        return Adapter.load(p), p.name, p
    raise InputError(f"expected a reparam.Adapter or an adapter .npz path, got {type(adapter).__name__}")


def _base_of(base) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(base, (str, os.PathLike)):
        p = Path(base)
        return load_model(p).model, p.name, p
    if isinstance(base, LoadedModel):
        return base.model, base.path.name, base.path
    if isinstance(base, onnx.ModelProto):
        return as_loaded(base)[0], "the base", None
    raise InputError(f"expected an adapter base (onnx.ModelProto or path), got {type(base).__name__}")


def _carry_edit(params: set[str], values: Mapping[str, np.ndarray]):
    """An edit that turns a base back into an inserted model carrying ``values``."""

    def edit(graph: gs.Graph, env: Envelope) -> Edit:
        for t in list(graph.inputs):
            if t.name in params:
                replace_uses(t, gs.Constant(t.name, np.ascontiguousarray(values[t.name])))
                graph.inputs.remove(t)
                env.overridable.pop(t.name, None)
        env.metadata_props = [e for e in env.metadata_props if e.key != BASE_KEY]
        return Edit()

    return edit


def carrying(base, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The base as an inserted model whose D/V (A/B) are ``values`` (every
    parameter of the base): what the base computes with that adapter active,
    as plain initializers."""
    params = set(base_parameters(base))
    missing = sorted(params - set(values))
    if missing:
        raise InputError(f"no value for adapter parameter {missing[0]!r}")
    return transform(base, "adapter-values", _carry_edit(params, values),
                     verify=VerifyOptions(enabled=False, measure_latency=False)).model


_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def _atol(expected) -> float:
    """ADAPTER_ATOL, plus LOW_PRECISION_ULPS ulps at the output's scale for a 16-bit float output."""
    a = np.asarray(expected)
    eps = _EPS.get(a.dtype.name)
    if eps is None or a.size == 0:
        return ADAPTER_ATOL
    scale = float(np.max(np.abs(a.astype(np.float64)[np.isfinite(a.astype(np.float64))]), initial=0.0))
    return ADAPTER_ATOL + LOW_PRECISION_ULPS * eps * scale


def _write_adapter(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_FORMAT_VERSION)
    fmt.set_model_version(ADAPTER_FORMAT_VERSION)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
    fmt.export_adapter(path)


def _check_out(out: Path, taken: list[Path]) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: output folder {parent} does not exist")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    for t in taken:
        if out.resolve() == t.resolve() or (out.exists() and t.exists() and os.path.samefile(out, t)):
            raise InputError(f"{out}: refusing to overwrite the input file {t}")


def export_adapter(
    adapter: Adapter | str | os.PathLike,
    base: onnx.ModelProto | LoadedModel | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    measure_latency: bool = True,
    progress: Progress | None = None,
) -> AdapterReport:
    """Write ``adapter``'s values as an ONNX Runtime ``.onnx_adapter`` for
    ``base`` (an adapter base from ``make_base``), atomically.  The adapter must
    fit the base (``check_fit``; one-line ``InputError``, nothing written).
    Verified first (unless ``verify`` is False): the base with the adapter active
    on ONNX Runtime against the folded model for these values; when they differ
    the report says so (``verified`` False) and nothing is written."""
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    ad, what, ad_path = _adapter_of(adapter)
    say("loading the base")
    base_model, where, base_path = _base_of(base)
    params = base_parameters(base_model, where=where)
    check_fit(ad, base_model, what=what, where=where)
    for name in params:
        a = np.asarray(ad.values[name])
        if a.size and not np.all(np.isfinite(a)):
            raise InputError(f"{what}: tensor {name!r} has non-finite values (NaN or inf)")
    out = Path(out_path)
    _check_out(out, [p for p in (ad_path, base_path) if p is not None])
    records = get_records(base_model)
    arrays = {n: np.ascontiguousarray(np.asarray(ad.values[n])) for n in params}
    warnings: list[str] = []
    zero = [r.weight for r in records if not np.any(arrays[r.B if r.factorization == "rank" else r.V])]
    if len(zero) == len(records):
        warnings.append("the adapter changes nothing: every V (B) is zero")
    report = AdapterReport(
        adapter=str(ad_path) if ad_path is not None else None,
        base=str(base_path) if base_path is not None else None,
        output=None,
        parameters=len(arrays),
        elements=int(sum(a.size for a in arrays.values())),
        bytes=int(sum(a.nbytes for a in arrays.values())),
        file_bytes=None,
        weights=len(records),
        ranks=sorted({r.rank for r in records if r.factorization == "rank"}),
        verified=None,
        max_abs_diff=None,
        atol=ADAPTER_ATOL,
        low_precision_ulps=LOW_PRECISION_ULPS,
        warnings=warnings,
    )
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        say("writing the adapter")
        try:
            _write_adapter(tmp, arrays)
        except Exception as exc:
            raise InputError(f"{out}: cannot write the adapter ({short_message(exc, 100)})") from None
        if verify:
            _verify(report, base_model, base_path, ad.values, tmp, inputs, measure_latency, say)
        if report.verified is not False:
            os.replace(tmp, out)
            report.output = str(out)
            report.file_bytes = out.stat().st_size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report.seconds = round(time.perf_counter() - t0, 4)
    return report


def _verify(report: AdapterReport, base_model, base_path, values, adapter_file: str, inputs, measure_latency,
            say) -> None:
    import onnxruntime as ort

    say("folding the adapter into the base")
    folded = fold(carrying(base_model, values), verify=False).model
    say("verifying on ONNX Runtime (base + adapter vs folded)")
    try:
        s_ref = Session(folded, None)
    except Exception as exc:
        raise InternalError(f"ONNX Runtime cannot load the folded model: {short_message(exc, 100)}") from None
    try:
        s_base = Session(None if base_path is not None else base_model, base_path)
    except Exception as exc:
        s_ref.close()
        raise InputError(f"cannot verify: ONNX Runtime cannot load the base ({short_message(exc, 100)})") from None
    try:
        sr, sb = s_ref.sess, s_base.sess
        names = [i.name for i in sr.get_inputs()]
        if inputs is not None:
            check_inputs_match(names, inputs)
            feeds = dict(inputs)
            try:
                expected = sr.run(None, feeds)
            except Exception as exc:
                raise InputError(f"cannot verify: the folded model fails on ONNX Runtime with these inputs "
                                 f"({short_message(exc)})") from None
            report.verify_input_source = "user"
        else:
            gen = InputGenerator(sr.get_inputs(), folded, 0)
            cand, expected = pick_generated(sr, gen)
            feeds = cand.feeds
            report.verify_input_source = "generated"
            report.verify_inputs_generated = gen.describe(cand, None)
        report.verify_inputs = {k: list(np.shape(v)) for k, v in feeds.items()}
        lora = ort.LoraAdapter()
        lora.Load(adapter_file)
        ro = ort.RunOptions()
        ro.add_active_adapter(lora)
        out_names = [o.name for o in sr.get_outputs()]
        try:
            got = sb.run(out_names, feeds, ro)
            plain = sb.run(out_names, feeds)
        except Exception as exc:
            report.verified = False
            report.max_abs_diff = float("inf")
            report.outputs = [{"name": "<run>", "ok": False, "max_abs_diff": float("inf"),
                               "max_rel_diff": float("inf"),
                               "detail": f"the base with the adapter fails on ONNX Runtime: {short_message(exc)}"}]
            return
        diffs = [compare(n, a, b, 0.0, _atol(a)) for n, a, b in zip(out_names, expected, got)]
        report.outputs = [d.to_dict() for d in diffs]
        report.verified = all(d.ok for d in diffs)
        report.max_abs_diff = max((d.max_abs_diff for d in diffs), default=0.0)
        if report.verified and not any("changes nothing" in w for w in report.warnings) and all(
                np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, plain)):
            report.warnings.append("the adapter changes no output on the verification inputs")
        if measure_latency:
            report.latency_ms_folded, report.latency_ms_adapter = time_alternating(sr, sb, feeds, 2.0, 50, ro)
        del ro, lora
    finally:
        s_ref.close()
        s_base.close()
