"""Untrusted models: reading the file, structural validation, resource limits.

Every model is treated as hostile input.  ``read_model_file`` parses the
bytes itself (never following a FIFO or device, never reading a file over
protobuf's 2 GB limit) and tells an empty, truncated, too deeply nested or
foreign file apart.  ``validate_model`` then checks what the ONNX checker
either misses or reports in words a user cannot act on: versions, names
(undefined, defined twice, cycles), tensors whose data disagrees with their
dims, negative or overflowing dims, unknown standard ops, and the limits on
node count and subgraph nesting.  Every failure is an ``InputError`` with a
one-line message; the CLI turns that into exit code 2.

Unknown ops in a custom domain are kept and passed through: passes only
rewrite standard ops (``passes.graph.is_standard``), so none needs their
semantics.  An op in a standard domain that the standard does not define at
the model's opset is refused (no runtime could run it).
"""

from __future__ import annotations

import functools
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, defs, helper

from passes.convert import file_kind
from passes.tensors import ELEMENT_BYTES, PACKED_2BIT, PACKED_4BIT, tensor_nbytes

from .errors import InputError
from .proto import PROTOBUF_LIMIT, is_repeated, model_shell

PROTOBUF_MAX_DEPTH = 100  # upb's recursion limit: about 31 levels of nested subgraphs

DEFAULT_MAX_NODES = 1_000_000
DEFAULT_MAX_DEPTH = 16
# Verification generates random inputs from the model's static input shapes.
VERIFY_INPUT_LIMIT = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Resource bounds checked before any pass runs (flags in brackets)."""

    max_nodes: int = DEFAULT_MAX_NODES  # nodes in all graphs together (--max-nodes)
    max_depth: int = DEFAULT_MAX_DEPTH  # subgraph nesting depth (--max-depth)


def _max_opsets() -> dict[str, int]:
    best: dict[str, int] = {}
    for (domain, version) in helper.OP_SET_ID_VERSION_MAP:
        best[domain] = max(best.get(domain, 0), version)
    best[""] = max(best.get("ai.onnx", 0), defs.onnx_opset_version())
    return best


MAX_OPSET = _max_opsets()
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
MIN_IR_VERSION = 3  # IR 1 and 2 predate opset imports
MAX_IR_VERSION = onnx.IR_VERSION


# --- reading the file ---------------------------------------------------------

def read_model_file(path: Path) -> tuple[onnx.ModelProto, int]:
    """Parse ``path`` as an ONNX model; returns the model and the file size."""
    model, size, _ = read_model_file_ranges(path)
    return model, size


def read_model_file_ranges(path: Path) -> tuple[onnx.ModelProto, int, list[tuple[int, int] | None] | None]:
    """``read_model_file`` plus ``raw_data_ranges`` of the file's bytes: where
    each main-graph initializer's ``raw_data`` lies in the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    if st.st_size > PROTOBUF_LIMIT:
        raise InputError(f"{path}: {st.st_size} bytes, over protobuf's 2 GB limit for one message; "
                         "a model this large must keep its weights as external data")
    try:  # O_NONBLOCK: a FIFO swapped in after the stat must not hang the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(PROTOBUF_LIMIT + 1)
    finally:
        os.close(fd)
    model = parse_model_bytes(data, str(path))
    ranges = raw_data_ranges(data)
    if ranges is not None and len(ranges) != len(model.graph.initializer):
        ranges = None
    return model, len(data), ranges


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value start, value end) of each field in data[start:end]
    (for wire type 2 the value is the payload); stops at the first malformed field."""
    pos = start
    while pos < end:
        tag, pos = _varint(data, pos)
        if tag is None or pos > end:
            return
        wt = tag & 7
        if wt == 0:
            v0 = pos
            value, pos = _varint(data, pos)
            if value is None or pos > end:
                return
            yield tag >> 3, wt, v0, pos
        elif wt in (1, 5):
            v0, pos = pos, pos + (8 if wt == 1 else 4)
            if pos > end:
                return
            yield tag >> 3, wt, v0, pos
        elif wt == 2:
            length, pos = _varint(data, pos)
            if length is None or pos + length > end:
                return
            yield tag >> 3, wt, pos, pos + length
            pos += length
        else:  # groups: not in onnx.proto
            return


def raw_data_sizes(data: bytes) -> list[int | None] | None:
    """The ``raw_data`` length of each initializer of the main graph, in order
    (None: no raw_data), read from a ModelProto's wire bytes without copying a
    weight; None when the bytes hold anything this reader does not follow."""
    return range_lengths(raw_data_ranges(data))


def range_lengths(ranges: list[tuple[int, int] | None] | None) -> list[int | None] | None:
    """The lengths of ``raw_data_ranges``' ranges (None where it has None)."""
    return None if ranges is None else [None if r is None else r[1] for r in ranges]


def raw_data_ranges(data: bytes) -> list[tuple[int, int] | None] | None:
    """``(offset, length)`` in ``data`` of each main-graph initializer's
    ``raw_data``, in order (None: no raw_data); None when the bytes hold
    anything this reader does not follow.  As protobuf parses: every ``graph``
    field (7) of the model is merged into one, so their initializers (field 5)
    concatenate; of several ``raw_data`` fields (9) in one tensor the last wins."""
    sizes: list[tuple[int, int] | None] = []
    end = len(data)
    seen = 0
    for num, wt, g0, g1 in _fields(data, 0, end):
        seen = g1
        if num != 7 or wt != 2:
            continue
        inner = 0
        for fnum, fwt, t0, t1 in _fields(data, g0, g1):
            inner = t1
            if fnum != 5 or fwt != 2:
                continue
            raw, last = None, t0
            for tnum, twt, r0, r1 in _fields(data, t0, t1):
                last = r1
                if tnum == 9 and twt == 2:
                    raw = (r0, r1 - r0)
            if last != t1:
                return None
            sizes.append(raw)
        if inner != g1:
            return None
    return sizes if seen == end else None


def parse_model_bytes(data: bytes, where: str = "model") -> onnx.ModelProto:
    if not data:
        raise InputError(f"{where}: empty file, not an ONNX model")
    if len(data) > PROTOBUF_LIMIT:
        raise InputError(f"{where}: over protobuf's 2 GB limit for one message")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or a RecursionError in other backends
        text = str(exc)
        if "MaxDepth" in text or "recursion" in text.lower() or isinstance(exc, RecursionError):
            raise InputError(f"{where}: messages nested deeper than protobuf's recursion limit "
                             f"({PROTOBUF_MAX_DEPTH} levels; deeply nested subgraphs or types)") from None
        problem = _wire_problem(data)
        if problem == "truncated":
            raise InputError(f"{where}: truncated ONNX model (the file ends inside a field)") from None
        raise InputError(f"{where}: not an ONNX model (not a valid ModelProto protobuf)") from None
    missing = [f for f, ok in (("graph", model.HasField("graph")), ("IR version", model.ir_version > 0),
                               ("opset import", bool(model.opset_import))) if not ok]
    if missing:
        raise InputError(f"{where}: not an ONNX model (no {', no '.join(missing)}; truncated or another format?)")
    return model


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    result = shift = 0
    while pos < len(data) and shift < 70:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    return None, pos


def _wire_problem(data: bytes) -> str:
    """Why the top level of ``data`` is not a ModelProto: 'truncated' when a
    field runs past the end of the file, else 'garbage'."""
    pos, n = 0, len(data)
    while pos < n:
        tag, pos = _varint(data, pos)
        if tag is None:
            return "truncated" if pos >= n else "garbage"
        wt = tag & 7
        if tag >> 3 == 0 or wt in (3, 4, 6, 7):
            return "garbage"
        if wt == 0:
            v, pos = _varint(data, pos)
            if v is None:
                return "truncated" if pos >= n else "garbage"
        elif wt in (1, 5):
            pos += 8 if wt == 1 else 4
            if pos > n:
                return "truncated"
        else:
            length, pos = _varint(data, pos)
            if length is None:
                return "truncated" if pos >= n else "garbage"
            pos += length
            if pos > n:
                return "truncated"
    return "garbage"


# --- structure ------------------------------------------------------------------

_KNOWN_TYPES = set(TensorProto.DataType.values())

# Typed repeated fields: which data types may use them, and values per element.
_FIELDS = {
    "float_data": {TensorProto.FLOAT: 1, TensorProto.COMPLEX64: 2},
    "double_data": {TensorProto.DOUBLE: 1, TensorProto.COMPLEX128: 2},
    "int64_data": {TensorProto.INT64: 1},
    "uint64_data": {TensorProto.UINT32: 1, TensorProto.UINT64: 1},
    "string_data": {TensorProto.STRING: 1},
}
_INT32_TYPES = {TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16, TensorProto.UINT8,
                TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16} | {
    t for t, s in ELEMENT_BYTES.items() if s == 1} | PACKED_4BIT | PACKED_2BIT

MAX_ELEMENTS = 1 << 62


def _tensor_problem(t: TensorProto, raw_size: int | None = None) -> str | None:
    """What is wrong with the tensor's header and inline data, if anything.
    ``raw_size``: ``len(t.raw_data)`` when already known (measuring copies it)."""
    if t.data_type not in _KNOWN_TYPES or t.data_type == TensorProto.UNDEFINED:
        return f"unknown data type {t.data_type}"
    n = 1
    for d in t.dims:
        if d < 0:
            return f"negative dimension {d} in dims {list(t.dims)}"
        n *= d
        if n > MAX_ELEMENTS:
            return f"dims {list(t.dims)} overflow (more than 2^62 elements)"
    if t.data_location == TensorProto.EXTERNAL:
        if t.data_type == TensorProto.STRING:
            return "string data cannot be stored externally"
        return None  # checked against its file by io
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            return "string tensor with raw_data"
        want = tensor_nbytes(t)
        have = len(t.raw_data) if raw_size is None else raw_size
        if have != want:
            return f"raw data has {have} bytes, dims {list(t.dims)} of this type need {want}"
        return None
    found = [(f, len(getattr(t, f))) for f in (*_FIELDS, "int32_data") if len(getattr(t, f))]
    if len(found) > 1:
        return f"data in several fields ({', '.join(f for f, _ in found)})"
    if not found:
        return f"no data, dims {list(t.dims)} need {n} values" if n else None
    field, count = found[0]
    if field == "int32_data":
        if t.data_type not in _INT32_TYPES:
            return f"int32_data cannot hold type {TensorProto.DataType.Name(t.data_type)}"
        # sub-byte types: their packed bytes, one to an int32
        want = tensor_nbytes(t) if t.data_type in PACKED_4BIT | PACKED_2BIT else n
    else:
        per = _FIELDS[field].get(t.data_type)
        if per is None:
            return f"{field} cannot hold type {TensorProto.DataType.Name(t.data_type)}"
        want = n * per
    if count != want:
        return f"{field} has {count} values, dims {list(t.dims)} need {want}"
    return None


def _node_label(node: onnx.NodeProto, k: int) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"node #{k} ({node.op_type})"


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH or a.HasField("g"):
            yield a.g
        yield from a.graphs


def _check_shape(vi: onnx.ValueInfoProto, where: str) -> None:
    stack, depth = [vi.type], 0
    while stack:
        tp = stack.pop()
        depth += 1
        if depth > 10_000:
            return
        kind = tp.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            tt = getattr(tp, kind)
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    raise InputError(f"{where}: value {vi.name!r} has a negative dimension ({d.dim_value})")
        elif kind == "sequence_type":
            stack.append(tp.sequence_type.elem_type)
        elif kind == "optional_type":
            stack.append(tp.optional_type.elem_type)
        elif kind == "map_type":
            stack.append(tp.map_type.value_type)


def validate_model(model: onnx.ModelProto, limits: Limits = Limits(), where: str = "model", *,
                   raw_sizes: list[int | None] | None = None) -> None:
    """Refuse a model that is structurally invalid or over the limits, with a
    one-line ``InputError`` naming the problem (``where`` prefixes it).
    ``raw_sizes``: ``raw_data_sizes`` of the bytes ``model`` was parsed from."""
    _check_strings(model, where)
    _check_versions(model, where)
    functions = {(f.domain, f.name) for f in model.functions}
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import
              if o.domain != "ai.onnx"}
    for o in model.opset_import:  # "" wins over "ai.onnx" when both are given
        if o.domain == "ai.onnx":
            opsets.setdefault("", o.version)
    # Count nodes and measure nesting first: both bound the work below.
    nodes, depth = 0, 0
    stack = [(model.graph, 0)]  # the main graph is level 0
    while stack:
        g, d = stack.pop()
        depth = max(depth, d)
        if depth > limits.max_depth:
            raise InputError(f"{where}: subgraphs nested more than {limits.max_depth} deep, over the limit "
                             f"(raise it with --max-depth)")
        nodes += len(g.node)
        if nodes > limits.max_nodes:
            raise InputError(f"{where}: more than {limits.max_nodes} nodes, over the limit (raise it with --max-nodes)")
        for node in g.node:
            stack.extend((s, d + 1) for s in _subgraphs(node))
    if raw_sizes is not None and len(raw_sizes) != len(model.graph.initializer):
        raw_sizes = None
    _check_graph(model.graph, set(), where, opsets, functions, top=True, raw_sizes=raw_sizes)
    check_declared_types(model, where)


_STRING = 9  # FieldDescriptor.TYPE_STRING


def _check_strings(model: onnx.ModelProto, where: str) -> None:
    """onnx.proto is proto2: a string field holding invalid UTF-8 comes back
    as ``bytes``, which every consumer (onnx's C++ bindings included) chokes on."""
    stack = [model]
    while stack:
        msg = stack.pop()
        for name, is_string, repeated in _string_and_message_fields(msg.DESCRIPTOR):
            if is_string:  # an unset string reads as "": fine
                value = getattr(msg, name)
                bad = [v for v in value if not isinstance(v, str)] if repeated else (
                    [] if isinstance(value, str) else [value])
                if bad:
                    raise InputError(f"{where}: field {msg.DESCRIPTOR.name}.{name} holds invalid UTF-8 "
                                     f"({bytes(bad[0])[:40]!r})")
            elif repeated:
                stack.extend(getattr(msg, name))
            elif msg.HasField(name):
                stack.append(getattr(msg, name))


@functools.cache
def _string_and_message_fields(desc) -> tuple[tuple[str, bool, bool], ...]:
    """(name, is a string, repeated) of the message type's string and message
    fields, in field-number order (ListFields' order).  Reading only these
    never copies a tensor's raw_data, as ListFields does."""
    fields = sorted(desc.fields, key=lambda fd: fd.number)
    return tuple((fd.name, fd.type == _STRING, is_repeated(fd)) for fd in fields
                 if fd.type == _STRING or fd.message_type is not None)


def _check_versions(model: onnx.ModelProto, where: str) -> None:
    if not MIN_IR_VERSION <= model.ir_version <= MAX_IR_VERSION:
        raise InputError(f"{where}: IR version {model.ir_version} is not supported "
                         f"(this tool reads IR versions {MIN_IR_VERSION} to {MAX_IR_VERSION})")
    seen: dict[str, int] = {}
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        # The same import twice (skl2onnx writes that) is harmless; two versions are not.
        if domain in seen and seen[domain] != o.version:
            raise InputError(f"{where}: opset of domain {o.domain or 'ai.onnx'!r} imported twice, "
                             f"as versions {seen[domain]} and {o.version}")
        seen[domain] = o.version
        if o.version < 1:
            raise InputError(f"{where}: opset version {o.version} of domain {o.domain or 'ai.onnx'!r} is not valid")
        if domain in MAX_OPSET and domain in STANDARD_DOMAINS and o.version > MAX_OPSET[domain]:
            raise InputError(f"{where}: opset {o.version} of domain {o.domain or 'ai.onnx'!r} is newer than this "
                             f"tool supports (up to {MAX_OPSET[domain]})")


def _check_graph(g: onnx.GraphProto, outer: set[str], where: str, opsets, functions, top: bool = False,
                 raw_sizes: list[int | None] | None = None) -> None:
    """Names, order and tensors of ``g`` (outer scope ``outer``); then its subgraphs."""
    scope_name = "graph" if top else f"subgraph {g.name!r}"
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if not name:
            return
        if name in defined:
            raise InputError(f"{where}: name {name!r} is defined twice in the {scope_name} "
                             f"({defined[name]} and {what})")
        defined[name] = what

    for vi in g.input:
        if not vi.name:
            raise InputError(f"{where}: {scope_name} has an input without a name")
        if vi.name in defined:
            raise InputError(f"{where}: duplicate input name {vi.name!r} in the {scope_name}")
        defined[vi.name] = "an input"
        _check_shape(vi, where)
    inputs = set(defined)
    for k, t in enumerate(g.initializer):
        if not t.name:
            raise InputError(f"{where}: {scope_name} has an initializer without a name")
        if t.name in defined and (t.name not in inputs or defined[t.name] == "an initializer"):
            raise InputError(f"{where}: duplicate initializer name {t.name!r} in the {scope_name}")
        defined[t.name] = "an initializer"
        problem = _tensor_problem(t, None if raw_sizes is None else raw_sizes[k])
        if problem:
            raise InputError(f"{where}: initializer {t.name!r}: {problem}")
    for sp in g.sparse_initializer:
        for part in (sp.values, sp.indices):
            problem = _tensor_problem(part)
            if problem:
                raise InputError(f"{where}: sparse initializer {sp.values.name!r}: {problem}")
        define(sp.values.name, "a sparse initializer")
    for vi in [*g.output, *g.value_info]:
        _check_shape(vi, where)
    producers: dict[str, int] = {}
    checked_ops: set[tuple[str, str]] = set()
    for k, node in enumerate(g.node):
        if not node.op_type:
            raise InputError(f"{where}: {_node_label(node, k)} has no op_type")
        for out in node.output:
            if out:
                if out in defined or out in producers:
                    first = defined.get(out) or _node_label(g.node[producers[out]], producers[out])
                    raise InputError(f"{where}: name {out!r} is defined twice in the {scope_name} "
                                     f"({first} and {_node_label(node, k)})")
                producers[out] = k
        key = (node.domain, node.op_type)
        if key not in checked_ops:
            _check_op(node, _node_label(node, k), where, opsets, functions)
            checked_ops.add(key)
        for a in node.attribute:
            tensors = ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for t in tensors:
                problem = _tensor_problem(t)
                if problem:
                    raise InputError(f"{where}: {_node_label(node, k)}, attribute {a.name!r}: {problem}")
    known = set(outer) | set(defined)
    # Each node reads names defined before it (here or outside); a name
    # produced later in this graph means a cycle or an unsorted graph.
    for k, node in enumerate(g.node):
        for name in _reads(node):
            if not name or name in known:
                continue
            if name in producers:
                cycle = _find_cycle(g, producers)
                if cycle:
                    raise InputError(f"{where}: cycle in the {scope_name}: " + " -> ".join(cycle))
                raise UnsortedGraph(f"{where}: {_node_label(node, k)} reads {name!r} before "
                                 f"{_node_label(g.node[producers[name]], producers[name])} produces it "
                                 "(nodes must be in topological order)")
            raise InputError(f"{where}: {_node_label(node, k)} reads {name!r}, which is not defined")
        known.update(o for o in node.output if o)
    for vi in g.output:
        if vi.name not in known:
            raise InputError(f"{where}: {scope_name} output {vi.name!r} is not produced by any node")
    for node in g.node:
        for sub in _subgraphs(node):
            _check_graph(sub, known, where, opsets, functions)


class UnsortedGraph(InputError):
    """Nodes out of topological order in an acyclic graph (``sort_nodes`` mends it)."""


def sort_nodes(model: onnx.ModelProto) -> int:
    """Put the nodes of every graph of ``model`` in topological order (stable: a
    node moves only after what it reads); returns how many graphs changed.
    onnxruntime's own fp16 converter writes unsorted graphs, and ONNX Runtime
    sorts on load.  Graphs with a cycle or an undefined name are left as they are."""

    def sort(g: onnx.GraphProto, outer: set[str]) -> int:
        known = set(outer) | {i.name for i in g.input} | {t.name for t in g.initializer}
        known |= {s.values.name for s in g.sparse_initializer}
        inner = set(known)
        for n in g.node:
            inner.update(o for o in n.output if o)
        changed = sum(sort(sub, inner) for n in g.node for sub in _subgraphs(n))
        pending = list(g.node)
        order: list[onnx.NodeProto] = []
        while pending:
            rest = []
            for n in pending:
                if all(not r or r in known for r in _reads(n)):
                    order.append(n)
                    known.update(o for o in n.output if o)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                return changed  # a cycle or an undefined name: the validator says which
            pending = rest
        if [id(n) for n in order] == [id(n) for n in g.node]:
            return changed
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
        return changed + 1

    return sort(model.graph, set())


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads: its inputs and its subgraphs' outer-scope names."""
    names = list(node.input)
    for sub in _subgraphs(node):
        names.extend(_free_names(sub))
    return names


def _free_names(g: onnx.GraphProto) -> set[str]:
    """Names ``g`` (and its subgraphs) read from enclosing scopes.  Nesting is
    bounded by ``Limits.max_depth`` before this runs."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    for n in g.node:
        local.update(n.output)
    free: set[str] = set()
    for n in g.node:
        for name in _reads(n):
            if name and name not in local:
                free.add(name)
    free.update(o.name for o in g.output if o.name not in local)
    return free


def _find_cycle(g: onnx.GraphProto, producers: dict[str, int]) -> list[str] | None:
    deps = [sorted({producers[n] for n in _reads(node) if n in producers}) for node in g.node]
    color = [0] * len(g.node)  # 0 new, 1 on the stack, 2 done
    for start in range(len(g.node)):
        if color[start]:
            continue
        path, iters = [start], [iter(deps[start])]
        color[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                color[path.pop()] = 2
                iters.pop()
            elif color[nxt] == 1:
                loop = path[path.index(nxt):] + [nxt]
                return [_node_label(g.node[i], i) for i in reversed(loop)]
            elif color[nxt] == 0:
                color[nxt] = 1
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def _check_op(node: onnx.NodeProto, label: str, where: str, opsets, functions) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (node.domain, node.op_type) in functions:
        return
    if domain not in opsets:
        raise InputError(f"{where}: {label} uses domain {node.domain or 'ai.onnx'!r}, which the model does not import")
    if domain not in STANDARD_DOMAINS:
        return  # custom op: kept as is, no pass needs its semantics
    version = opsets[domain]
    try:
        defs.get_schema(node.op_type, version, domain)
    except Exception:
        if defs.has(node.op_type, domain):
            since = defs.get_schema(node.op_type, MAX_OPSET.get(domain, version), domain).since_version
            raise InputError(f"{where}: {label}: op {node.op_type!r} does not exist at opset {version} of "
                             f"{node.domain or 'ai.onnx'!r} (it does from opset {since})") from None
        raise InputError(f"{where}: {label}: unknown op {node.op_type!r} in the standard domain "
                         f"{node.domain or 'ai.onnx'!r} (custom ops need a custom domain)") from None


_SHELL_CONST_LIMIT = 1024
_CONFLICT = ("Inferred shape and existing shape differ", "Inferred elem type differs")


def check_declared_types(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse a model whose declared shapes or element types (graph outputs,
    value_info) contradict what its own nodes compute: passes trust declared
    shapes, so such a model could be rewritten wrongly.  ONNX shape inference
    runs in strict mode on a shell of the model (initializers over 1024
    elements, and external ones, become typed graph inputs: no weight is
    copied); only a contradiction is reported, other inference failures are
    left to the passes, which record them."""
    from onnx.external_data_helper import uses_external_data

    shell = model_shell(model)
    g = shell.graph
    listed = {i.name for i in g.input}
    for t in model.graph.initializer:
        n = math.prod(t.dims) if t.dims else 1
        if uses_external_data(t) or n > _SHELL_CONST_LIMIT:
            if t.name not in listed:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    try:
        onnx.shape_inference.infer_shapes(shell, check_type=False, strict_mode=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        for marker in _CONFLICT:
            k = text.find(marker)
            if k >= 0:
                op = text[:k].rsplit("(op_type:", 1)[-1].split(")")[0] if "(op_type:" in text[:k] else "a node"
                raise InputError(f"{where}: a declared type or shape contradicts what {op} computes "
                                 f"({text[k:k + 120].rstrip('. ')})") from None


def check_verify_inputs(model: onnx.ModelProto, where: str = "model", limit: int = VERIFY_INPUT_LIMIT) -> None:
    """Verification feeds generated inputs sized by the inputs' static dims
    (symbolic dims get small sizes); refuse a model that would need more
    than ``limit`` bytes of them."""
    inits = {t.name for t in model.graph.initializer}
    total = 0
    for vi in model.graph.input:
        if vi.name in inits or vi.type.WhichOneof("value") != "tensor_type":
            continue
        tt = vi.type.tensor_type
        n = 1
        for d in tt.shape.dim:
            n *= d.dim_value if d.HasField("dim_value") else 8
        size = ELEMENT_BYTES.get(tt.elem_type, 8)
        total += n * size
        if total > limit:
            raise InputError(f"{where}: verifying needs more than {limit} bytes of generated inputs "
                             f"(input {vi.name!r} has static dims); pass --inputs or --no-verify")

