"""The one boundary between ONNX protobuf and the in-memory graph.

``to_graph`` imports a ``ModelProto`` into an onnx-graphsurgeon ``Graph`` plus
an ``Envelope`` holding everything gs does not model (metadata, functions,
overridable initializers, IR < 4 input lists); ``to_model`` exports it back.
No other module edits protobuf fields of a model by hand.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.logger import G_LOGGER

from .gs_adapter import LazyValues, SparseValues, export_node, lazy_values, set_lazy_values
from .tensors import PACKED_4BIT, const_nbytes, tensor_nbytes

__all__ = [
    "Envelope",
    "ExternalDataError",
    "ExternalRef",
    "ExternalValues",
    "check_external",
    "export",
    "export_skeleton",
    "external_nbytes",
    "external_ref",
    "file_kind",
    "open_external",
    "proto_subgraphs",
    "quiet",
    "read_external",
    "resolve_external",
    "to_graph",
    "to_model",
    "uses_external_refs",
]


@contextlib.contextmanager
def quiet():
    """Silence onnx-graphsurgeon's logger (it prints to stdout) for a block."""
    with G_LOGGER.suppress(G_LOGGER.CRITICAL + 10):
        yield


@dataclass
class Envelope:
    """Model-level data that the graph object does not carry."""

    ir_version: int
    opset_import: list[onnx.OperatorSetIdProto]
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[onnx.StringStringEntryProto] = field(default_factory=list)
    graph_metadata_props: list[onnx.StringStringEntryProto] = field(default_factory=list)
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    training_info: list = field(default_factory=list)
    # IR >= 4: initializers that are also graph inputs are defaults the caller
    # may override, so the graph sees them as inputs; their values live here.
    overridable: dict[str, onnx.TensorProto] = field(default_factory=dict)
    # IR < 4: every initializer must be listed as a graph input.
    input_order: list[str] = field(default_factory=list)
    # Where the model's external data references resolve (None: in memory).
    base_dir: str | None = None
    # The input's initializer order, kept on export (new ones go last).
    initializer_order: list[str] = field(default_factory=list)


def _copy_list(repeated) -> list:
    out = []
    for m in repeated:
        c = type(m)()
        c.CopyFrom(m)
        out.append(c)
    return out


class ExternalDataError(ValueError):
    """An external data reference that is unsafe or does not fit its file."""


@dataclass(frozen=True)
class ExternalRef:
    location: str
    offset: int
    length: int | None


def external_ref(tensor: onnx.TensorProto) -> ExternalRef:
    """The tensor's external data entries, parsed strictly (onnx's
    ``ExternalDataInfo`` calls ``setattr`` with whatever keys the file holds)."""
    entries: dict[str, str] = {}
    for e in tensor.external_data:
        if e.key in entries:
            raise ExternalDataError(f"external data key {e.key!r} given twice")
        entries[e.key] = e.value
    loc = entries.get("location", "")
    if not loc:
        raise ExternalDataError("external data has no location")
    nums = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None or text == "":
            nums[key] = None
        elif not (text.isascii() and text.isdigit()) or len(text) > 19:
            raise ExternalDataError(f"external data {key} {text[:40]!r} is not a non-negative integer")
        else:
            nums[key] = int(text)
    return ExternalRef(loc, nums["offset"] or 0, nums["length"])


def resolve_external(base_dir: str | os.PathLike, location: str) -> str:
    """The real path of ``location`` under ``base_dir``, or ``ExternalDataError``:
    no absolute paths, no ``..``, no backslashes or NULs, nothing that resolves
    (through symlinks) outside ``base_dir``, only regular files with one link
    (a hard-linked file may have another name outside the folder)."""
    if "\x00" in location or "\\" in location or (len(location) > 1 and location[1] == ":"):
        raise ExternalDataError(f"external data location {location[:200]!r} is not a plain relative path")
    if os.path.isabs(location):
        raise ExternalDataError(f"external data location {location[:200]!r} is an absolute path")
    parts = location.replace(os.sep, "/").split("/")
    if ".." in parts:
        raise ExternalDataError(f"external data location {location[:200]!r} leads outside the model's folder (..)")
    base = os.path.realpath(base_dir)
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        raise ExternalDataError(f"external data location {location[:200]!r} leads outside the model's folder (symlink)")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise ExternalDataError(f"external data file {location[:200]!r} is missing") from None
    except OSError as exc:
        raise ExternalDataError(f"external data file {location[:200]!r} cannot be read ({exc.strerror})") from None
    _check_regular(st, location)
    return target


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message ("a folder", ...)."""
    import stat as _stat

    if _stat.S_ISDIR(mode):
        return "a folder"
    if _stat.S_ISFIFO(mode):
        return "a FIFO"
    if _stat.S_ISCHR(mode) or _stat.S_ISBLK(mode):
        return "a device file"
    if _stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_regular(st: os.stat_result, location: str) -> None:
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode):
        raise ExternalDataError(f"external data file {location[:200]!r} is {file_kind(st.st_mode)}")
    if st.st_nlink > 1:
        raise ExternalDataError(f"external data file {location[:200]!r} has {st.st_nlink} hard links "
                                "(it may also live outside the model's folder; copy it to use it)")


def external_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's dims and data type call for in an external data file."""
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ExternalDataError("string data cannot be stored externally")
    n = tensor_nbytes(tensor)
    if n is None:
        raise ExternalDataError(f"data type {tensor.data_type} cannot be stored externally")
    return n


def check_external(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> tuple[str, int, int]:
    """Validate the tensor's reference; returns (real path, offset, length)."""
    ref = external_ref(tensor)
    path = resolve_external(base_dir, ref.location)
    size = os.stat(path).st_size
    want = external_nbytes(tensor)
    length = ref.length if ref.length is not None else size - ref.offset
    if ref.offset > size or ref.offset + length > size:
        raise ExternalDataError(f"external data range (offset {ref.offset}, length {length}) lies beyond the end "
                                f"of {ref.location[:200]!r} ({size} bytes)")
    if length != want:
        raise ExternalDataError(f"external data length {length} disagrees with dims {list(tensor.dims)} "
                                f"({want} bytes)")
    return path, ref.offset, length


def open_external(tensor: onnx.TensorProto, base_dir: str | os.PathLike):
    """Open the tensor's data file safely (checked again after opening: a
    file swapped since validation is refused); returns (file, offset, length)."""
    path, offset, length = check_external(tensor, base_dir)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        _check_regular(os.fstat(fd), external_ref(tensor).location)
        real = f"/proc/self/fd/{fd}"
        if os.path.exists(real):
            base = os.path.realpath(base_dir)
            if os.path.commonpath([base, os.path.realpath(real)]) != base:
                raise ExternalDataError("external data file moved outside the model's folder")
        return os.fdopen(fd, "rb"), offset, length
    except BaseException:
        os.close(fd)
        raise


def read_external(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> bytes:
    """The tensor's bytes from its file, exactly ``length`` of them."""
    f, offset, length = open_external(tensor, base_dir)
    with f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ExternalDataError(f"external data file {external_ref(tensor).location[:200]!r} ends early")
    return data


class ExternalValues(LazyValues):
    """A constant whose bytes stay in its external data file (under
    ``base_dir``) until a pass reads them; export keeps the reference."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        dims = [int(d) for d in self.tensor.dims]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        f, offset, length = open_external(self.tensor, self.base_dir)
        with f:
            f.seek(offset)
            data = np.fromfile(f, dtype=np.uint8, count=length)
        if data.size != length:
            raise ExternalDataError(f"external data of {self.tensor.name!r} ends early")
        if self.tensor.data_type in PACKED_4BIT:  # stored two to a byte, as onnx's loader reads them
            t = onnx.TensorProto()
            t.CopyFrom(self.tensor)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data.tobytes()
            return onnx.numpy_helper.to_array(t)
        return data.view(dtype).reshape(dims)


def _attach_external(graph: gs.Graph, base_dir: str | None) -> None:
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for t in g.tensors().values():
            v = lazy_values(t)
            if isinstance(v, LazyValues) and external_data_helper.uses_external_data(v.tensor):
                if base_dir is None:
                    raise ValueError(f"tensor {t.name!r} uses external data, but no folder to read it from was given")
                set_lazy_values(t, ExternalValues(v.tensor, base_dir))


def uses_external_refs(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))


def to_graph(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> tuple[gs.Graph, Envelope]:
    """Import ``model``.  The model's tensors are shared, not copied; tensors
    stored as external data stay there (read from ``base_dir`` on use)."""
    env = Envelope(
        ir_version=model.ir_version,
        opset_import=_copy_list(model.opset_import),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        metadata_props=_copy_list(model.metadata_props),
        graph_metadata_props=_copy_list(getattr(model.graph, "metadata_props", [])),
        functions=_copy_list(model.functions),
        training_info=_copy_list(model.training_info),
        input_order=[i.name for i in model.graph.input],
        initializer_order=[t.name for t in model.graph.initializer],
    )
    with quiet():
        graph = gs.import_onnx(model)
    env.base_dir = None if base_dir is None else str(base_dir)
    _attach_external(graph, env.base_dir)
    _import_fixups(graph, model.graph)
    init_names = {t.name for t in model.graph.initializer}
    if model.ir_version >= 4:
        by_name = {t.name: t for t in model.graph.initializer}
        tensors = graph.tensors()
        for pos, vi in enumerate(model.graph.input):
            if vi.name not in init_names:
                continue
            env.overridable[vi.name] = by_name[vi.name]
            const = tensors.get(vi.name)
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim]
            var = gs.Variable(vi.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(by_name[vi.name].data_type)
                              if by_name[vi.name].data_type not in (0, onnx.TensorProto.STRING) else None,
                              shape=shape)
            if isinstance(const, gs.Constant):
                for node in list(const.outputs):
                    for i, t in enumerate(node.inputs):
                        if t is const:
                            node.inputs[i] = var
            graph.inputs.insert(min(pos, len(graph.inputs)), var)
    return graph, env


# gs models a value's type only as a tensor or a sequence of tensors without
# element shape; it crashes exporting optional, map or opaque types and writes
# nested sequences wrongly.  Such values keep their declared TypeProto on the
# Variable, are exported untyped by gs, and get it back in ``export``.
_TYPE_ATTR = "_beats_type"
# Attribute kinds gs's importer drops (with a warning we silence), e.g.
# Optional's ``type``, Constant's ``sparse_value``; gs's exporter writes them
# back when they are kept as their protobuf values.
_DROPPED_ATTRS = (
    onnx.AttributeProto.TYPE_PROTO,
    onnx.AttributeProto.TYPE_PROTOS,
    onnx.AttributeProto.SPARSE_TENSOR,
    onnx.AttributeProto.SPARSE_TENSORS,
    onnx.AttributeProto.TENSORS,
)


def _import_fixups(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Put back what ``gs.import_onnx`` lost from ``proto`` into ``graph``."""
    declared = {vi.name: vi.type for vi in [*proto.input, *proto.output, *proto.value_info]
                if vi.type.WhichOneof("value") not in (None, "tensor_type")}
    local = [*graph.inputs, *graph.outputs, *(t for n in graph.nodes for t in n.outputs)]
    for t in local:
        if isinstance(t, gs.Variable) and t.name in declared:
            setattr(t, _TYPE_ATTR, declared[t.name])
            t.dtype, t.shape, t.type = None, None, "tensor_type"
    for node, pnode in zip(graph.nodes, proto.node):
        for attr in pnode.attribute:
            if attr.type in _DROPPED_ATTRS and not attr.ref_attr_name and attr.name not in node.attrs:
                node.attrs[attr.name] = onnx.helper.get_attribute_value(attr)
        _pair_subgraphs(node, pnode, _import_fixups)


def _restore_types(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    for t, vi in [*zip(graph.inputs, proto.input), *zip(graph.outputs, proto.output)]:
        if getattr(t, _TYPE_ATTR, None) is not None:
            vi.type.CopyFrom(getattr(t, _TYPE_ATTR))
    io = {id(t) for t in [*graph.inputs, *graph.outputs]}
    for node in graph.nodes:
        for t in node.outputs:
            if id(t) not in io and getattr(t, _TYPE_ATTR, None) is not None:
                vi = proto.value_info.add()
                vi.name = t.name
                vi.type.CopyFrom(getattr(t, _TYPE_ATTR))
    for node, pnode in zip(graph.nodes, proto.node):
        _pair_subgraphs(node, pnode, _restore_types)


def _pair_subgraphs(node: gs.Node, pnode: onnx.NodeProto, fn) -> None:
    """Call ``fn(gs_subgraph, proto_subgraph)`` for each body of ``node``."""
    for attr in pnode.attribute:
        value = node.attrs.get(attr.name)
        if attr.type == onnx.AttributeProto.GRAPH and isinstance(value, gs.Graph):
            fn(value, attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(value, (list, tuple)):
            for sub, g in zip(value, attr.graphs):
                if isinstance(sub, gs.Graph):
                    fn(sub, g)


def export(graph: gs.Graph, **make_model_kwargs) -> onnx.ModelProto:
    """gs's export, plus the value types gs cannot represent (see ``_import_fixups``)."""
    # gs exports an imported tensor by writing the Constant's name into the
    # *source* TensorProto; an attribute's unnamed tensor would get `name: ""`
    # in the caller's model.  Those protos get their missing name back after.
    unnamed = [lazy_values(a).tensor for g in [graph, *graph.subgraphs(recursive=True)] for n in g.nodes
               for a in n.attrs.values() if isinstance(a, gs.Constant) and isinstance(lazy_values(a), LazyValues)
               and not lazy_values(a).tensor.HasField("name")]
    try:
        with quiet():
            model = gs.export_onnx(graph, do_type_check=False, **make_model_kwargs)
    finally:
        for t in unnamed:
            t.ClearField("name")
    _restore_types(graph, model.graph)
    _clear_empty_tensor_names(model.graph)
    return model


def _clear_empty_tensor_names(graph: onnx.GraphProto) -> None:
    """gs writes ``name: ""`` into the unnamed tensors of attributes (a
    Constant's ``value``); absent and empty mean the same, so drop the field:
    a model that passes through unchanged keeps its bytes."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                if attr.t.HasField("name") and not attr.t.name:
                    attr.t.ClearField("name")
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    if t.HasField("name") and not t.name:
                        t.ClearField("name")
    for sub in proto_subgraphs(graph):
        _clear_empty_tensor_names(sub)


# The NodeProto ``export_skeleton`` last made of a node, with the key it was made
# from (``_node_key``): shape inference runs after every modifying pass, and most
# nodes are the same as at the last run.
_SKELETON_ATTR = "_beats_skeleton_node"


def _attr_key(v):
    """A value equal exactly when gs would export the attribute value the same
    way; None when the value is not cached (tensors, graphs, arrays, ...)."""
    tv = type(v)
    if tv is int or tv is str or tv is bytes or tv is bool:
        return tv, v
    if tv is float:
        return tv, v.hex()  # -0.0 == 0.0 and nan != nan: compare the bits
    if tv is list or tv is tuple:
        keys = tuple(_attr_key(x) for x in v)
        return None if None in keys else (tv, keys)
    return None


def _node_key(node: gs.Node) -> tuple | None:
    attrs = []
    for k, v in node.attrs.items():
        a = _attr_key(v)
        if a is None:
            return None
        attrs.append((k, a))
    return (node.op, node.domain, node.name, tuple(t.name for t in node.inputs),
            tuple(t.name for t in node.outputs), tuple(attrs))


def _skeleton_node(node: gs.Node) -> onnx.NodeProto:
    """``export_node(node)``, reused from the last skeleton while the node's op,
    names, tensors' names and plain attribute values are the same (the caller
    copies it into its graph, never edits it)."""
    key = _node_key(node)
    if key is not None:
        hit = node.__dict__.get(_SKELETON_ATTR)
        if hit is not None and hit[0] == key:
            return hit[1]
    proto = export_node(node)
    if key is not None:
        setattr(node, _SKELETON_ATTR, (key, proto))
    return proto


def export_skeleton(graph: gs.Graph, const_limit: int) -> onnx.ModelProto:
    """The graph for analysis (shape inference): nodes, declared types and the
    constants of at most ``const_limit`` elements; larger top-level constants
    become typed graph inputs, so no weight is copied."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

    with quiet():
        nodes = [_skeleton_node(n) for n in graph.nodes]
        inputs = [OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs]
        outputs = [OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs]
        io_names = {t.name for t in [*graph.inputs, *graph.outputs]}
        inits, value_info = [], []
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant):
                if math.prod(t.shape) <= const_limit:
                    inits.append(OnnxExporter.export_tensor_proto(t))
                else:
                    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)) if isinstance(t.dtype, (type, np.dtype)) else t.dtype
                    inputs.append(onnx.helper.make_tensor_value_info(t.name, elem, list(t.shape)))
            elif t.name not in io_names and (t.dtype is not None or t.shape is not None):
                value_info.append(OnnxExporter.export_value_info_proto(t, False))
        g = onnx.helper.make_graph(nodes, graph.name or "graph", inputs, outputs, inits, value_info=value_info)
        model = onnx.helper.make_model(g, opset_imports=update_import_domains(graph))
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    _restore_types(graph, model.graph)
    return model


def _dedupe_outer_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    """gs exports an outer-scope constant used in a subgraph into the subgraph
    too; a subgraph may not redefine an outer name, so drop those copies."""
    if outer:
        keep = [t for t in graph.initializer if t.name not in outer]
        if len(keep) != len(graph.initializer):
            kept = _copy_list(keep)
            del graph.initializer[:]
            graph.initializer.extend(kept)
    scope = set(outer)
    scope.update(t.name for t in graph.initializer)
    scope.update(i.name for i in graph.input)
    for node in graph.node:
        scope.update(node.output)
    _hoist_shared_initializers(graph, scope)
    for sub in proto_subgraphs(graph):
        _dedupe_outer_initializers(sub, scope)


def proto_subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The If/Loop/Scan bodies held directly by ``graph``'s nodes."""
    subs = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                subs.append(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                subs.extend(attr.graphs)
    return subs


def _hoist_shared_initializers(graph: onnx.GraphProto, scope: set[str]) -> None:
    """gs also writes a constant read only inside bodies into *every* body
    that reads it (one copy per If branch).  An identical initializer found
    in several nested bodies, and defined nowhere else there, is stored once
    here instead; the copies are then dropped as outer-scope names."""
    found: dict[str, list[onnx.TensorProto]] = {}
    defined: set[str] = set()
    stack = proto_subgraphs(graph)
    while stack:
        g = stack.pop()
        for t in g.initializer:
            found.setdefault(t.name, []).append(t)
        defined.update(i.name for i in g.input)
        for node in g.node:
            defined.update(node.output)
        stack.extend(proto_subgraphs(g))
    for name, copies in found.items():
        if len(copies) < 2 or name in scope or name in defined:
            continue
        first = copies[0].SerializeToString(deterministic=True)
        if all(c.SerializeToString(deterministic=True) == first for c in copies[1:]):
            graph.initializer.add().CopyFrom(copies[0])
            scope.add(name)


_BIG = 1 << 20


def _export_light(graph: gs.Graph, consume: bool = False, **kw) -> onnx.ModelProto:
    """gs's export copies every weight twice (make_graph, then make_model);
    large top-level constants are exported as empty stand-ins and copied in
    once afterwards.  With ``consume`` the graph gives each weight up as it
    is copied (the graph is not used again), so only one copy exists."""
    big = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and not isinstance(lazy_values(t), SparseValues) and const_nbytes(t) > _BIG:
            big[t.name] = t
    saved = {name: lazy_values(t) for name, t in big.items()}
    try:
        for name, t in big.items():
            stand_in = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT)
            stand_in.dims.append(0)
            set_lazy_values(t, LazyValues(stand_in))
        model = export(graph, **kw)
    finally:
        if not consume:
            for name, t in big.items():
                set_lazy_values(t, saved[name])
    for init in model.graph.initializer:
        v = saved.pop(init.name, None) if consume else saved.get(init.name)
        if v is None:
            continue
        if isinstance(v, LazyValues):
            name = init.name
            init.CopyFrom(v.tensor)
            init.name = name
        else:
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(v), init.name))
    return model


def to_model(graph: gs.Graph, env: Envelope, *, consume: bool = False) -> onnx.ModelProto:
    """Export ``graph`` with the model-level data in ``env``.  ``consume``:
    the graph is discarded afterwards, so its large weights move into the
    model instead of being copied."""
    model = _export_light(graph, consume=consume, opset_imports=list(env.opset_import))
    model.ir_version = env.ir_version
    model.producer_name = env.producer_name
    model.producer_version = env.producer_version
    model.domain = env.domain
    model.model_version = env.model_version
    model.doc_string = env.doc_string
    model.metadata_props.extend(env.metadata_props)
    if env.graph_metadata_props and hasattr(model.graph, "metadata_props"):
        model.graph.metadata_props.extend(env.graph_metadata_props)
    del model.functions[:]
    model.functions.extend(env.functions)
    model.training_info.extend(env.training_info)
    g = model.graph
    rank = {name: k for k, name in enumerate(env.initializer_order)}
    g.initializer.sort(key=lambda t: rank.get(t.name, len(rank)))
    input_names = {i.name for i in g.input}
    for name, tensor in env.overridable.items():
        if name in input_names:
            g.initializer.append(tensor)
    _dedupe_outer_initializers(g, set())
    if env.ir_version < 4:
        _list_initializers_as_inputs(g, env.input_order)
    return model


def _list_initializers_as_inputs(g: onnx.GraphProto, order: list[str]) -> None:
    present = {i.name: i for i in g.input}
    for t in g.initializer:
        if t.name not in present:
            present[t.name] = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    rank = {name: k for k, name in enumerate(order)}
    ordered = sorted(present.values(), key=lambda vi: rank.get(vi.name, len(rank)))
    ordered = _copy_list(ordered)
    del g.input[:]
    g.input.extend(ordered)
