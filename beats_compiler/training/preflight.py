"""Pre-flight for ONNX Runtime training 1.19.2: check, convert and legalize a
model before artifacts are generated, and report every problem at once.

Runs in both environments (onnx 1.23 beside onnxruntime 1.32, and onnx 1.17
beside onnxruntime-training 1.19.2): it imports onnx, numpy and ``passes``
only, never onnxruntime.

What ORT training 1.19.2 takes: IR <= 10, default-domain opset 7..21, the
domains ORT knows, and a gradient builder for every node on a path from a
trainable initializer to the loss output through float tensors
(``gradients.py`` says where that list comes from).  What this module changes
(``PreflightReport.fixes``): IR lowered to 10 when the model uses nothing
newer; opset > 21 taken down to 21 by onnx's version converter (a model
already at <= 21 is never converted); a missing loss-output shape filled in
from shape inference; LayerNormalization given Mean/InvStdDev outputs, a
zero bias and private copies of shared (frozen) scale/bias tensors
(the passes ``add_layernorm_stat_outputs``, ``add_layernorm_bias``, ``untie_layernorm_params``).
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes import AddLayerNormBias, AddLayerNormStatOutputs, UntieLayerNormParams, to_graph, to_model
from passes.convert import quiet
from passes.tensors import tensor_nbytes

from . import gradients as G

ORT_TRAINING = "ONNX Runtime training 1.19.2"
MAX_IR = 10
MAX_OPSET = 21
MIN_OPSET = 7
# Domains ORT 1.19 registers kernels or schemas for, with the highest opset it takes (None: any).
KNOWN_DOMAINS: dict[str, int | None] = {
    "": MAX_OPSET,
    "ai.onnx.ml": 4,
    "com.microsoft": 1,
    "com.microsoft.nchwc": 1,
    "com.microsoft.experimental": 1,
    "ai.onnx.training": 1,
    "ai.onnx.preview.training": 1,
    "org.pytorch.aten": 1,
    "com.ms.internal.nhwc": None,
}
_LIST = 8  # node names shown per problem before "and N more"
_STRIP_LIMIT = 1 << 20  # initializers above this many bytes travel without data through the converter


@dataclass
class PreflightProblem:
    # ir_version | opset | domain | no_gradient | no_trainable | unknown_trainable | trainable_dtype |
    # unreachable | loss_output | legalize | checker
    kind: str
    message: str  # one line, names op / node / version
    node: str | None = None
    op: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "node": self.node, "op": self.op}


@dataclass
class PreflightReport:
    model: onnx.ModelProto  # the legalized model artifacts should be generated from
    problems: list[PreflightProblem]
    fixes: list[str]
    # counts for reports: ir/opset before and after, nodes on the gradient path
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One header line, then one line per problem (or per fix when ok)."""
        if self.ok:
            head = f"pre-flight for {ORT_TRAINING}: ok"
            return "\n".join(
                [head + (f", {len(self.fixes)} fix(es)" if self.fixes else ", nothing to change")]
                + [f"  fixed: {f}" for f in self.fixes]
            )
        n = len(self.problems)
        lines = [f"{ORT_TRAINING} cannot take this model ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p.message}" + (";" if k < n - 1 else "") for k, p in enumerate(self.problems)]
        if self.fixes:
            lines.append("  (already fixed: " + "; ".join(self.fixes) + ")")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "fixes": list(self.fixes),
            "stats": dict(self.stats),
        }


# ---------------------------------------------------------------- helpers


def _names(labels: list[str]) -> str:
    shown = ", ".join(repr(x) for x in labels[:_LIST])
    more = len(labels) - _LIST
    return shown + (f" and {more} more" if more > 0 else "")


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} ({node.op_type}, unnamed)"


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in model.opset_import:
        out["" if o.domain == "ai.onnx" else o.domain] = int(o.version)
    return out


def _walk_graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for s in a.graphs:
                    yield from _walk_graphs(s)


def _all_nodes(model: onnx.ModelProto):
    for g in _walk_graphs(model.graph):
        yield from g.node
    for f in model.functions:
        yield from f.node


def _elem(vi: onnx.ValueInfoProto) -> int:
    t = vi.type
    return t.tensor_type.elem_type if t.HasField("tensor_type") else 0


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers turned into typed inputs (no weight bytes)."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        small = t.data_location != TensorProto.EXTERNAL and int(np.prod(list(t.dims), dtype=np.int64)) <= 1024
        if small:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return sk


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    try:
        return onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False), None
    except Exception as exc:  # reported in stats, types then come from the declared value infos only
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _elem_types(model: onnx.ModelProto, inferred: onnx.ModelProto | None) -> dict[str, int]:
    types: dict[str, int] = {}
    for g in (inferred.graph if inferred is not None else None, model.graph):
        if g is None:
            continue
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if _elem(vi):
                types.setdefault(vi.name, _elem(vi))
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


# ---------------------------------------------------------------- IR version

# Element types that IR 10 does not know (FLOAT4E2M1 = 23 is IR 11; later ones later).
_MAX_IR10_ELEM = TensorProto.INT4  # 22


def _ir_blockers(model: onnx.ModelProto) -> list[str]:
    """What in the model needs IR > 10."""
    found: list[str] = []
    if len(getattr(model, "configuration", ())):
        found.append("multi-device 'configuration' (IR 11)")
    new_types: set[str] = set()

    def check_type(elem: int, where: str) -> None:
        if elem > _MAX_IR10_ELEM:
            name = TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)
            new_types.add(f"{name} ({where})")

    for g in _walk_graphs(model.graph):
        for t in list(g.initializer):
            check_type(t.data_type, f"initializer {t.name!r}")
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            check_type(_elem(vi), f"tensor {vi.name!r}")
        for n in g.node:
            if len(getattr(n, "device_configurations", ())):
                found.append(f"node {n.name!r} has device_configurations (IR 11)")
            for a in n.attribute:
                if a.name == "to" and a.type == onnx.AttributeProto.INT:
                    check_type(int(a.i), f"{n.op_type} {n.name!r} 'to'")
                if a.type == onnx.AttributeProto.TENSOR:
                    check_type(a.t.data_type, f"{n.op_type} {n.name!r} attribute {a.name!r}")
    found.extend(f"element type {t}" for t in sorted(new_types))
    return found


# ---------------------------------------------------------------- opset conversion


def _strip_large(model: onnx.ModelProto) -> dict[str, bytes]:
    """Move large raw initializer bytes out of ``model`` (the converter copies
    the whole model and serializes it); returns them by name."""
    kept: dict[str, bytes] = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > _STRIP_LIMIT:
            kept[t.name] = t.raw_data
            t.ClearField("raw_data")
    return kept


def _restore_large(model: onnx.ModelProto, kept: dict[str, bytes]) -> None:
    for t in model.graph.initializer:
        if t.name in kept:
            t.raw_data = kept[t.name]


def _converter_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    m = re.search(r"failed:\s*(.+)", text)
    line = (m.group(1) if m else text).splitlines()[0] if text else type(exc).__name__
    return line.replace("$", "").strip()


def _convert(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto | None, str | None]:
    from onnx import version_converter

    kept = _strip_large(model)
    try:
        out = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter's failure becomes the reported blocker
        return None, _converter_reason(exc)
    finally:
        _restore_large(model, kept)
    _restore_large(out, kept)
    return out, None


def _conversion_blockers(
    model: onnx.ModelProto, target: int, types: dict[str, int]
) -> dict[str, tuple[str, list[str]]]:
    """Which ops the converter cannot take to ``target``: each distinct node
    form (op, attributes, arity) is converted alone.  op -> (reason, node labels)."""
    from onnx import version_converter

    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[tuple, list[tuple[onnx.NodeProto, str]]] = defaultdict(list)
    index = 0
    for g in _walk_graphs(model.graph):
        for n in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                index += 1  # control flow: its body nodes are probed one by one; alone it would miss outer names
                continue
            attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in n.attribute))
            groups[(n.domain, n.op_type, attrs, len(n.input), len(n.output))].append((n, _label(n, index)))
            index += 1
    out: dict[str, tuple[str, list[str]]] = {}
    for (domain, op, *_), members in groups.items():
        node = members[0][0]
        ins, small = [], []
        for name in dict.fromkeys(x for x in node.input if x):
            t = inits.get(name)
            if t is not None and t.data_location != TensorProto.EXTERNAL and len(t.raw_data) <= 8192:
                small.append(t)
            else:
                ins.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
        outs = [helper.make_tensor_value_info(x, types.get(x, TensorProto.FLOAT), None) for x in node.output if x]
        one = helper.make_model(
            helper.make_graph([node], "probe", ins, outs, small), opset_imports=list(model.opset_import)
        )
        one.ir_version = model.ir_version
        one.functions.extend(model.functions)
        try:
            version_converter.convert_version(one, target)
        except Exception as exc:  # this node form is a blocker
            key = G.qualified(op, domain)
            reason, labels = out.get(key, (_converter_reason(exc), []))
            out[key] = (reason, labels + [lab for _, lab in members])
    return out


# ---------------------------------------------------------------- gradient path


def _stop_edges(node: onnx.NodeProto) -> frozenset[int]:
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return frozenset() if to in G.GRAD_TYPES else frozenset({0})
    return G.STOP_GRADIENT_EDGES.get(node.op_type, frozenset())


def _implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's If/Loop/Scan bodies read from outside them."""
    bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    bodies += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    if not bodies:
        return []
    out: list[str] = []
    for body in bodies:
        defined: set[str] = set()
        for g in _walk_graphs(body):
            defined.update(i.name for i in g.input)
            defined.update(t.name for t in g.initializer)
            defined.update(x for n in g.node for x in n.output)
        for g in _walk_graphs(body):
            out.extend(x for n in g.node for x in n.input if x and x not in defined)
            out.extend(o.name for o in g.output if o.name not in defined)
    return list(dict.fromkeys(x for x in out if x not in node.input))


def _gradient_path(
    model: onnx.ModelProto, trainable: list[str], loss: str, types: dict[str, int]
) -> tuple[list[int], dict[str, str]]:
    """The top-level nodes ORT's gradient graph builder asks a gradient for
    (forward from the trainable initializers, backward from the loss, both
    skipping stop edges and non-float tensors), and, per trainable name that
    does not reach the loss, why."""
    nodes = list(model.graph.node)
    producer: dict[str, int] = {}
    consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
    inputs = [list(n.input) + _implicit_inputs(n) for n in nodes]  # outer names a body reads are edges too (as in ORT)
    for i, n in enumerate(nodes):
        for k, x in enumerate(inputs[i]):
            if x:
                consumers[x].append((i, k))
        for x in n.output:
            if x:
                producer[x] = i

    def differentiable(name: str) -> bool:
        t = types.get(name)
        if t:
            return t in G.GRAD_TYPES
        p = producer.get(name)
        return p is None or nodes[p].op_type not in G.NON_DIFFERENTIABLE_OPS

    reachable: set[int] = set()
    if loss in producer:
        start = producer[loss]
        reachable.add(start)
        queue = deque([start])
        while queue:
            i = queue.popleft()
            stop = _stop_edges(nodes[i])
            for k, x in enumerate(inputs[i]):
                if not x or k in stop or x not in producer or not differentiable(x):
                    continue
                p = producer[x]
                if p not in reachable:
                    reachable.add(p)
                    queue.append(p)

    unreachable: dict[str, str] = {}
    x_nodes: list[int] = []
    sub_names = {x for g in list(_walk_graphs(model.graph))[1:] for n in g.node for x in n.input}
    for t in trainable:
        cons = [i for i, _ in consumers.get(t, [])]
        if not cons:
            unreachable[t] = (
                "it is read only inside an If/Loop/Scan body, which ORT training cannot differentiate"
                if t in sub_names
                else "no node reads it"
            )
            continue
        hit = [i for i in cons if i in reachable]
        if not hit:
            unreachable[t] = (
                f"its consumers ({_names([_label(nodes[i], i) for i in cons])}) do not reach the loss output "
                "through float tensors"
            )
        x_nodes.extend(hit)

    visited: set[int] = set(x_nodes)
    queue = deque(dict.fromkeys(x_nodes))
    while queue:
        i = queue.popleft()
        for x in nodes[i].output:
            if not x or not differentiable(x):
                continue
            for j, k in consumers.get(x, []):
                if j not in reachable or k in _stop_edges(nodes[j]) or j in visited:
                    continue
                visited.add(j)
                queue.append(j)
    return sorted(visited), unreachable


def _gradient_problems(
    model: onnx.ModelProto, path: list[int], loss: str, opsets: dict[str, int]
) -> list[PreflightProblem]:
    nodes = model.graph.node
    functions = {(f.domain, f.name) for f in model.functions}
    missing: dict[str, list[str]] = defaultdict(list)
    reasons: dict[str, str] = {}
    for i in path:
        n = nodes[i]
        domain = "" if n.domain == "ai.onnx" else n.domain
        q = G.qualified(n.op_type, domain)
        label = _label(n, i)
        if (n.domain, n.op_type) in functions:
            missing[q].append(label)
            reasons[q] = "a model-local function call (ORT training differentiates its body only when inlined)"
        elif not G.has_gradient(n.op_type, domain, opsets.get(domain)):
            missing[q].append(label)
            if domain == "" and n.op_type in G.MIN_OPSET:
                reasons[q] = f"only from opset {G.MIN_OPSET[n.op_type]} on (the model imports opset {opsets.get('')})"
        elif (why := G.unsupported_form(n)) is not None:
            key = why.split(":")[0]
            missing[key].append(label)
            reasons[key] = why.split(": ", 1)[1]
    out = []
    for q, labels in missing.items():
        why = reasons.get(q, f"no gradient in {ORT_TRAINING}")
        out.append(
            PreflightProblem(
                "no_gradient",
                f"{q}: {why}; on the path from the trainable weights to {loss!r} "
                f"at {len(labels)} node(s): {_names(labels)}",
                node=labels[0],
                op=q,
            )
        )
    return out


# ---------------------------------------------------------------- legalization


def _identity_source(name: str, identity: dict[str, str]) -> str:
    for _ in range(17):
        if name not in identity:
            break
        name = identity[name]
    return name


def _read_frozen_directly(model: onnx.ModelProto, trainable: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Nodes reading a frozen initializer through Identity (T5's tied norm weights)
    read it directly, and the Identity goes; a frozen elementwise operand with
    several readers gets a copy per reader.  ORT's gradient builders name the
    gradient of such an operand after it, once per reader ("Duplicate definition")."""
    g = model.graph
    frozen = {t.name for t in g.initializer} - set(trainable)
    outputs = {o.name for o in g.output}
    source = {n.output[0]: n.input[0] for n in g.node
              if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1 and len(n.output) == 1
              and n.input[0] in frozen and n.output[0] not in outputs}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in out.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in source)]
    for n in keep:
        for i, x in enumerate(n.input):
            if x in source:
                n.input[i] = source[x]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    # ... and a frozen elementwise operand read by several nodes gets a private copy per reader:
    # ORT's elementwise gradient builders also name a frozen operand's gradient after it.
    inits = {t.name: t for t in out.graph.initializer}
    taken = set(inits) | {o for n in out.graph.node for o in n.output}
    seen: set[str] = set()
    copies = 0
    for n in out.graph.node:
        if n.op_type not in _ELEMENTWISE or n.domain not in ("", "ai.onnx"):
            continue
        for i, x in enumerate(n.input):
            t = inits.get(x)
            if t is None or x not in frozen or (tensor_nbytes(t) or 0) > _UNTIE_MAX_BYTES:
                continue
            if x not in seen:
                seen.add(x)
                continue
            k = 1
            while f"{x}__{k}" in taken:
                k += 1
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = n.input[i] = f"{x}__{k}"
            taken.add(copy.name)
            out.graph.initializer.append(copy)
            copies += 1
    if not source and not copies:
        return model, []
    fixes = []
    if source:
        fixes.append(f"{len(source)} Identity node(s) sharing frozen weight(s) {_names(sorted(set(source.values())))}: "
                     "their readers read the weight directly")
    if copies:
        fixes.append(f"{copies} private copies of frozen elementwise operands read by several nodes (ORT's gradient "
                     "builders would define their gradients twice)")
    return out, fixes


_ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div"})
_UNTIE_MAX_BYTES = 1 << 20  # larger frozen operands are not copied


def _legalize(model: onnx.ModelProto, trainable: list[str], base_dir: str | None) -> tuple[onnx.ModelProto, list[str]]:
    """Run the LayerNormalization legalization passes when some node needs them
    (after frozen weights shared through Identity are read directly)."""
    model, direct = _read_frozen_directly(model, trainable)
    need_out, need_bias, shared = [], [], []
    identity = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.output
    }
    readers: dict[str, int] = defaultdict(int)
    lns = [
        (i, n)
        for i, n in enumerate(_all_nodes(model))
        if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx", "com.microsoft")
    ]
    for i, n in lns:
        if len(n.output) < 3 or not all(n.output[1:3]):
            need_out.append(_label(n, i))
        if len(n.input) == 2 or (len(n.input) >= 3 and not n.input[2]):
            need_bias.append(_label(n, i))
        for x in n.input[1:3]:
            if x:
                src = _identity_source(x, identity)
                readers[src] += 1
                if readers[src] > 1:
                    shared.append(_label(n, i))
    if not need_out and not need_bias and not shared:
        return model, direct
    with quiet():
        graph, env = to_graph(model, base_dir)
        r_untie = UntieLayerNormParams(exclude=trainable)(graph)
        r_out = AddLayerNormStatOutputs()(graph)
        r_bias = AddLayerNormBias()(graph)
        result = to_model(graph, env)
    fixes = list(direct)
    if r_out.modified:
        fixes.append(
            f"LayerNormalization {_names(need_out)}: added Mean/InvStdDev outputs "
            "(ORT's LayerNormalizationGrad reads them)"
        )
    if r_bias.modified:
        fixes.append(
            f"LayerNormalization {_names(need_bias)}: added a zero bias (ORT's LayerNormalizationGrad needs one)"
        )
    if r_untie.modified:
        labels = list(dict.fromkeys(shared))
        fixes.append(
            f"LayerNormalization {_names(labels)}: private copies of {r_untie.stats['untied']} shared scale/bias "
            "tensor(s) (ORT's LayerNormalizationGrad would define their gradient twice)"
        )
    return result, fixes


# ---------------------------------------------------------------- entry point


def preflight(
    model: onnx.ModelProto, trainable: list[str], loss_output: str | None = None, *, base_dir: str | None = None
) -> PreflightReport:
    """Check ``model`` against what ORT training 1.19.2 takes, with
    ``trainable`` the initializers to train and ``loss_output`` the graph
    output the loss reads (default: the first).  Never modifies ``model``;
    ``report.model`` is the converted, legalized copy.  ``base_dir``: where
    the model's external data references resolve (a lazily loaded model)."""
    problems: list[PreflightProblem] = []
    fixes: list[str] = []
    stats: dict = {"ir_version": model.ir_version, "opset": _opsets(model).get("")}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    trainable = list(dict.fromkeys(trainable or []))

    # trainable initializers
    inits = {t.name: t for t in m.graph.initializer}
    if not trainable:
        problems.append(
            PreflightProblem("no_trainable", "no trainable initializer given (insert D/V first: beats-compile insert)")
        )
    valid: list[str] = []
    for name in trainable:
        t = inits.get(name)
        if t is None:
            problems.append(
                PreflightProblem("unknown_trainable", f"trainable {name!r} is not an initializer of the graph")
            )
        elif t.data_type not in G.GRAD_TYPES:
            dt = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
            problems.append(
                PreflightProblem("trainable_dtype", f"trainable {name!r} is {dt}, not a float type ORT can train")
            )
        else:
            valid.append(name)

    # loss output
    outputs = {o.name: o for o in m.graph.output}
    if loss_output is None:
        loss_output = m.graph.output[0].name if len(m.graph.output) else None
    loss_ok = False
    if loss_output is None:
        problems.append(PreflightProblem("loss_output", "the graph has no output for the loss to read"))
    elif loss_output not in outputs:
        problems.append(
            PreflightProblem(
                "loss_output", f"loss output {loss_output!r} is not a graph output (outputs: {_names(list(outputs))})"
            )
        )
    else:
        elem = _elem(outputs[loss_output])
        if elem and elem not in G.GRAD_TYPES:
            problems.append(
                PreflightProblem(
                    "loss_output",
                    f"loss output {loss_output!r} is {TensorProto.DataType.Name(elem)}, not a float tensor",
                )
            )
        else:
            loss_ok = True

    # IR version
    if m.ir_version > MAX_IR:
        blockers = _ir_blockers(m)
        if blockers:
            problems.append(
                PreflightProblem(
                    "ir_version",
                    f"IR version {m.ir_version} > {MAX_IR} and the model needs it: {'; '.join(blockers[:_LIST])}",
                )
            )
        else:
            fixes.append(f"IR {m.ir_version} -> {MAX_IR}")
            m.ir_version = MAX_IR

    # opsets and domains
    opsets = _opsets(m)
    default = opsets.get("")
    if default is None:
        problems.append(PreflightProblem("opset", "the model imports no default-domain (ai.onnx) opset"))
    elif default < MIN_OPSET:
        problems.append(
            PreflightProblem("opset", f"opset {default} < {MIN_OPSET}: ONNX Runtime runs opset {MIN_OPSET} and later")
        )
    elif default > onnx.defs.onnx_opset_version():
        problems.append(
            PreflightProblem(
                "opset",
                f"opset {default} > {MAX_OPSET} and newer than this onnx ({onnx.__version__}) knows "
                f"({onnx.defs.onnx_opset_version()}): run the pre-flight where a newer onnx is installed to convert it",
            )
        )
    elif default > MAX_OPSET:
        converted, reason = _convert(m, MAX_OPSET)
        if converted is not None:
            fixes.append(f"opset {default} -> {MAX_OPSET} (onnx version converter)")
            m = converted
            opsets = _opsets(m)
        else:
            inferred, _ = _infer(m)
            blockers = _conversion_blockers(m, MAX_OPSET, _elem_types(m, inferred))
            if not blockers:
                problems.append(
                    PreflightProblem(
                        "opset",
                        f"opset {default} > {MAX_OPSET} and onnx {onnx.__version__}'s version converter fails: "
                        f"{reason}",
                    )
                )
            for op, (why, labels) in blockers.items():
                problems.append(
                    PreflightProblem(
                        "opset",
                        f"opset {default} > {MAX_OPSET} and onnx {onnx.__version__}'s version converter cannot "
                        f"take {op} down to {MAX_OPSET} ({why}) at {len(labels)} node(s): {_names(labels)}",
                        node=labels[0],
                        op=op,
                    )
                )
    functions = {f.domain for f in m.functions}
    by_domain: dict[str, list[str]] = defaultdict(list)
    for i, n in enumerate(_all_nodes(m)):
        d = "" if n.domain == "ai.onnx" else n.domain
        if d not in KNOWN_DOMAINS and d not in functions:
            by_domain[d].append(f"{_label(n, i)} ({n.op_type})")
    for d, labels in by_domain.items():
        problems.append(
            PreflightProblem(
                "domain",
                f"domain {d!r} is not known to ONNX Runtime (no schema, no kernel, no gradient) "
                f"at {len(labels)} node(s): {_names(labels)}",
                node=labels[0].split(" (")[0],
                op=d,
            )
        )
    for d, v in opsets.items():
        top = KNOWN_DOMAINS.get(d)
        if d and top is not None and v > top:
            problems.append(
                PreflightProblem(
                    "opset", f"domain {d!r} opset {v} > {top}, the newest {ORT_TRAINING} takes (no converter for it)"
                )
            )

    # legalization
    try:
        m, legal_fixes = _legalize(m, valid, base_dir)
        fixes.extend(legal_fixes)
    except Exception as exc:  # reported with its cause; the gradient check below still runs on the unlegalized model
        problems.append(
            PreflightProblem(
                "legalize",
                f"the LayerNormalization legalization failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            )
        )

    # gradient path
    inferred, inference_error = _infer(m)
    types = _elem_types(m, inferred)
    if inference_error:
        stats["type_inference_error"] = inference_error
    if loss_ok:
        out_vi = next(o for o in m.graph.output if o.name == loss_output)
        if not out_vi.type.tensor_type.HasField("shape"):
            src = None
            if inferred is not None:
                src = next(
                    (
                        v
                        for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                        if v.name == loss_output and v.type.tensor_type.HasField("shape")
                    ),
                    None,
                )
            if src is not None:
                out_vi.type.tensor_type.shape.CopyFrom(src.type.tensor_type.shape)
                fixes.append(
                    f"loss output {loss_output!r}: shape from shape inference (ORT's loss blocks need its rank)"
                )
            else:
                problems.append(
                    PreflightProblem(
                        "loss_output",
                        f"loss output {loss_output!r} has no shape and shape inference cannot give one "
                        "(ORT's loss blocks need its rank)",
                    )
                )
        elem = types.get(loss_output)
        if elem and elem not in G.GRAD_TYPES:
            problems.append(
                PreflightProblem(
                    "loss_output",
                    f"loss output {loss_output!r} is {TensorProto.DataType.Name(elem)}, not a float tensor",
                )
            )
        elif loss_output not in {x for n in m.graph.node for x in n.output}:
            problems.append(
                PreflightProblem(
                    "loss_output",
                    f"loss output {loss_output!r} is not computed by any node (it is an input or a constant)",
                )
            )
        else:
            path, unreachable = _gradient_path(m, valid, loss_output, types)
            for name, why in unreachable.items():
                problems.append(
                    PreflightProblem(
                        "unreachable", f"trainable {name!r} does not reach the loss output {loss_output!r}: {why}"
                    )
                )
            problems.extend(_gradient_problems(m, path, loss_output, opsets))
            stats["nodes_on_gradient_path"] = len(path)
            stats["ops_on_gradient_path"] = sorted(
                {G.qualified(m.graph.node[i].op_type, m.graph.node[i].domain) for i in path}
            )

    # the result must still be a valid model (onnx 1.17's checker: IR <= 10)
    external = any(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)
    if fixes and not external and not any(p.kind in ("ir_version", "opset") for p in problems):
        try:
            if m.ByteSize() < (1 << 31) - (1 << 20):
                onnx.checker.check_model(m)
        except Exception as exc:  # a fix produced an invalid model: say so instead of handing it on
            problems.append(
                PreflightProblem(
                    "checker", f"the converted model fails onnx's checker: {str(exc).strip().splitlines()[0]}"
                )
            )
    stats["ir_version_out"] = m.ir_version
    stats["opset_out"] = _opsets(m).get("")
    return PreflightReport(model=m, problems=problems, fixes=fixes, stats=stats)
