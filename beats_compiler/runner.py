"""Run a model on ONNX Runtime in bounded memory: the large weights are fed at
run time (memory-mapped from their external data file, never copied), and a
model whose weights exceed a budget runs as a chain of segments, one ORT
session at a time.

Why feeds: an ORT session that owns a weight as an initializer copies it into
its own memory (constant folding and layout transforms read it at session
start; the 2.4 GB MLP peaks at 3.2 GB for one session, its inserted model at
15 GB), while a weight given as an input stays a read-only file mapping that
the kernel can drop.  ORT's optimizations that do not need constant weights
(fusions, layout) still run.  A segment is a run of top-level nodes (in
topological order) whose weights fit the budget; the tensors that cross a
segment boundary are kept as arrays until their last reader has run.

``FeedSession`` answers the part of ``onnxruntime.InferenceSession`` that
verification uses (``get_inputs``, ``get_outputs``, ``run``) and holds no ORT
session between runs, so holding two of them costs no memory: verification
with them runs the original and the compiled model one after the other.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.graph import is_computed_ref
from passes.tensors import tensor_nbytes

# Initializers at least this big are fed at run time; smaller ones stay in the
# segment's model (shape constants must stay constants for some kernels).
FEED_MIN_BYTES = 1 << 20
# Weight bytes per segment unless the caller says otherwise: a segment's peak is
# its weights (file pages) plus float32 temporaries of about the same size (16-bit
# weights cast for CPU kernels, an inserted model's W0 + D * V).
DEFAULT_BUDGET = 512 << 20


class NotRunnable(Exception):
    """The model cannot be run in segments (the caller falls back to a plain session)."""


@dataclass
class NodeArg:
    """What ``InferenceSession.get_inputs()`` gives: name, type string, shape."""

    name: str
    type: str
    shape: list


def _type_string(elem_type: int) -> str:
    names = {
        onnx.TensorProto.FLOAT: "float", onnx.TensorProto.DOUBLE: "double", onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
        onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
        onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.UINT32: "uint32", onnx.TensorProto.UINT64: "uint64",
        onnx.TensorProto.BOOL: "bool", onnx.TensorProto.STRING: "string",
    }
    return f"tensor({names.get(elem_type, str(elem_type))})"


def _node_arg(vi: onnx.ValueInfoProto) -> NodeArg:
    if not vi.type.HasField("tensor_type"):
        return NodeArg(vi.name, "non-tensor", [])
    tt = vi.type.tensor_type
    shape = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return NodeArg(vi.name, _type_string(tt.elem_type), shape)


def _np_dtype(t: onnx.TensorProto) -> np.dtype | None:
    """The numpy dtype ORT takes as a feed for ``t``'s type; None for types it
    does not (bfloat16, float8, 4-bit, strings): those stay initializers."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16) or t.data_type > onnx.TensorProto.BFLOAT16:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        return None


def _nbytes(t: onnx.TensorProto) -> int:
    return tensor_nbytes(t, external_length=True) or 0


def external_range(t: onnx.TensorProto, folder) -> tuple[Path, int, int | None] | None:
    """Where ``t``'s bytes lie when it is stored in an external data file under
    ``folder``: (path, offset, length or None for "to the end"); None for an
    inline tensor, a computed one, or no folder."""
    if t.data_location != onnx.TensorProto.EXTERNAL or folder is None or is_computed_ref(t):
        return None
    info = {e.key: e.value for e in t.external_data}
    if "location" not in info:
        return None
    length = info.get("length")
    return (Path(os.fspath(folder)) / info["location"], int(info.get("offset", 0) or 0),
            int(length) if length is not None else None)


def graph_level(optimize: bool | str):
    """ORT's graph optimization level for ``optimize``: True all, "extended",
    "basic", False none."""
    import onnxruntime as ort

    levels = {True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    return levels[optimize if optimize in ("extended", "basic") else bool(optimize)]


def _subgraph_free_names(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from outer scopes."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer} | {t.name for t in g.sparse_initializer}
    free: set[str] = set()
    for n in g.node:
        for name in _reads(n):
            if name and name not in local:
                free.add(name)
        local.update(o for o in n.output if o)
    return free


def _reads(n: onnx.NodeProto) -> list[str]:
    names = [i for i in n.input if i]
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            names += sorted(_subgraph_free_names(a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sg in a.graphs:
                names += sorted(_subgraph_free_names(sg))
    return names


def _has_stored_subgraph_data(n: onnx.NodeProto) -> bool:
    def graph_has(g: onnx.GraphProto) -> bool:
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
            return True
        return any(_has_stored_subgraph_data(m) for m in g.node)

    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH and graph_has(a.g):
            return True
        if a.type == onnx.AttributeProto.GRAPHS and any(graph_has(g) for g in a.graphs):
            return True
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
            return True
    return False


def _demand_order(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[int]:
    """Indices of the nodes the ``outputs`` need, each placed just before its
    first reader needs it (depth first from the outputs, a node's inputs in
    order): a weight-only computation (W0 + D * V) then sits beside the layer
    that reads it instead of wherever the exporter wrote it, so segments do not
    carry weight-sized tensors across their boundaries."""
    produced_by = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced_by[o] = i
    reads = [_reads(n) for n in nodes]
    order: list[int] = []
    state: dict[int, int] = {}  # 1: on the stack, 2: emitted
    for out in outputs:
        if out not in produced_by or state.get(produced_by[out]) == 2:
            continue
        stack = [(produced_by[out], 0)]
        state[produced_by[out]] = 1
        while stack:
            i, k = stack[-1]
            deps = reads[i]
            while k < len(deps) and (deps[k] not in produced_by or state.get(produced_by[deps[k]]) == 2):
                k += 1
            if k == len(deps):
                stack.pop()
                state[i] = 2
                order.append(i)
                continue
            stack[-1] = (i, k + 1)
            j = produced_by[deps[k]]
            if state.get(j) == 1:
                raise NotRunnable("the graph has a cycle")
            state[j] = 1
            stack.append((j, 0))
    return order


@dataclass
class Segment:
    nodes: list[int]
    weights: list[str]  # fed weights it reads
    weight_bytes: int
    inputs: list[str] = field(default_factory=list)  # non-weight names read from before the segment
    outputs: list[str] = field(default_factory=list)  # names later segments or the caller need


class FeedSession:
    """``model`` (its external data resolved in ``base_dir``; computed tensors
    from ``base_dir.computed`` when it is a ``DataFolder``) run on ORT's CPU
    provider with its large weights as feeds, in segments of at most
    ``budget`` weight bytes."""

    def __init__(self, model: onnx.ModelProto, base_dir=None, *, budget: int = DEFAULT_BUDGET,
                 optimize: bool | str = True, outputs: Sequence[str] | None = None):
        self.model = model
        self.base_dir = base_dir
        self.folder = None if base_dir is None else Path(os.fspath(base_dir))
        self.budget = max(int(budget), 1)
        self.optimize = optimize
        g = model.graph
        if g.sparse_initializer:
            raise NotRunnable("sparse initializers")
        inits = {t.name: t for t in g.initializer}
        self.inits = inits
        input_names = {i.name for i in g.input}
        self._inputs = [_node_arg(vi) for vi in g.input if vi.name not in inits]
        self._overridable = [_node_arg(vi) for vi in g.input if vi.name in inits]
        self._outputs = [_node_arg(vi) for vi in g.output if outputs is None or vi.name in set(outputs)]
        self.weights: dict[str, int] = {}
        for name, t in inits.items():
            size = _nbytes(t)
            external = t.data_location == onnx.TensorProto.EXTERNAL
            if (size >= FEED_MIN_BYTES or external) and _np_dtype(t) is not None and name not in input_names:
                self.weights[name] = size
            elif external and _np_dtype(t) is None and size >= FEED_MIN_BYTES:
                raise NotRunnable(f"external tensor {name!r} of a type ORT cannot take as a feed")
        nodes = list(g.node)
        if any(_has_stored_subgraph_data(n) for n in nodes):
            raise NotRunnable("a subgraph holds external data")
        self.nodes = nodes
        self.order = _demand_order(nodes, [o.name for o in self._outputs])
        self.segments = self._plan()

    # ----------------------------------------------------------- the plan
    def _plan(self) -> list[Segment]:
        # Units: a run of nodes that read only weights and constants (W0 + D * V,
        # a weight's Transpose) goes with the next node, which reads them: a cut
        # never falls inside a unit, so no weight-sized tensor crosses one.
        const_names = set(self.inits)
        units: list[list[int]] = []
        pending: list[int] = []
        for i in self.order:
            node = self.nodes[i]
            pending.append(i)
            if all(x in const_names for x in _reads(node)):
                const_names.update(o for o in node.output if o)
            else:
                units.append(pending)
                pending = []
        if pending:
            units.append(pending)
        segments: list[Segment] = []
        cur: list[int] = []
        cur_w: dict[str, int] = {}
        for unit in units:
            need = {x: self.weights[x] for i in unit for x in _reads(self.nodes[i]) if x in self.weights}
            merged = {**cur_w, **need}
            if cur and sum(merged.values()) > self.budget:
                segments.append(Segment(cur, list(cur_w), sum(cur_w.values())))
                cur, merged = [], dict(need)
            cur.extend(unit)
            cur_w = merged
        if cur or not segments:
            segments.append(Segment(cur, list(cur_w), sum(cur_w.values())))
        graph_outputs = [o.name for o in self._outputs]
        produced_in: dict[str, int] = {}
        for k, s in enumerate(segments):
            for i in s.nodes:
                for o in self.nodes[i].output:
                    if o:
                        produced_in[o] = k
        needed_after: dict[int, set[str]] = {k: set() for k in range(len(segments))}
        for k, s in enumerate(segments):
            reads: dict[str, None] = {}
            for i in s.nodes:
                for x in _reads(self.nodes[i]):
                    reads.setdefault(x, None)
            s.inputs = [x for x in reads if x not in self.weights and produced_in.get(x, -1) != k]
            for x in s.inputs:
                if x in produced_in:
                    needed_after[produced_in[x]].add(x)
        for name in graph_outputs:
            if name in produced_in:
                needed_after[produced_in[name]].add(name)
        for k, s in enumerate(segments):
            s.outputs = sorted(needed_after[k])
        return segments

    @property
    def largest_segment(self) -> int:
        return max((s.weight_bytes for s in self.segments), default=0)

    def ancestor_weights(self) -> dict[str, dict[str, int]]:
        """For each output, the fed weights its computation reads (name -> bytes)."""
        produced_by = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        memo: dict[int, frozenset] = {}
        out = {}
        for o in self._outputs:
            if o.name not in produced_by:
                out[o.name] = {}
                continue
            for i in _demand_order(self.nodes, [o.name]):
                if i in memo:
                    continue
                acc = {x for x in _reads(self.nodes[i]) if x in self.weights}
                for x in _reads(self.nodes[i]):
                    j = produced_by.get(x)
                    if j is not None:
                        acc |= memo[j]
                memo[i] = frozenset(acc)
            out[o.name] = {w: self.weights[w] for w in memo[produced_by[o.name]]}
        return out

    def describe(self) -> str:
        n = len(self.segments)
        return "one session" if n == 1 else f"{n} segments of at most {self.largest_segment / 2**20:.0f} MiB of weights"

    # ------------------------------------------------------- session API
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[NodeArg]:
        return list(self._overridable)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], run_options=None) -> list:
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        known = {vi.name for vi in self.model.graph.input}
        for k in feeds:
            if k not in known:
                raise ValueError(f"invalid input name {k!r}")
        values: dict[str, Any] = dict(feeds)
        last_use: dict[str, int] = {}
        for k, s in enumerate(self.segments):
            for x in s.inputs:
                last_use[x] = k
        keep = set(names)
        for k, s in enumerate(self.segments):
            outs = self._run_segment(s, values)
            values.update(outs)
            for x in s.inputs:
                if last_use.get(x) == k and x not in keep and x not in feeds:
                    values.pop(x, None)
            gc.collect()
        missing = [n for n in names if n not in values]
        if missing:
            raise RuntimeError(f"outputs not computed: {', '.join(missing)}")
        return [values[n] for n in names]

    # ---------------------------------------------------------- internals
    def _weight_array(self, name: str):
        t = self.inits[name]
        dtype = _np_dtype(t)
        shape = tuple(int(d) for d in t.dims)
        if is_computed_ref(t):
            computed = getattr(self.base_dir, "computed", {}) or {}
            src = computed.get(name)
            if src is None:
                raise NotRunnable(f"tensor {name!r} is computed when written, but its source is not given")
            return np.ascontiguousarray(src.load(), dtype)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = external_range(t, self.folder)
            if where is None:
                raise NotRunnable(f"tensor {name!r} is external data but no folder is given")
            path, offset, _ = where
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if count == 0:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape if shape else (1,)).reshape(shape)
        return numpy_helper.to_array(t)

    def _segment_model(self, s: Segment, values: Mapping[str, Any]) -> onnx.ModelProto:
        g = self.model.graph
        gi = {vi.name: vi for vi in g.input}
        inputs = []
        initializers = []
        for x in s.inputs:
            if x in values:
                if x in gi:
                    inputs.append(gi[x])
                else:
                    arr = values[x]
                    if isinstance(arr, np.ndarray):
                        inputs.append(helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(arr.dtype), None))
                    else:
                        raise NotRunnable(f"tensor {x!r} crosses a segment boundary as a non-tensor value")
            elif x in self.inits:
                t = self.inits[x]
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    arr = self._weight_array(x) if _np_dtype(t) is not None else None
                    if arr is None:
                        raise NotRunnable(f"external tensor {x!r} of a type ORT cannot take as a feed")
                    initializers.append(numpy_helper.from_array(np.asarray(arr), x))
                else:
                    initializers.append(t)
                if x in gi:
                    inputs.append(gi[x])
            elif x in gi:
                continue  # an optional graph input not fed: left out, ORT then uses its default
            else:
                raise NotRunnable(f"tensor {x!r} is read but nothing produces it")
        for w in s.weights:
            t = self.inits[w]
            inputs.append(helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
        outputs = [onnx.ValueInfoProto(name=o) for o in s.outputs]
        graph = helper.make_graph([self.nodes[i] for i in s.nodes], f"{g.name or 'graph'}_segment", inputs, outputs,
                                  initializers)
        m = helper.make_model(graph, opset_imports=self.model.opset_import)
        m.ir_version = self.model.ir_version
        m.functions.extend(self.model.functions)
        return m

    def _session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.graph_optimization_level = graph_level(self.optimize)
        return so

    def _run_segment(self, s: Segment, values: Mapping[str, Any]) -> dict[str, Any]:
        import onnxruntime as ort

        if not s.outputs:
            return {}
        proto = self._segment_model(s, values)
        feeds = {x: values[x] for x in s.inputs if x in values}
        for w in s.weights:
            feeds[w] = self._weight_array(w)
        sess = ort.InferenceSession(proto.SerializeToString(), self._session_options(),
                                    providers=["CPUExecutionProvider"])
        del proto
        try:
            got = sess.run(s.outputs, feeds)
        finally:
            del sess
            feeds.clear()
        return dict(zip(s.outputs, got))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the top-level initializers (external data included)."""
    return sum(_nbytes(t) for t in model.graph.initializer)


def largest_tensor(model: onnx.ModelProto) -> int:
    return max((_nbytes(t) for t in model.graph.initializer), default=0)


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
            usage_path = Path(path).with_name("memory.current" if path.endswith("memory.max") else "memory.usage_in_bytes")
            if limit.isdigit() and int(limit) < 1 << 60:
                room = int(limit) - int(usage_path.read_text().strip())
                avail = room if avail is None else min(avail, room)
        except (OSError, ValueError):
            continue
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:
            return None
    return max(avail, 0)


__all__ = ["DEFAULT_BUDGET", "FEED_MIN_BYTES", "FeedSession", "NodeArg", "NotRunnable", "available_memory",
           "external_range", "graph_level", "largest_tensor", "weight_bytes"]
