"""Small helpers over onnx-graphsurgeon graphs shared by the passes.

Node identity is by ``id``: gs overrides ``Node.__eq__`` with a field
comparison, so ``node in list`` is both slow and wrong for our purposes.
"""

from __future__ import annotations

import contextvars
import math
import os
import stat
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .convert import ExternalDataError, ExternalValues, open_external, quiet
from .gs_adapter import LazyValues, lazy_values
from .tensors import PACKED_4BIT, tensor_nbytes

__all__ = [
    "CACHE_LIMIT",
    "COMPUTED_LOCATION",
    "ComputedValues",
    "ExternalRows",
    "NONDETERMINISTIC_OPS",
    "NameScope",
    "NodeIndex",
    "STANDARD_DOMAINS",
    "attr_key",
    "bypass",
    "const_dtype",
    "const_ints",
    "const_shape",
    "const_value",
    "count_nodes",
    "external_rows",
    "has_subgraphs",
    "index_of",
    "io_ids",
    "is_computed_ref",
    "is_const",
    "is_sorted",
    "is_standard",
    "iter_graphs",
    "onnx_dtype",
    "producer",
    "remove_nodes",
    "replace_uses",
    "std_producer",
    "walk_nodes",
]

# Ops whose result is not a function of their inputs: never folded or merged.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def is_standard(node: gs.Node) -> bool:
    return (node.domain or "") in STANDARD_DOMAINS


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph itself, then every If/Loop/Scan body inside it, recursively."""
    yield graph
    for node in graph.nodes:
        # what gs's ``node.subgraphs()`` yields, without a generator per node
        # (this runs over every node of the graph many times per compile)
        subs = [v for v in node.attrs.values() if isinstance(v, gs.Graph)] if node.attrs else ()
        for i, sub in enumerate(subs):
            if all(sub is not other for other in subs[:i]):
                yield from iter_graphs(sub)


def walk_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """(g, node) for every node of ``graph`` and of its subgraphs (``iter_graphs``
    order).  Each graph's node list is snapshotted before its first node is
    yielded, so the caller may remove or insert nodes of ``g``; subgraphs are
    found after the caller is done with the graph holding them."""
    for g in iter_graphs(graph):
        for node in list(g.nodes):
            yield g, node


class NodeIndex:
    """The nodes of one graph, for an O(1) ``node in index`` instead of a scan
    of ``graph.nodes`` (``node in list`` would use gs's field-wise ``__eq__``).
    Kept in step with the removals made through ``remove`` and ``bypass``; a
    node the caller adds to the graph is ``add``-ed.  Holds the nodes, so an
    ``id`` is never that of a node since collected."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._nodes = {id(n): n for n in graph.nodes}

    def __contains__(self, node: gs.Node | None) -> bool:
        return node is not None and self._nodes.get(id(node)) is node

    def add(self, node: gs.Node) -> None:
        self._nodes[id(node)] = node

    def remove(self, dead: list[gs.Node]) -> None:
        """``remove_nodes`` on the indexed graph."""
        remove_nodes(self.graph, dead)
        for n in dead:
            self._nodes.pop(id(n), None)

    def bypass(self, node: gs.Node, src: gs.Tensor, dst: gs.Tensor) -> bool:
        """``bypass`` on the indexed graph."""
        if not bypass(self.graph, node, src, dst):
            return False
        self._nodes.pop(id(node), None)
        return True


def index_of(graph: gs.Graph, node: gs.Node) -> int:
    """Position of ``node`` in ``graph.nodes`` (by identity)."""
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in iter_graphs(graph))


def has_subgraphs(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


def is_const(t: gs.Tensor | None) -> bool:
    return isinstance(t, gs.Constant)


# Lazily loaded constants above this size are read on each use and never kept
# in the graph, so a pass touching every weight holds one at a time.
_CACHE_LIMIT = 1 << 20
CACHE_LIMIT = _CACHE_LIMIT  # const_value keeps loaded values of constants up to this size


# onnx < 1.18 maps bfloat16/float8/int4 to structured uint8/uint16 dtypes
# (one field named after the type); ml_dtypes has the real ones.
_ML_DTYPES = {"bfloat16": "bfloat16", "e4m3fn": "float8_e4m3fn", "e4m3fnuz": "float8_e4m3fnuz",
              "e5m2": "float8_e5m2", "e5m2fnuz": "float8_e5m2fnuz"}


_ML_ENUMS = {onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.FLOAT8E4M3FN: "float8_e4m3fn",
             onnx.TensorProto.FLOAT8E4M3FNUZ: "float8_e4m3fnuz", onnx.TensorProto.FLOAT8E5M2: "float8_e5m2",
             onnx.TensorProto.FLOAT8E5M2FNUZ: "float8_e5m2fnuz"}


def _ml_dtype(dt: np.dtype) -> np.dtype:
    if dt.names and len(dt.names) == 1 and dt.names[0] in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[dt.names[0]]))
    return dt


def onnx_dtype(dt: np.dtype) -> int:
    """The TensorProto element type of a numpy (or ml_dtypes) dtype, also on onnx < 1.18."""
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt))
    except (ValueError, KeyError, TypeError):
        names = {v: k for k, v in _ML_DTYPES.items()}
        name = names.get(np.dtype(dt).name)
        if name is None:
            raise
        return {"bfloat16": onnx.TensorProto.BFLOAT16, "e4m3fn": onnx.TensorProto.FLOAT8E4M3FN,
                "e4m3fnuz": onnx.TensorProto.FLOAT8E4M3FNUZ, "e5m2": onnx.TensorProto.FLOAT8E5M2,
                "e5m2fnuz": onnx.TensorProto.FLOAT8E5M2FNUZ}[name]


def _ml_bits(t: gs.Constant) -> np.ndarray | None:
    """bfloat16/float8 values read from the stored bits: gs on onnx < 1.18
    converts them through float32 into a mislabelled array."""
    v = lazy_values(t)
    if not (isinstance(t.dtype, int) and t.dtype in _ML_ENUMS and type(v) is LazyValues):
        return None
    import ml_dtypes

    tensor, dt = v.tensor, np.dtype(getattr(ml_dtypes, _ML_ENUMS[t.dtype]))
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    shape = tuple(int(d) for d in tensor.dims)
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dt).reshape(shape).copy()
    bits = np.asarray(tensor.int32_data, np.uint32)  # one value per int32, in the low bits
    return bits.astype(np.uint16 if dt.itemsize == 2 else np.uint8).view(dt).reshape(shape)


def const_value(t: gs.Constant) -> np.ndarray:
    v = lazy_values(t)
    bits = _ml_bits(t)
    if bits is not None:
        return bits
    with quiet():  # gs warns on stdout when it loads bfloat16 and other non-numpy types
        if isinstance(v, LazyValues) and v.nbytes > _CACHE_LIMIT:
            a = np.asarray(v.load())
        else:
            a = np.asarray(t.values)
            if isinstance(v, LazyValues) and getattr(t, "data_location", None) is not None:
                # gs now holds the values in memory: export them inline, not as an external
                # reference without a location (a small external weight read by a pass)
                t.data_location = None
    ml = _ml_dtype(a.dtype)
    return a.view(ml) if ml is not a.dtype else a


def const_shape(t: gs.Constant) -> tuple[int, ...]:
    """The constant's shape, without loading its values."""
    return tuple(int(d) for d in t.shape)


def const_dtype(t: gs.Constant) -> np.dtype | None:
    """The constant's numpy dtype (None for types numpy lacks), without loading it."""
    dt = t.dtype
    try:
        if isinstance(dt, int):  # gs keeps types numpy lacks (bfloat16, float8) as ONNX enums
            if dt in _ML_ENUMS:  # onnx < 1.18 maps these to float32 or structured dtypes
                import ml_dtypes

                return np.dtype(getattr(ml_dtypes, _ML_ENUMS[dt]))
            return _ml_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt)))
        return _ml_dtype(np.dtype(dt))
    except (TypeError, KeyError, ValueError):
        return None


class ExternalRows:
    """Row slices (along axis 0) of a constant kept in its external data file,
    read from the file on each request: ``rows[r0:r1]``.  A pass that walks a
    large weight block by block holds one block, never the weight."""

    def __init__(self, values: ExternalValues, dtype: np.dtype):
        self.values = values
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in values.tensor.dims)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or not self.shape:
            raise TypeError("ExternalRows takes a slice of rows")
        r0, r1, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError("ExternalRows takes contiguous rows")
        r1 = max(r0, r1)
        out = np.empty((r1 - r0,) + self.shape[1:], self.dtype)
        self.read_runs([r0 * self._row_bytes // self.dtype.itemsize], out.reshape(1, -1))
        return out

    def read_runs(self, starts, out: np.ndarray) -> None:
        """``out[i]`` = the ``len(out[i])`` elements from flat (C-order) element
        index ``starts[i]`` on, read from the file (``out``'s item size must be
        the tensor's)."""
        f, offset, _length = open_external(self.values.tensor, self.values.base_dir)
        size = out.itemsize
        with f:
            for i, k in enumerate(starts):
                f.seek(offset + int(k) * size)
                if f.readinto(out[i]) != out[i].nbytes:
                    raise ExternalDataError(f"external data of {self.values.tensor.name!r} ends early")


def external_rows(t: gs.Constant) -> ExternalRows | None:
    """Row access to ``t`` while its values are still in its external data file
    (None for an in-memory constant, a scalar, or a bit-packed or string type)."""
    v = lazy_values(t)
    dt = const_dtype(t)
    if (not isinstance(v, ExternalValues) or dt is None or not v.tensor.dims
            or v.tensor.data_type in PACKED_4BIT or v.tensor.data_type == onnx.TensorProto.STRING):
        return None
    return ExternalRows(v, dt)


# Where in-memory weights also lie in the model file they were read from: the
# ``raw_data`` of a top-level initializer, as parsed (the driver's ``file_ranges``
# sets it for one transformation).  Reading ``raw_data`` copies the whole weight;
# a pass that only samples a weight (a probe before a full comparison) reads the
# samples there instead.  A hint, never the truth: every full comparison reads
# the weights from memory, so a file changed since it was read can only make a
# probe miss.
_FILE_RANGES: contextvars.ContextVar[dict[int, tuple[onnx.TensorProto, str, int]] | None] = \
    contextvars.ContextVar("beats_file_ranges", default=None)


@contextmanager
def file_ranges(model: onnx.ModelProto, path: str | os.PathLike,
                ranges: list[tuple[int, int] | None] | None) -> Iterator[None]:
    """While inside: ``file_bytes`` finds each top-level initializer of ``model``
    whose ``raw_data`` lies at ``ranges[i]`` (offset, length) of ``path``."""
    table: dict[int, tuple[onnx.TensorProto, str, int]] = {}
    if ranges is not None and len(ranges) == len(model.graph.initializer) and sys.byteorder == "little":
        for t, r in zip(model.graph.initializer, ranges):
            if r is not None and t.HasField("raw_data") and tensor_nbytes(t) == r[1]:
                table[id(t)] = (t, str(path), r[0])  # holds t: its id stays its own
    token = _FILE_RANGES.set(table or None)
    try:
        yield
    finally:
        _FILE_RANGES.reset(token)


def file_bytes(c: gs.Constant, starts: np.ndarray, count: int) -> np.ndarray | None:
    """``count`` bytes from each byte offset in ``starts`` of ``c``'s raw data, read
    from the model file it was loaded from (rows of a uint8 array), or None when
    ``c`` is not an in-memory weight of that file (``file_ranges``) or the read
    falls short.  Little-endian machines only (raw_data is little-endian)."""
    table = _FILE_RANGES.get()
    v = lazy_values(c)
    if table is None or type(v) is not LazyValues:
        return None
    entry = table.get(id(v.tensor))
    if entry is None or entry[0] is not v.tensor:
        return None
    _t, path, offset = entry
    out = np.empty((len(starts), count), np.uint8)
    try:  # O_NONBLOCK: a FIFO put in the file's place must not hang the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        for i, s in enumerate(starts):
            got = os.pread(fd, count, offset + int(s))
            if len(got) != count:
                return None
            out[i] = np.frombuffer(got, np.uint8)
    except OSError:
        return None
    finally:
        os.close(fd)
    return out


# A location no data file can have (``convert.resolve_external`` refuses NULs):
# the mark of a tensor whose bytes exist only when the model is written.
COMPUTED_LOCATION = "\x00beats:computed-when-written"


class ComputedValues(LazyValues):
    """A constant computed block by block only when its bytes are needed.  It
    exports as an external data reference to ``COMPUTED_LOCATION``, which the
    model writer (``beats_compiler.io.save_model`` with a ``DataFolder``
    holding this object) fills from ``blocks()``; ``load()`` computes the whole
    array.  Subclasses define ``blocks``: C-order slices along axis 0, in order
    (``dims``: the shape as a tuple of ints).  A subclass whose every element
    is +0 sets ``zeros``: the writer may then leave a hole in the data file
    (it reads back as zero bytes) instead of writing them."""

    zeros = False

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        tensor = onnx.TensorProto(name=name, data_type=onnx_dtype(dtype), dims=[int(d) for d in shape])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.np_dtype = np.dtype(dtype)
        self.dims = tuple(int(d) for d in shape)
        self.nbytes_total = int(np.prod(self.dims, dtype=np.int64)) * self.np_dtype.itemsize
        for k, v in (("location", COMPUTED_LOCATION), ("offset", "0"), ("length", str(self.nbytes_total))):
            e = tensor.external_data.add()
            e.key, e.value = k, v
        super().__init__(tensor)

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def load(self) -> np.ndarray:
        shape = self.dims
        rows, per_row = (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if shape else (1, 1)
        out = np.empty(shape, self.np_dtype)
        flat = out.reshape(rows, per_row)
        at = 0
        for blk in self.blocks():
            n = blk.shape[0] if shape else 1
            flat[at:at + n] = np.asarray(blk, self.np_dtype).reshape(n, per_row)
            at += n
        if at != rows:
            raise ValueError(f"{self.tensor.name!r}: computed {at} rows, expected {rows}")
        return out


def is_computed_ref(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a ``ComputedValues`` placeholder (bytes not on disk yet)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == COMPUTED_LOCATION for e in tensor.external_data)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) else None


def std_producer(t: gs.Tensor, *ops: str) -> gs.Node | None:
    """The node writing ``t`` when it is a standard-domain ``ops`` node with one output."""
    node = producer(t)
    if node is None or not is_standard(node) or node.op not in ops or len(node.outputs) != 1:
        return None
    return node


def const_ints(t: gs.Tensor, ndim: int, limit: int = 64) -> list[int] | None:
    """The values of a constant int tensor (initializer or Constant node) of
    rank ``ndim`` with at most ``limit`` elements (counted before they are read)."""
    node = None
    if not is_const(t):
        node = std_producer(t, "Constant")
        if node is None:
            return None
        t = node.attrs.get("value")
    if is_const(t):
        if math.prod(const_shape(t)) > limit:
            return None
        v = const_value(t)
    elif "value_ints" in node.attrs:
        v = np.asarray(node.attrs["value_ints"], np.int64).reshape(-1)
    elif "value_int" in node.attrs:
        v = np.asarray(node.attrs["value_int"], np.int64)
    else:
        return None
    if v.ndim != ndim or v.dtype.kind not in "iu" or v.size > limit:
        return None
    return [int(x) for x in v.ravel()]


def io_ids(graph: gs.Graph) -> tuple[set[int], set[int]]:
    return {id(t) for t in graph.inputs}, {id(t) for t in graph.outputs}


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Point every consumer of ``old`` at ``new``; returns the number of edges moved."""
    moved = 0
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
                moved += 1
    return moved


def remove_nodes(graph: gs.Graph, dead: list[gs.Node]) -> None:
    dead_ids = {id(n) for n in dead}
    for n in dead:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in dead_ids]


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor, dst: gs.Tensor) -> bool:
    """Remove ``node``, whose output ``dst`` always equals its input ``src``.

    When ``dst`` is an output of the graph its name must survive, so the
    producer of ``src`` is made to write ``dst`` directly; that is only legal
    when ``src`` is a plain local intermediate.  Returns False (and changes
    nothing) when the bypass is not legal.
    """
    in_ids, out_ids = io_ids(graph)
    if id(dst) in out_ids:
        prod = producer(src)
        if (
            prod is None
            or id(prod) not in {id(n) for n in graph.nodes}  # built only here: bypass runs per removed node
            or id(src) in in_ids
            or id(src) in out_ids
            or is_const(src)
        ):
            return False
        if src.dtype is not None and dst.dtype is not None and src.dtype != dst.dtype:
            return False
        # Rename: the producer now writes dst; src's other readers read dst.
        replace_uses(src, dst)
        node.outputs.clear()
        idx = [i for i, t in enumerate(prod.outputs) if t is src][0]
        prod.outputs[idx] = dst
        remove_nodes(graph, [node])
        return True
    replace_uses(dst, src)
    remove_nodes(graph, [node])
    return True


def is_sorted(graph: gs.Graph, outer: frozenset[str] | set[str] = frozenset()) -> bool:
    """Every node reads only graph inputs, constants, outer-scope names and
    outputs of nodes before it (subgraphs included)."""
    known = set(outer)
    known.update(t.name for t in graph.inputs)
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and t.name not in known:
                return False
        for sub in node.subgraphs():
            if not is_sorted(sub, known):
                return False
        known.update(t.name for t in node.outputs if t.name)
    return True


def attr_key(value) -> object:
    """A hashable, deterministic key for a node attribute value."""
    if isinstance(value, gs.Graph):
        return ("graph", id(value))
    if isinstance(value, gs.Tensor):
        if isinstance(value, gs.Constant):
            a = const_value(value)
            return ("tensor", a.dtype.str, a.shape, a.tobytes())
        return ("tensor", value.name)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(attr_key(v) for v in value)
    if isinstance(value, float):
        return ("float", np.float32(value).tobytes())
    if isinstance(value, onnx.TensorProto):
        return ("proto", value.SerializeToString(deterministic=True))
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


class NameScope:
    """Deterministic fresh names that do not collide with anything in the model."""

    def __init__(self, graph: gs.Graph):
        self.used: set[str] = set()
        for g in iter_graphs(graph):
            self.used.update(g.tensors().keys())
            self.used.update(n.name for n in g.nodes if n.name)

    def fresh(self, base: str) -> str:
        base = base or "beats"
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name
