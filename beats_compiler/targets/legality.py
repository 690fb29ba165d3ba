"""Legality: per node, does the target's provider take it, and why not.

``static_check`` reads the target profile (legal ops, dtypes, static shapes)
against the graph with inferred types; ``from_placement`` turns a real QNN
session's node assignment (``targets.qnn.placement``) into the same
report, with the provider's own reason for each node it left on the CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from passes.convert import quiet, to_graph
from passes.graph import is_const, is_standard
from passes.shapes import infer_types

from .profile import TargetProfile

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass
class NodeIssue:
    node: str
    op: str
    reasons: list[str]
    provider: str = "CPUExecutionProvider"


@dataclass
class Legality:
    target: str
    source: str  # "static" (profile) or "qnn-session" (the real provider's assignment)
    nodes_total: int
    nodes_on_target: int
    compute_nodes_total: int
    compute_nodes_on_target: int
    fallback: list[NodeIssue] = field(default_factory=list)  # nodes the provider does not take
    expected_fallback: list[NodeIssue] = field(default_factory=list)  # I/O Q/DQ kept on CPU by design
    inserted_nodes: dict[str, int] = field(default_factory=dict)  # provider -> nodes ORT added
    notes: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def fraction_on_target(self) -> float:
        return self.nodes_on_target / self.nodes_total if self.nodes_total else 1.0

    @property
    def compute_fraction_on_target(self) -> float:
        return self.compute_nodes_on_target / self.compute_nodes_total if self.compute_nodes_total else 1.0

    @property
    def ok(self) -> bool:
        """No compute node falls back (what --strict demands)."""
        return not self.fallback

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fraction_on_target"] = round(self.fraction_on_target, 4)
        d["compute_fraction_on_target"] = round(self.compute_fraction_on_target, 4)
        d["ok"] = self.ok
        return d


def _dtype_name(dt) -> str | None:
    if dt is None:
        return None
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt)


def node_reasons(model: onnx.ModelProto, profile: TargetProfile) -> dict[str, tuple[str, list[str]]]:
    """name -> (op, reasons) for every top-level node the profile rules out."""
    with quiet():
        graph, _env = to_graph(model)
    tm = infer_types(graph)
    out: dict[str, tuple[str, list[str]]] = {}
    for i, node in enumerate(graph.nodes):
        reasons: list[str] = []
        name = node.name or f"<{node.op} #{i}>"
        if not is_standard(node):
            reasons.append(f"op {node.domain}:{node.op} is not a standard ONNX op")
        elif profile.legal_ops is not None and node.op not in profile.legal_ops:
            reasons.append(f"op {node.op} is not supported by {profile.providers[0]}")
        if any(True for _ in node.subgraphs()):
            reasons.append("has a subgraph (control flow)")
        for t in list(node.inputs) + list(node.outputs):
            if not t.name:
                continue
            if profile.legal_dtypes is not None:
                dn = _dtype_name(tm.dtype(t))
                if dn is not None and dn not in profile.legal_dtypes:
                    reasons.append(f"dtype {dn} on {t.name!r}")
            if profile.static_shapes and not is_const(t):
                s = tm.shape(t)
                if s is None or not all(isinstance(d, int) and d >= 0 for d in s):
                    reasons.append(f"dynamic shape on {t.name!r}" if s is not None else f"unknown shape of {t.name!r}")
        if reasons:
            out[name] = (node.op, list(dict.fromkeys(reasons)))
    return out


def static_check(model: onnx.ModelProto, profile: TargetProfile, strict: bool = False) -> Legality:
    bad = node_reasons(model, profile)
    total = len(model.graph.node)
    compute = [n for n in model.graph.node if n.op_type not in QDQ_OPS]
    issues = [NodeIssue(name, op, reasons) for name, (op, reasons) in bad.items()]
    bad_compute = sum(1 for i in issues if i.op not in QDQ_OPS)
    return Legality(profile.name, "static", total, total - len(issues), len(compute), len(compute) - bad_compute,
                    issues, strict=strict)


def _io_qdq(model: onnx.ModelProto) -> set[str]:
    """Q nodes reading a graph input and DQ nodes writing a graph output."""
    ins = {i.name for i in model.graph.input}
    outs = {o.name for o in model.graph.output}
    return {n.name for n in model.graph.node
            if (n.op_type == "QuantizeLinear" and n.input and n.input[0] in ins)
            or (n.op_type == "DequantizeLinear" and n.output and n.output[0] in outs)}


def from_placement(qdq: onnx.ModelProto, place, profile: TargetProfile, fp32_reasons: dict, strict: bool = False) -> Legality:
    """Legality of the quantized model as the QNN session placed it.  A node
    left on the CPU gets QNN's own reason when its log gave one, else the
    static reason of the fp32 node it came from, else a plain statement."""
    target_ep = profile.providers[0]
    io_qdq = _io_qdq(qdq)
    fallback: list[NodeIssue] = []
    expected: list[NodeIssue] = []
    on = compute_on = compute_total = 0
    for node in qdq.graph.node:
        ep = place.nodes.get(node.name, "unknown")
        is_compute = node.op_type not in QDQ_OPS
        compute_total += is_compute
        if ep == target_ep or ep.startswith("removed"):
            on += 1
            compute_on += is_compute
            continue
        reasons = []
        if node.name in place.reasons:
            reasons.append(f"QNN: {place.reasons[node.name]}")
        if node.name in fp32_reasons:
            reasons.extend(fp32_reasons[node.name][1])
        if not reasons and node.op_type in QDQ_OPS:
            reasons.append("a lone Quantize/Dequantize node between CPU nodes: the QNN EP does not take a single "
                           "Q/DQ node as a partition")
        if not reasons:
            reasons.append(f"{target_ep} did not take it (no reason logged)")
        issue = NodeIssue(node.name, node.op_type, reasons, ep)
        if node.name in io_qdq:
            expected.append(issue)
        else:
            fallback.append(issue)
    inserted: dict[str, int] = {}
    for ep in place.inserted.values():
        inserted[ep] = inserted.get(ep, 0) + 1
    notes = list(place.notes)
    if expected:
        notes.append(f"{len(expected)} Quantize/Dequantize node(s) at the model's fp32 inputs/outputs run on the CPU "
                     "by design (the QNN EP leaves I/O conversion to the host)")
    return Legality(profile.name, "qnn-session", len(qdq.graph.node), on, compute_total, compute_on,
                    fallback, expected, inserted, notes, strict)
