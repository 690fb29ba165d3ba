"""Initializer pairs B == A^T: every reader of B reads A instead, and B goes.

torch's TorchScript exporter writes a tied embedding twice: ``wte`` [V, E] for
the Gather and its transpose [E, V] for the LM head's MatMul (154 MB twice
for GPT-2).  Gemm reads a weight as stored through ``transA``/``transB``, so
the copy can go without any Transpose at run time:

    MatMul(X, B), X 2-D       -> Gemm(X, A, transB=1)
    MatMul(X, B), X rank r>=3 -> Reshape(Gemm(Flatten(X, r-1), A, transB=1), X's leading dims + [N])
    MatMul(B, X), X 2-D       -> Gemm(A, X, transA=1)
    Gemm(.., B, ..)           -> Gemm(.., A, ..) with that operand's trans flag flipped

B goes only when every reader of it can be rewritten so (else nothing
changes); of a pair, the tensor whose readers cost fewer new nodes goes.
Exact: the pair must be equal bit for bit.  Tensors below ``min_bytes`` are
not looked at; candidates are matched by shape, then by a few sampled
elements, and only then compared in full, tile by tile.  A weight still in its
external data file is never loaded whole: its sampled elements are read at
their offsets, and the full comparison reads one tile of each tensor at a time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from math import isqrt

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .gemm import GEMM_TYPES
from .graph import (
    NameScope,
    const_dtype,
    const_shape,
    const_value,
    external_rows,
    file_bytes,
    index_of,
    io_ids,
    is_const,
    is_standard,
    iter_graphs,
    producer,
    remove_nodes,
    replace_uses,
    walk_nodes,
)
from .gs_adapter import LazyValues, lazy_values
from .shapes import TypeMap, infer_types
from .tensors import const_nbytes

__all__ = ["DedupeTransposedInitializers"]

_SAMPLES = 32
_TILE = 256
_BLOCK_BYTES = 1 << 22  # one tile of each tensor at a time in a full comparison
_KEEP_BYTES = 1 << 30  # in-memory weights kept between their probe and their full comparison


def _bump(stats: dict[str, int], key: str, by: int = 1) -> None:
    stats[key] = stats.get(key, 0) + by


def _positions(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed sample positions for a matrix of this shape: its corners and a few seeded ones."""
    r, c = shape
    rng = np.random.default_rng(r * 1_000_003 + c)
    rows = np.concatenate([[0, 0, r - 1, r - 1], rng.integers(0, r, _SAMPLES)])
    cols = np.concatenate([[0, c - 1, 0, c - 1], rng.integers(0, c, _SAMPLES)])
    return rows, cols


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _equal_transposed(q: np.ndarray, p: np.ndarray) -> bool:
    """q == p^T bit for bit, compared in square tiles (cache-friendly; stops at the first that differs)."""
    qb, pb = _bits(q), _bits(p)
    for r0 in range(0, qb.shape[0], _TILE):
        for c0 in range(0, qb.shape[1], _TILE):
            if not np.array_equal(qb[r0:r0 + _TILE, c0:c0 + _TILE], pb[c0:c0 + _TILE, r0:r0 + _TILE].T):
                return False
    return True


def _matrix(c: gs.Constant) -> np.ndarray:
    """The constant's values; a read-only view of its raw bytes when they are in memory (no copy)."""
    v = lazy_values(c)
    if type(v) is LazyValues and v.tensor.data_location != onnx.TensorProto.EXTERNAL and v.tensor.HasField("raw_data"):
        raw = v.tensor.raw_data
        dt = const_dtype(c).newbyteorder("<")
        shape = const_shape(c)
        if len(raw) == dt.itemsize * shape[0] * shape[1]:
            return np.frombuffer(raw, dt).reshape(shape)
    return const_value(c)


class _Bits:
    """A 2-D constant's elements as unsigned integers of their width: sampled elements and tiles.
    In memory they are views; a weight still in its external data file is read piecewise from
    it (``graph.external_rows``: whole rows, or runs within rows), never whole."""

    def __init__(self, c: gs.Constant):
        self.name = c.name
        self.shape = const_shape(c)
        self.dtype = np.dtype(f"u{const_dtype(c).itemsize}")
        self.rows = external_rows(c)
        self.bits = _bits(_matrix(c)) if self.rows is None else None

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if self.bits is not None:
            return self.bits[rows, cols]
        out = np.empty((len(rows), 1), self.dtype)
        self.rows.read_runs(np.asarray(rows, np.int64) * self.shape[1] + cols, out)
        return out.ravel()

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows r0:r1, columns c0:c1."""
        if self.bits is not None:
            return self.bits[r0:r1, c0:c1]
        if c0 == 0 and c1 == self.shape[1]:  # whole rows: one contiguous read
            return self.rows[r0:r1].view(self.dtype)
        out = np.empty((r1 - r0, c1 - c0), self.dtype)
        self.rows.read_runs(np.arange(r0, r1, dtype=np.int64) * self.shape[1] + c0, out)
        return out

def _whole_tiles(n: int) -> int:
    """n rounded down to a multiple of ``_TILE`` (at least 1), so a tile splits into whole square tiles."""
    return max(1, n - n % _TILE if n >= _TILE else n)


def _file_probes(c: gs.Constant) -> tuple[bytes, bytes] | None:
    """``_probes`` of an in-memory weight sampled from the model file it was read
    from (``graph.file_bytes``: its raw_data there), without copying the weight out
    of its TensorProto; None when its bytes are not known there."""
    shape, size = const_shape(c), const_dtype(c).itemsize
    rows, cols = _positions(shape)
    rows_t, cols_t = _positions(shape[::-1])
    flat = np.concatenate([rows * shape[1] + cols, cols_t * shape[1] + rows_t]).astype(np.int64)
    got = file_bytes(c, flat * size, size)
    if got is None:
        return None
    return got[:len(rows)].tobytes(), got[len(rows):].tobytes()


def _probes(m: _Bits) -> tuple[bytes, bytes]:
    """(m's elements at its shape's positions, m^T's elements at m^T's shape's positions), as bits."""
    rows, cols = _positions(m.shape)
    rows_t, cols_t = _positions(m.shape[::-1])
    return m.at(rows, cols).tobytes(), m.at(cols_t, rows_t).tobytes()


def _equal_transposed_tiled(q: _Bits, p: _Bits) -> bool:
    """q == p^T bit for bit: row blocks of p against column blocks of q, a tile of each held at a
    time (at most ``_BLOCK_BYTES`` each); stops at the first tile that differs.  Tiles span whole
    rows where the budget allows, so an external tensor is then read in one run per tile."""
    if p.bits is not None and q.bits is not None:
        return _equal_transposed(q.bits, p.bits)
    rows, cols = p.shape
    elems = max(1, _BLOCK_BYTES // p.dtype.itemsize)
    side = _whole_tiles(isqrt(elems))
    w = min(cols, side)
    h = min(rows, _whole_tiles(max(side, elems // w)))
    for r0 in range(0, rows, h):
        r1 = min(rows, r0 + h)
        for c0 in range(0, cols, w):
            c1 = min(cols, c0 + w)
            if not _equal_transposed(q.tile(c0, c1, r0, r1), p.tile(r0, r1, c0, c1)):
                return False
    return True


@dataclass
class _Use:
    """One reader of the tensor to drop and how it is rewritten."""

    node: gs.Node
    graph: gs.Graph
    kind: str  # "flip" (Gemm, MatMul 2-D) or "matmul_nd"
    slot: int  # input index of the dropped tensor
    cost: int  # nodes added
    x2d: gs.Tensor | None = None  # matmul_nd: an existing 2-D tensor equal to Flatten(X), if any
    lead: tuple | None = None  # matmul_nd: X's leading dims when all static
    flat_readers: tuple = ()  # matmul_nd: Reshape(Y, [-1, N]) readers that Gemm's output replaces
    rank: int = 2  # matmul_nd: X's rank


class DedupeTransposedInitializers(Pass):
    """Drops B where B == A^T and every reader of B can read A through Gemm's trans flags."""

    name = "dedupe_transposed_initializers"
    idempotent = True

    def __init__(self, min_bytes: int = 1 << 16):
        self.min_bytes = min_bytes
        # Probes of in-memory weights by their (immutable) gs values object: the pass runs once
        # per round, and taking a probe copies the whole weight out of its TensorProto.  Weak
        # keys: a weight the graph drops is not kept alive here.
        self._probes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {}
        if graph.opset < 11:  # Gemm without C: opset 11
            return PassResult(False, {"skipped_opset": 1})
        pairs = self._pairs(graph, stats)
        if not pairs:
            return PassResult(False, stats)
        where: dict[int, gs.Graph] = {id(n): g for g, n in walk_nodes(graph)}
        outputs = set().union(*(io_ids(g)[1] for g in iter_graphs(graph)))
        tm = infer_types(graph)
        names = NameScope(graph)
        for p, q in pairs:
            plan_q = self._plan(q, where, outputs, tm, graph.opset)
            plan_p = self._plan(p, where, outputs, tm, graph.opset)
            if plan_q is None and plan_p is None:
                _bump(stats, "kept_other_readers")
                continue
            if plan_q is None or (plan_p is not None and sum(u.cost for u in plan_p) < sum(u.cost for u in plan_q)):
                keep, drop, plan = q, p, plan_p
            else:
                keep, drop, plan = p, q, plan_q
            for use in plan:
                self._rewrite(use, keep, names, graph.opset)
            _bump(stats, "merged")
            _bump(stats, "bytes_saved", const_nbytes(drop))
            _bump(stats, "readers_rewritten", len(plan))
            nodes_added = sum(u.cost for u in plan)
            if nodes_added:
                _bump(stats, "nodes_added", nodes_added)
        return PassResult(stats.get("merged", 0) > 0, stats)

    # ------------------------------------------------------------- matching

    def _pairs(self, graph: gs.Graph, stats: dict[str, int]) -> list[tuple[gs.Constant, gs.Constant]]:
        """(P, Q) with Q == P^T exactly, each tensor in one pair at most."""
        seen: dict[int, gs.Constant] = {}
        for _, node in walk_nodes(graph):
            for t in node.inputs:
                if is_const(t) and id(t) not in seen:
                    seen[id(t)] = t
        cands = [c for c in seen.values()
                 if len(const_shape(c)) == 2 and const_dtype(c) in GEMM_TYPES and const_nbytes(c) >= self.min_bytes]
        shapes = {(const_dtype(c).str, const_shape(c)) for c in cands}
        cands = [c for c in cands if (const_dtype(c).str, const_shape(c)[::-1]) in shapes]
        if len(cands) < 2:
            return []
        plain: dict[tuple, list[gs.Constant]] = {}
        flipped: dict[int, tuple] = {}
        # In-memory weights copied out of their TensorProto for a probe are kept (up to
        # ``_KEEP_BYTES`` in all) for the full comparison, instead of being copied again.
        kept: dict[int, _Bits] = {}
        budget = _KEEP_BYTES
        for c in cands:  # one tensor loaded at a time
            (straight, transposed), bits = self._probe(c)
            if bits is not None and const_nbytes(c) <= budget:
                kept[id(c)] = bits
                budget -= const_nbytes(c)
            dt, shape = const_dtype(c).str, const_shape(c)
            plain.setdefault((dt, shape, straight), []).append(c)
            flipped[id(c)] = (dt, shape[::-1], transposed)
        pairs, used, tried = [], set(), set()
        for p in cands:
            if id(p) in used:
                continue
            for q in plain.get(flipped[id(p)], ()):
                if q is p or id(q) in used or (id(q), id(p)) in tried:
                    continue
                tried.add((id(p), id(q)))
                _bump(stats, "compared")
                if _equal_transposed_tiled(kept.get(id(q)) or _Bits(q), kept.get(id(p)) or _Bits(p)):
                    pairs.append((p, q))
                    used.update((id(p), id(q)))
                    break
        return pairs

    def _probe(self, c: gs.Constant) -> tuple[tuple[bytes, bytes], _Bits | None]:
        """(the probes of ``c``, the ``_Bits`` read to take them when they were
        read now from memory, else None)."""
        v = lazy_values(c)
        if type(v) is not LazyValues:  # arrays may be edited in place; external ones are read by samples
            return _probes(_Bits(c)), None
        found = self._probes.get(v)
        bits = None
        if found is None:
            found = _file_probes(c)  # a weight read from the model file: sampled there, not copied
            if found is None:
                bits = _Bits(c)
                found = _probes(bits)
                if bits.bits is None:
                    bits = None
            self._probes[v] = found
        return found, bits

    # ------------------------------------------------------------- planning

    def _plan(self, c: gs.Constant, where, outputs: set[int], tm: TypeMap, opset: int) -> list[_Use] | None:
        """How every reader of ``c`` reads its transpose instead; None if one cannot."""
        if id(c) in outputs or not c.outputs:
            return None
        plan = []
        for node in {id(n): n for n in c.outputs}.values():
            g = where.get(id(node))
            slots = [i for i, t in enumerate(node.inputs) if t is c]
            if g is None or len(slots) != 1 or not is_standard(node) or len(node.outputs) != 1:
                return None
            use = self._use(node, g, slots[0], c, outputs, tm, opset)
            if use is None:
                return None
            plan.append(use)
        return plan

    @staticmethod
    def _use(node, g, slot, c, outputs, tm: TypeMap, opset: int) -> _Use | None:
        if node.op == "Gemm" and slot in (0, 1):
            return _Use(node, g, "flip", slot, 0)
        if node.op != "MatMul" or len(node.inputs) != 2:
            return None
        x = node.inputs[1 - slot]
        rank = tm.rank(x)
        if tm.dtype(x) != const_dtype(c) or rank is None or rank < 2:
            return None
        if rank == 2:
            return _Use(node, g, "flip", slot, 0)
        if slot != 1:  # B @ X[..., K, P]: a batch of products, not one Gemm
            return None
        k, n = const_shape(c)
        shape = tm.shape(x)
        if not isinstance(shape[-1], int) or shape[-1] != k:
            return None
        lead = tuple(shape[:-1])
        static = all(isinstance(d, int) for d in lead)
        if opset < 14 and (not static or 0 in lead):  # no allowzero: a 0 in the shape would mean "copy"
            return None
        # Flatten(X) already exists when X is a Reshape of a 2-D [M, K] tensor (same elements, same order).
        x2d, cost = None, 1
        prod = producer(x)
        if prod is not None and prod.op == "Reshape" and is_standard(prod) and prod.inputs:
            src = prod.inputs[0]
            s = tm.shape(src)
            if s is not None and len(s) == 2 and s[1] == k and tm.dtype(src) == tm.dtype(x):
                x2d, cost = src, 0
        y = node.outputs[0]
        readers = list({id(r): r for r in y.outputs}.values())
        flat = bool(readers) and id(y) not in outputs and all(_flattens(r, y, n, outputs) for r in readers)
        if flat:  # every reader flattens Y to [-1, N]: Gemm's output is what they compute
            return _Use(node, g, "matmul_nd", slot, cost - len(readers), x2d=x2d,
                        flat_readers=tuple(readers), rank=rank)
        if static:
            return _Use(node, g, "matmul_nd", slot, cost + 1, x2d=x2d, lead=lead, rank=rank)
        return _Use(node, g, "matmul_nd", slot, cost + (3 if opset >= 15 else 4), x2d=x2d, rank=rank)

    # ------------------------------------------------------------- rewriting

    @staticmethod
    def _rewrite(use: _Use, keep: gs.Constant, names: NameScope, opset: int) -> None:
        node = use.node
        if use.kind == "flip":
            attr = "transA" if use.slot == 0 else "transB"
            if node.op == "MatMul":
                node.op, node.attrs = "Gemm", {}
            node.attrs[attr] = 1 - int(node.attrs.get(attr, 0))
            node.inputs[use.slot] = keep
            return
        g, x, y = use.graph, node.inputs[0], node.outputs[0]
        n = const_shape(keep)[0]
        base = node.name or y.name
        new: list[gs.Node] = []

        def add(op, inputs, out=None, dtype=None, **attrs):
            if out is None:
                out = gs.Variable(names.fresh(f"{base}_{op.lower()}"), dtype=dtype or y.dtype)
            new.append(gs.Node(op, name=names.fresh(f"{base}_{op}"), attrs=attrs, inputs=list(inputs), outputs=[out]))
            return out

        def const(tag, value):
            return gs.Constant(names.fresh(f"{base}_{tag}"), np.asarray(value, np.int64))

        x2d = use.x2d if use.x2d is not None else add("Flatten", [x], axis=use.rank - 1)
        node.outputs.clear()
        dead = [node]
        if use.flat_readers:  # Gemm writes the first reader's output; the others' readers read it
            first, *rest = use.flat_readers
            out = first.outputs[0]
            first.outputs.clear()
            for r in rest:
                replace_uses(r.outputs[0], out)
            add("Gemm", [x2d, keep], out, transB=1)
            dead += use.flat_readers
        else:
            y2d = add("Gemm", [x2d, keep], transB=1)
            if use.lead is not None:
                shape = const("shape", list(use.lead) + [n])
            else:
                if opset >= 15:
                    lead = add("Shape", [x], dtype=np.int64, start=0, end=use.rank - 1)
                else:
                    whole = add("Shape", [x], dtype=np.int64)
                    lead = add("Slice", [whole, const("starts", [0]), const("ends", [use.rank - 1])], dtype=np.int64)
                shape = add("Concat", [lead, const("n", [n])], dtype=np.int64, axis=0)
            if opset >= 14:  # allowzero: an empty leading dim stays empty
                add("Reshape", [y2d, shape], y, allowzero=1)
            else:
                add("Reshape", [y2d, shape], y)
        idx = index_of(g, node)
        g.nodes[idx:idx] = new
        remove_nodes(g, dead)


def _flattens(reader: gs.Node, y: gs.Tensor, n: int, outputs: set[int]) -> bool:
    """reader is Reshape(y, [-1, N]) and its output is no graph output."""
    if reader.op != "Reshape" or not is_standard(reader) or len(reader.inputs) != 2 or reader.inputs[0] is not y:
        return False
    if len(reader.outputs) != 1 or id(reader.outputs[0]) in outputs or not is_const(reader.inputs[1]):
        return False
    return [int(v) for v in const_value(reader.inputs[1]).ravel()] == [-1, n]
