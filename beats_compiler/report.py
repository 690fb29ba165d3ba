"""The report every entry point returns: what ran, what changed, how long."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
from onnx import external_data_helper

from passes.convert import proto_subgraphs


@dataclass
class ModelStats:
    nodes: int
    initializers: int
    weight_bytes: int
    op_histogram: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "ModelStats":
        hist: Counter = Counter()
        inits = 0
        weight = 0

        def walk(g: onnx.GraphProto) -> None:
            nonlocal inits, weight
            for t in g.initializer:
                inits += 1
                weight += _tensor_bytes(t)
            for n in g.node:
                hist[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"] += 1
            for sub in proto_subgraphs(g):
                walk(sub)

        walk(model.graph)
        return cls(sum(hist.values()), inits, weight, dict(sorted(hist.items())))


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(t):
        for e in t.external_data:
            if e.key == "length":
                return int(e.value)
    count = 1
    for d in t.dims:
        count *= d
    try:  # from dims: reading raw_data would copy the whole weight
        return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        return len(t.raw_data) if t.HasField("raw_data") else 0


@dataclass
class CompileReport:
    target: str
    input: str | None
    output: str | None
    verified: bool | None  # None when verification was skipped
    max_abs_diff: float | None
    max_rel_diff: float | None
    rtol: float
    atol: float
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    file_size_before: int
    file_size_after: int
    latency_ms_before: float | None
    latency_ms_after: float | None
    op_histogram_before: dict[str, int]
    op_histogram_after: dict[str, int]
    passes: list[dict]
    rounds: int
    converged: bool
    seconds: float
    outputs: list[dict] = field(default_factory=list)
    verify_inputs: dict[str, list[int]] = field(default_factory=dict)
    verify_input_source: str | None = None
    warnings: list[str] = field(default_factory=list)
    command: str = "compile"
    reparam: dict | None = None  # insert/fold/unfold: weights, trainable parameter counts
    # gpu/npu: per node, does the target's provider take it, and why not
    # (beats_compiler.legality.Legality.to_dict()); None for cpu.
    legality: dict | None = None
    # gpu/npu: what the lowering did (fp32 ops kept, quantization, accuracy, precompile)
    target_details: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False, default=_jsonable)

    def pass_totals(self) -> dict[str, dict]:
        """Per pass name: rounds it modified the graph, seconds, summed stats."""
        out: dict[str, dict] = {}
        for p in self.passes:
            row = out.setdefault(p["name"], {"modified": 0, "seconds": 0.0, "stats": Counter()})
            row["modified"] += int(p["modified"])
            row["seconds"] += p["seconds"]
            row["stats"].update(p["stats"])
        return out


def _jsonable(o):
    return str(o)


def _finite(o):
    """JSON has no inf/NaN: such a diff (e.g. a shape mismatch) is written as a string."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o
