"""The report every entry point returns: what ran, what changed, how long."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx

from passes.convert import proto_subgraphs
from passes.tensors import tensor_nbytes

from .errors import short_message


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
                weight += tensor_nbytes(t, external_length=True) or 0
            for n in g.node:
                hist[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"] += 1
            for sub in proto_subgraphs(g):
                walk(sub)

        walk(model.graph)
        return cls(sum(hist.values()), inits, weight, dict(sorted(hist.items())))


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
    # how each generated verification input was made ({input: "int64 [2,7] mask 0/1, mostly 1
    # (Cast to bool)", ..., "<dims>": "batch=2, seq=3; ..."}); empty for the user's inputs
    verify_inputs_generated: dict[str, str] = field(default_factory=dict)
    # how the original and the result were run: "side by side" or "one at a time, ..."
    verify_method: str | None = None
    warnings: list[str] = field(default_factory=list)
    command: str = "compile"
    reparam: dict | None = None  # insert/fold/unfold: weights, trainable parameter counts
    # gpu/npu: per node, does the target's provider take it, and why not
    # (beats_compiler.targets.legality.Legality.to_dict()); None for cpu.
    legality: dict | None = None
    # gpu/npu: what the lowering did (fp32 ops kept, quantization, accuracy, precompile)
    target_details: dict | None = None
    # When verification failed (or on request, --bisect): the first pass whose output
    # differs and the node of that output (beats_compiler.bisect); None when not searched.
    culprit: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def take_verification(self, ver) -> None:
        """Copy a ``verify.Verification``'s results into this report."""
        self.verified = ver.verified
        self.max_abs_diff = ver.max_abs_diff
        self.max_rel_diff = ver.max_rel_diff
        self.outputs = [o.to_dict() for o in ver.outputs]
        self.verify_inputs = ver.inputs
        self.verify_input_source = ver.input_source
        self.verify_inputs_generated = ver.generated
        self.verify_method = ver.method
        self.latency_ms_before = ver.latency_ms_before
        self.latency_ms_after = ver.latency_ms_after

    def to_json(self) -> str:
        return json.dumps(finite_json(self.to_dict()), indent=2, allow_nan=False, default=_jsonable)

    def failure_line(self) -> str:
        """One line for a failed verification: the worst output and, when
        known, the culprit pass and node (``verification failed: ...``)."""
        bad = [o for o in self.outputs if not o.get("ok", True)]
        npu = self.target == "npu" and self.command == "compile"
        leg = self.legality or {}
        if not bad and leg.get("strict") and not leg.get("ok"):
            text = "--strict: a node falls back off the target's provider"
        elif bad:
            worst = max(bad, key=lambda o: _num(o.get("max_abs_diff")))
            name = short_message(worst.get("name"), 40, cut="hard")
            if worst.get("name", "").startswith("<"):  # <session>, <run>: the result did not run
                text = ("the result fails on ONNX Runtime" if self.culprit and self.culprit.get("pass")
                        else short_message(worst.get("detail") or "the result does not run on ONNX Runtime", 140,
                                           cut="hard"))
            elif npu:
                cos = 1.0 - _num(worst.get("max_abs_diff"))
                bar = (self.target_details or {}).get("min_cosine")
                text = f"cosine {cos:.4f}" + (f" < {bar}" if bar is not None else "") + f" on '{name}'"
            else:
                text = f"max abs diff {_fmt(worst.get('max_abs_diff'))} on '{name}'"
                if worst.get("detail"):
                    text += f" ({short_message(worst['detail'], 60, cut='hard')})"
        else:
            text = "the result does not match the original"
        c = self.culprit
        line = "verification failed: " + " ".join(text.split())
        if c and c.get("message"):
            full = line + "; " + " ".join(c["message"].split())
            if len(full) <= ERROR_LINE_LIMIT or not c.get("pass"):
                line = full
            else:  # the pass and the node, without the tensor and figures
                line += f"; first differing pass: {c['pass']}" + (f" (round {c['round']})" if c.get("round") else "")
                if c.get("node"):
                    line += f", node '{short_message(c['node'], 50, cut='hard')}'" + (f" ({c['op_type']})" if c.get("op_type") else "")
        return short_message(line, ERROR_LINE_LIMIT, cut="fit")

    def pass_totals(self) -> dict[str, dict]:
        """Per pass name: rounds it modified the graph, seconds, summed stats."""
        out: dict[str, dict] = {}
        for p in self.passes:
            row = out.setdefault(p["name"], {"modified": 0, "seconds": 0.0, "stats": Counter()})
            row["modified"] += int(p["modified"])
            row["seconds"] += p["seconds"]
            row["stats"].update(p["stats"])
        return out


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def _fmt(v) -> str:
    x = _num(v)
    return f"{x:.3g}" if math.isfinite(x) else "inf"


ERROR_LINE_LIMIT = 185  # characters of a one-line error: with the CLI's "beats-compile: " prefix, 200


def _jsonable(o):
    return str(o)


def finite_json(o):
    """JSON has no inf/NaN: such a diff (e.g. a shape mismatch) is written as a string."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, list):
        return [finite_json(v) for v in o]
    return o
