"""Driver of the Beats reparameterization: insert, fold, unfold, adapters.

The records that make fold possible live in the model's ``metadata_props``
under ``passes.reparam.RECORD_KEY``; an adapter file is an ``.npz`` of the
D/V tensors plus the records (``ADAPTER_RECORDS``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes import Envelope, to_graph, to_model
from passes import reparam as rp
from passes.convert import uses_external_refs
from passes.graph import ComputedValues
from passes.gs_adapter import lazy_values

from .io import LoadedModel
from .options import Progress, VerifyOptions
from .pipeline import CompileResult, Edit, transform
from .errors import InputError
from .io import DataFolder, atomic_write_bytes

ADAPTER_RECORDS = "__beats_reparam__"
# Inserting must not change the function at all (V = 0): a tight tolerance.
INSERT_RTOL = 1e-6
INSERT_ATOL = 1e-6


def get_records(env: Envelope | onnx.ModelProto) -> list[rp.Record]:
    for e in env.metadata_props:
        if e.key == rp.RECORD_KEY:
            try:
                return rp.load_records(e.value)
            except rp.ReparamError as exc:
                raise InputError(str(exc)) from None
    return []


def _set_records(env: Envelope, records: list[rp.Record]) -> None:
    kept = [e for e in env.metadata_props if e.key != rp.RECORD_KEY]
    if records:
        entry = onnx.StringStringEntryProto(key=rp.RECORD_KEY, value=rp.dump_records(records))
        kept.append(entry)
    env.metadata_props = kept


def _bad(exc: rp.ReparamError) -> InputError:
    return InputError(str(exc))


def manifest_path(out: Path) -> Path:
    """Where ``insert`` writes the trainable manifest: beside ``out``, named after it
    (``m.inserted.onnx`` -> ``m.inserted.trainable.json``), so two inserts into one
    folder never overwrite each other's."""
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".trainable.json")


def trainable_manifest(model: onnx.ModelProto) -> dict:
    """``<out>.trainable.json``: the trainable (D, V, A, B) and frozen initializer names."""
    records = get_records(model)
    trainable = [n for r in records for n in r.trainable]
    tset = set(trainable)
    frozen = [t.name for t in model.graph.initializer if t.name not in tset]
    return {
        "trainable": trainable,
        "frozen": frozen,
        "weights": [{"weight": r.weight, "factorization": r.factorization, "rank": r.rank, "layout": r.layout,
                     "trainable": r.trainable} for r in records],
    }


_QUANTIZED_CONSUMERS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm",
                                  "DynamicQuantizeMatMul", "MatMulNBits"})


def _why_nothing(graph: gs.Graph, policy: rp.Policy) -> str:
    """Why no weight was selected, where the graph says: quantized weights, or
    float weights all under ``--min-size``."""
    quantized = sorted({n.op for n in graph.nodes if n.op in _QUANTIZED_CONSUMERS})
    dq = [n for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs and isinstance(n.inputs[0], gs.Constant)]
    if quantized or dq:
        what = ", ".join(quantized) if quantized else "DequantizeLinear of constants"
        return f": the weights are quantized ({what}); W0 + D*V needs float ones: insert into the float model"
    ops = {op for rule in policy.rules for op in rule.ops}
    small = [n.inputs[rp.WEIGHT_SLOTS[n.op][0]] for n in graph.nodes if n.op in ops
             and len(n.inputs) > rp.WEIGHT_SLOTS[n.op][0] and isinstance(n.inputs[rp.WEIGHT_SLOTS[n.op][0]], gs.Constant)]
    least = min(rule.min_size for rule in policy.rules)
    if small and all(int(np.prod(t.shape)) < least for t in small):
        return f": {len(small)} weight(s) of {', '.join(sorted(ops & {n.op for n in graph.nodes}))} are under " \
               f"--min-size {least} elements (lower it)"
    return ""


def insert(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    policy: rp.Policy | None = None,
    *,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float = INSERT_RTOL,
    atol: float = INSERT_ATOL,
    measure_latency: bool = True,
    verify_memory: int | None = None,
    verify_scope: str = "auto",
    progress: Progress | None = None,
    bisect: bool = False,
) -> CompileResult:
    """Insert D/V for the weights ``policy`` selects.  An already inserted
    weight is left alone; a selection that matches nothing is an
    ``InputError`` unless every match was inserted before (then a no-op).
    A model loaded lazily with external data gets its full-size initial D/V
    computed as it is written (see ``_streamed``)."""
    policy = policy or rp.Policy()
    model, source = _streamed(model)

    def edit(graph: gs.Graph, env: Envelope) -> Edit:
        old = get_records(env)
        try:
            records, stats = rp.insert(graph, policy, old, stream=source is not None)
        except rp.ReparamError as exc:
            raise _bad(exc) from None
        _collect_computed(graph, source)
        warnings = [f"skipped {w}: {why}" for w, why in stats.skipped.items()]
        if not stats.inserted and not stats.already:
            detail = f" ({'; '.join(warnings)})" if warnings else _why_nothing(graph, policy)
            raise InputError(f"the selection matches no weight{detail}")
        if not stats.inserted:
            warnings.append("no-op: every selected weight was already inserted")
        _set_records(env, records)
        total = _param_count(graph)
        return Edit(
            reparam={
                "inserted": stats.inserted,
                "already_inserted": stats.already,
                "skipped": stats.skipped,
                "trainable_params": stats.trainable_params,
                "trainable_params_total": sum(_trainable_count(r) for r in records),
                "model_params": total,
            },
            warnings=warnings,
        )

    return transform(model, "insert", edit, verify=VerifyOptions(
        verify, inputs, rtol, atol, measure_latency, memory=verify_memory, scope=verify_scope),
                     progress=progress, bisect=bisect)


def _streamed(model) -> tuple[object, DataFolder | None]:
    """A model loaded lazily with external data is transformed as it is
    written: its large new tensors (``ComputedValues``) are computed block by
    block into the data file, by verification and then by ``result.save``,
    never held whole.  The ``DataFolder`` that carries them to the writer
    becomes the model's (and the result's) ``base_dir``."""
    if isinstance(model, LoadedModel) and uses_external_refs(model.model):
        source = DataFolder(model.base_dir)
        return dataclasses.replace(model, data_folder=source), source
    return model, None


def _collect_computed(graph: gs.Graph, source: DataFolder | None) -> None:
    if source is not None:
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and isinstance(lazy_values(t), ComputedValues):
                source.computed[t.name] = lazy_values(t)


def _param_count(graph: gs.Graph) -> int:
    """Elements of the float initializers (not shape constants)."""
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and _is_float(t.dtype))


def _is_float(dtype) -> bool:
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:  # an ONNX type numpy lacks (bfloat16, float8): float
        return True


def _trainable_count(r: rp.Record) -> int:
    shp = rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)
    return sum(int(np.prod(shp[k])) for k in ("D", "V", "A", "B") if getattr(r, k))


def _substitute(graph: gs.Graph, values: Mapping[str, np.ndarray], names: set[str]) -> None:
    tensors = graph.tensors()
    for name in names:
        if name in values and isinstance(tensors.get(name), gs.Constant):
            old = tensors[name]
            new = gs.Constant(name, np.require(np.asarray(values[name], dtype=old.dtype), requirements="C"))
            for node in list(old.outputs):
                for i, t in enumerate(node.inputs):
                    if t is old:
                        node.inputs[i] = new


def fold(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    values: Mapping[str, np.ndarray] | None = None,
    *,
    adapter: "Adapter | None" = None,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    measure_latency: bool = True,
    verify_memory: int | None = None,
    verify_scope: str = "auto",
    progress: Progress | None = None,
    bisect: bool = False,
) -> CompileResult:
    """Fold ``W0 + D (.) V`` into each reparameterized weight.

    The D/V values are the model's own, or ``values`` (trained tensors by
    name), or an ``adapter`` (values plus records, applicable to the base
    model too).  The result is verified against the unfolded model carrying
    the same values.

    A model loaded lazily with external data is folded as it is written
    (see ``_streamed``): each folded weight whose W0 is in external data is
    computed block by block into the output's data file."""
    model, source = _streamed(model)

    def edit(graph: gs.Graph, env: Envelope) -> Edit:
        records = get_records(env)
        vals = dict(values or {})
        if adapter is not None:
            vals.update(adapter.values)
            if not records:
                records = adapter.records
        if not records:
            raise InputError("the model has no D/V to fold (it was not made by `beats-compile insert`); "
                             "pass --adapter to apply an adapter to a base model")
        unknown = set(vals) - {n for r in records for n in r.trainable}
        if unknown:
            raise InputError(f"values for unknown tensors: {', '.join(sorted(unknown)[:5])}")
        base_model = not any(n.name in {m for r in records for m in r.nodes} for n in graph.nodes)
        _substitute(graph, vals, set(vals))
        reference = None
        if verify and base_model:  # what the base plus the adapter computes, unfolded
            g2, env2 = to_graph(to_model(graph, env), env.base_dir)
            try:
                rp.reinsert(g2, records, vals)
            except rp.ReparamError as exc:
                raise _bad(exc) from None
            reference = to_model(g2, env2)
        elif verify:
            reference = to_model(graph, env)
        try:
            folded = rp.fold(graph, records, vals, stream=source is not None)
        except rp.ReparamError as exc:
            raise _bad(exc) from None
        _collect_computed(graph, source)
        _set_records(env, [])
        return Edit(reparam={"folded": folded}, reference=reference)

    return transform(model, "fold", edit, verify=VerifyOptions(
        verify, inputs, rtol, atol, measure_latency, memory=verify_memory, scope=verify_scope),
                     progress=progress, bisect=bisect)


def unfold(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike,
    adapter: "Adapter",
    *,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    measure_latency: bool = True,
    verify_memory: int | None = None,
    verify_scope: str = "auto",
    progress: Progress | None = None,
    bisect: bool = False,
) -> CompileResult:
    """Re-insert an adapter's D/V into a folded model to continue training:
    each weight becomes ``W - D (.) V`` plus the inserted D/V."""

    def edit(graph: gs.Graph, env: Envelope) -> Edit:
        if get_records(env):
            raise InputError("the model already carries D/V (it is inserted, not folded)")
        try:
            records = rp.unfold(graph, adapter.records, adapter.values)
        except rp.ReparamError as exc:
            raise _bad(exc) from None
        _set_records(env, records)
        return Edit(reparam={"unfolded": [r.weight for r in records]})

    return transform(model, "unfold", edit, verify=VerifyOptions(
        verify, inputs, rtol, atol, measure_latency, memory=verify_memory, scope=verify_scope),
                     progress=progress, bisect=bisect)


class Adapter:
    """Trained D/V tensors plus the records that say where they go."""

    def __init__(self, records: list[rp.Record], values: dict[str, np.ndarray]):
        self.records = records
        self.values = values

    @classmethod
    def from_model(cls, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> "Adapter":
        records = get_records(model)
        if not records:
            raise InputError("the model has no D/V (it was not made by `beats-compile insert`)")
        names = {n for r in records for n in r.trainable}
        values = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(base_dir or "")) for t in model.graph.initializer
                  if t.name in names}
        missing = names - set(values)
        if missing:
            raise InputError(f"the model lacks trained tensors {', '.join(sorted(missing))}")
        return cls(records, values)

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        np.savez(buf, **self.values, **{ADAPTER_RECORDS: np.array(rp.dump_records(self.records))})
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Adapter":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: adapter file not found")
        try:
            with np.load(p, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise InputError(f"{p}: not a readable adapter .npz ({type(exc).__name__})") from None
        if ADAPTER_RECORDS not in arrays:
            raise InputError(f"{p}: not a beats adapter (no {ADAPTER_RECORDS} entry)")
        try:
            records = rp.load_records(str(arrays.pop(ADAPTER_RECORDS)))
        except rp.ReparamError as exc:
            raise InputError(f"{p}: {exc}") from None
        return cls(records, arrays)


def load_values(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from .verify import load_inputs

    vals = load_inputs(path)
    vals.pop(ADAPTER_RECORDS, None)
    return vals
