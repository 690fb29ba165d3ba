"""Generated inputs for verification (and ``--calib random``) when the user gives none.

Values and shapes are derived from how the graph uses each input, never from
its name:

- an integer input that indexes a table (Gather/GatherElements, also through
  casts, reshapes and an Add of a constant) stays below the table's axis size;
  OneHot indices below a constant depth; Range and Slice operands stay small and
  non-negative (a Range delta or Slice step at least 1);
- a *mask* (an input whose values reach a Cast to bool, Not/And/Or/Xor, a Where
  condition, an integer comparison, or BERT's ``(1 - mask) * -10000``) gets 0/1,
  mostly 1: the first position of every row is 1 and every second row ends in
  padding (trailing zeros), so no attention row is all masked;
- other floats are N(0, 1), other integers 0..3;
- symbolic dims get their own small sizes (2, 3, 4, ...), except those a
  Concat relates: when a graph input (a KV cache ``past [B, H, P, D]``) is
  concatenated along an axis with another tensor (``new [B, H, S, D]``) and the
  result's dim is another input's dim (the attention mask's ``T``), then
  ``T = P + S``.  Candidate bindings are tried on the original model (ONNX
  Runtime) in order; the first that runs with finite outputs is used.  Where
  the past is only ever a Concat operand, a second run with ``P = 0`` checks
  the empty cache too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError, short_message

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}

# Sizes of free symbolic dims, in order of first appearance (the last repeats).
DIM_SIZES = (2, 3, 4, 5, 6)
DEFAULT_INT_HIGH = 4  # integers with no known use: 0..3
SMALL_HIGH = 4  # Range/Slice operands: 0..3
BIG_NEGATIVE = 1e3  # |c| of the Mul in (1 - mask) * c
_CONST_LIMIT = 1024  # constants read for analysis (and kept in the shape-inference shell)
_MAX_RELATION_SETS = 6


# --------------------------------------------------------------------------- values


@dataclass
class ValuePlan:
    """How the values of one input are made."""

    kind: str = "default"  # "normal", "ints", "mask", "bits", "text"
    low: int = 0
    high: int = DEFAULT_INT_HIGH  # exclusive
    why: str = ""

    def values(self, dtype, shape, rng: np.random.Generator) -> np.ndarray:
        dt = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if dt.kind in "US":
            return np.full(shape, "a", dtype=object)
        if self.kind == "mask":
            return mask_values(shape, dt)
        if dt.kind == "f":
            return rng.standard_normal(shape).astype(dt)
        if dt.kind in "iu":
            low = max(self.low, 0) if dt.kind == "u" else self.low
            high = min(max(low + 1, self.high), int(np.iinfo(dt).max) + 1)
            return rng.integers(low, high, size=shape).astype(dt)
        if dt.kind == "b":
            return rng.integers(0, 2, size=shape).astype(bool)
        raise InputError(f"cannot generate inputs of type {dt}")

    def describe(self, dtype) -> str:
        dt = np.dtype(dtype)
        why = f" ({self.why})" if self.why else ""
        if dt.kind in "US":
            return "strings 'a'"
        if self.kind == "mask":
            return ("mask 0.0/1.0" if dt.kind == "f" else "mask 0/1") + ", mostly 1" + why
        if dt.kind == "f":
            return "normal(0,1)"
        if dt.kind == "b":
            return "random bits"
        return f"in {self.low}..{max(self.low, self.high - 1)}{why}"


def mask_values(shape: Sequence[int], dtype) -> np.ndarray:
    """0/1, mostly 1: the first position of every row (last axis) is 1; every
    second row ends in about a third of zeros (padding)."""
    m = np.ones(tuple(shape), dtype=np.dtype(dtype))
    if m.ndim >= 1 and m.shape[-1] >= 2 and m.size:
        length = m.shape[-1]
        rows = m.reshape(-1, length)
        rows[1::2, length - max(1, length // 3):] = 0
    return m


# --------------------------------------------------------------------------- dims


@dataclass(frozen=True)
class Relation:
    """``target = sum(terms) + const``, found at a Concat."""

    target: str
    terms: tuple[str, ...]
    const: int = 0

    def text(self) -> str:
        rhs = " + ".join(self.terms + ((str(self.const),) if self.const else ()))
        return f"{self.target} = {rhs} (Concat)"


# --------------------------------------------------------------------------- analysis

# Ops whose data input reaches their output element for element (values stay values).
_VALUE_PASS = frozenset("Cast Unsqueeze Squeeze Reshape Flatten Identity Expand Slice Transpose Gather "
                        "GatherElements GatherND Tile Split Pad".split())
_COMPARE = frozenset("Equal Greater Less GreaterOrEqual LessOrEqual".split())
_LOGIC = frozenset("Not And Or Xor".split())
# Ops between a graph input and a Concat that keep its shape.
_SHAPE_KEEP = frozenset("Identity Cast".split())


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _kind(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).kind
    except Exception:
        return "?"


class Analysis:
    """What the graph does with each input: value plans, symbolic dims, Concat relations."""

    def __init__(self, model: onnx.ModelProto | None):
        self.model = model
        self.plans: dict[str, ValuePlan] = {}
        self.relation_sets: list[tuple[Relation, ...]] = []
        self.kv_symbols: set[str] = set()
        self._inferred: dict[str, list] | None = None
        if model is None:
            return
        g = model.graph
        self.readers: dict[str, list] = {}
        for node in g.node:
            for slot, name in enumerate(node.input):
                if name:
                    self.readers.setdefault(name, []).append((node, slot))
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.dims: dict[str, list] = {t.name: list(t.dims) for t in g.initializer}
        for name, n in self.const_nodes.items():
            v = _attr(n, "value")
            if isinstance(v, onnx.TensorProto):
                self.dims[name] = list(v.dims)
        for vi in list(g.value_info) + list(g.input):
            tt = vi.type.tensor_type
            if vi.name not in self.dims and vi.type.HasField("tensor_type") and tt.HasField("shape"):
                self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        self.inputs = [vi for vi in g.input if vi.name not in self.inits and vi.type.HasField("tensor_type")]
        for vi in self.inputs:
            self.plans[vi.name] = self._plan(vi.name, _kind(vi.type.tensor_type.elem_type))
        self._relations()

    # ----------------------------------------------------------------- constants

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None and name in self.const_nodes:
            node = self.const_nodes[name]
            for a in node.attribute:
                if a.name == "value":
                    t = a.t
                elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    return np.asarray(onnx.helper.get_attribute_value(a))
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) > _CONST_LIMIT:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:
            return None

    def _scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None or v.size == 0 or v.dtype.kind not in "iuf" or not np.all(v == v.flat[0]):
            return None
        x = float(v.flat[0])
        return x if np.isfinite(x) and abs(x) < 2 ** 62 else None

    # ----------------------------------------------------------------- values

    def _plan(self, name: str, kind: str) -> ValuePlan:
        bounds: list[tuple[int, str]] = []
        small: list[tuple[int, str]] = []  # (low, op)
        mask: list[str] = []
        todo, seen = [(name, 0)], set()
        while todo:
            t, off = todo.pop()
            if (t, off) in seen or len(seen) > 10000:
                continue
            seen.add((t, off))
            for node, slot in self.readers.get(t, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                op = node.op_type
                nxt = None
                if op in ("Gather", "GatherElements") and slot == 1:
                    table = self.dims.get(node.input[0])
                    axis = _attr(node, "axis", 0)
                    if table and -len(table) <= axis < len(table) and isinstance(table[axis], int) and table[axis] > 0:
                        n = table[axis]
                        what = "Gather table" if op == "Gather" else "GatherElements axis"
                        if n - off > 0:
                            bounds.append((n - off, f"{what} of {n} rows" + (f", offset {off}" if off else "")))
                elif op == "OneHot" and slot == 0:
                    depth = self._scalar(node.input[1]) if len(node.input) > 1 else None
                    if depth is not None and depth - off >= 1:
                        bounds.append((int(depth) - off, f"OneHot depth {int(depth)}"))
                elif op == "Range":
                    small.append((1 if slot == 2 else 0, "Range operand"))
                elif op == "Slice" and slot >= 1:
                    small.append((1 if slot == 4 else 0, "Slice operand"))
                    if slot == 3:
                        bounds.append((1, "Slice axes"))
                elif op == "Cast" and _attr(node, "to") == onnx.TensorProto.BOOL:
                    mask.append("Cast to bool")
                elif op in _LOGIC or (op == "Where" and slot == 0):
                    mask.append(f"{op} condition" if op == "Where" else op)
                elif op in _COMPARE and kind in "iub":
                    mask.append(f"compared ({op})")
                elif op == "Sub" and slot == 1 and self._scalar(node.input[0]) == 1.0 and self._big_mul(node.output[0]):
                    mask.append("(1 - mask) * large")
                elif op == "Add" and kind in "iu" and len(node.input) == 2:
                    c = self._scalar(node.input[1 - slot])
                    if c is not None and c >= 0 and c == int(c):
                        nxt = off + int(c)
                elif op in _VALUE_PASS and slot == 0 or op == "Concat" or (op == "Where" and slot > 0):
                    nxt = off
                if nxt is not None:
                    todo.extend((o, nxt) for o in node.output if o)
        if mask and (kind in "bf" or not bounds):  # an index into a table is an index, even if compared
            return ValuePlan("mask", 0, 2, mask[0])
        if kind not in "iu":
            return ValuePlan("normal" if kind == "f" else "bits")
        high, why, low = DEFAULT_INT_HIGH, "", 0
        if bounds:
            high, why = min(bounds)
        if small:
            low = max(lo for lo, _ in small)
            if high > SMALL_HIGH or not why:
                high, why = min(high, SMALL_HIGH), small[0][1]
        return ValuePlan("ints", low, max(high, low + 1), why)

    def _big_mul(self, start: str) -> bool:
        """``start`` reaches (through casts and reshapes) a Mul by a constant of
        magnitude >= 1000: the extended attention mask of BERT-like models."""
        todo, seen = [start], set()
        while todo:
            t = todo.pop()
            if t in seen or len(seen) > 200:
                continue
            seen.add(t)
            for node, slot in self.readers.get(t, []):
                if node.op_type == "Mul" and len(node.input) == 2:
                    c = self.const(node.input[1 - slot])
                    if c is not None and c.size and c.dtype.kind == "f" and float(np.max(np.abs(c))) >= BIG_NEGATIVE:
                        return True
                elif node.op_type in _VALUE_PASS and slot == 0:
                    todo.extend(o for o in node.output if o)
        return False

    # ----------------------------------------------------------------- dims

    def input_dims(self) -> dict[str, list]:
        out = {}
        for vi in self.inputs:
            tt = vi.type.tensor_type
            out[vi.name] = [(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
                            for d in tt.shape.dim] if tt.HasField("shape") else None
        return out

    def _concat_uses(self, name: str) -> list[tuple[Any, int]]:
        """Concats with >= 2 operands that ``name`` feeds (through Identity, Cast,
        one-operand Concats): (node, operand index)."""
        out, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for node, slot in self.readers.get(t, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Concat" and len([i for i in node.input if i]) >= 2:
                    out.append((node, slot))
                elif node.op_type in _SHAPE_KEEP or node.op_type == "Concat":
                    todo.extend(o for o in node.output if o)
        return out

    def _relations(self) -> None:
        dims = self.input_dims()
        symbols = [d for ds in dims.values() if ds for d in ds if isinstance(d, str)]
        symbols = list(dict.fromkeys(symbols))
        if not symbols:
            return
        mask_syms = {d for n, ds in dims.items() if ds and self.plans[n].kind == "mask" for d in ds if isinstance(d, str)}
        # symbol -> [is this occurrence a KV-cache-like Concat operand on its axis]
        occurrences: dict[str, list[bool]] = {}
        concats: dict[int, tuple[Any, int]] = {}  # id(node) -> (node, axis)
        for name, ds in dims.items():
            if not ds:
                continue
            uses = self._concat_uses(name)
            axes = set()
            for node, _slot in uses:
                axis = _attr(node, "axis", 0)
                axis = axis + len(ds) if axis < 0 else axis
                if 0 <= axis < len(ds) and isinstance(ds[axis], str):
                    concats[id(node)] = (node, axis)
                    # a cache: rank >= 3, joined with something the graph computes
                    if len(ds) >= 3 and any(i and self._source_input(i) is None for i in node.input):
                        axes.add(axis)
            for k, d in enumerate(ds):
                if isinstance(d, str):
                    occurrences.setdefault(d, []).append(k in axes)
        self.kv_symbols = {s for s, occ in occurrences.items() if occ and all(occ)}
        if not concats:
            return
        inferred = self.inferred()
        known = set(symbols)
        groups: list[tuple[Relation, ...]] = []
        for node, axis in concats.values():
            terms: list[str] = []
            const, unknown = 0, 0
            excluded: set[str] = set()
            for operand in node.input:
                if not operand:
                    continue
                ds = dims.get(operand) or inferred.get(operand)
                if ds is None and operand not in dims:
                    src = self._source_input(operand)
                    ds = dims.get(src) if src else None
                d = ds[axis] if ds and axis < len(ds) else None
                if isinstance(d, int):
                    const += d
                elif isinstance(d, str) and d in known:
                    terms.append(d)
                else:
                    unknown += 1
                excluded |= {x for k, x in enumerate(ds or []) if k != axis and isinstance(x, str) and x in known}
            out = (inferred.get(node.output[0]) or [None] * (axis + 1))
            y = out[axis] if axis < len(out) else None
            excluded |= set(terms)
            if unknown > 1 or not terms:
                continue
            if isinstance(y, str) and y in known and y not in excluded:
                targets = [y]
            else:
                targets = [s for s in symbols if s not in excluded]
                targets.sort(key=lambda s: s not in mask_syms)
            options = []
            for t in targets:
                if unknown:
                    fill = [s for s in symbols if s not in excluded and s != t]
                    fill.sort(key=lambda s: s in mask_syms)
                    options.extend(Relation(t, tuple(terms) + (f,), const) for f in fill)
                else:
                    options.append(Relation(t, tuple(terms), const))
            if options and tuple(options) not in groups:
                groups.append(tuple(options))
        self.relation_sets = _relation_sets(groups)

    def _source_input(self, t: str) -> str | None:
        if not hasattr(self, "_producers"):
            self._producers = {o: n for n in self.model.graph.node for o in n.output}
        for _ in range(20):
            n = self._producers.get(t)
            if n is None or not (n.op_type in _SHAPE_KEEP or n.op_type == "Concat" and len(n.input) == 1):
                break
            t = n.input[0]
        return t if t in self.plans else None

    def inferred(self) -> dict[str, list]:
        """Dims of every tensor by ONNX shape inference (with data propagation) on a copy
        without large constants; {} when inference fails."""
        if self._inferred is not None:
            return self._inferred
        self._inferred = {}
        m = self.model
        shell = onnx.ModelProto(ir_version=m.ir_version)
        shell.opset_import.extend(m.opset_import)
        shell.functions.extend(m.functions)
        g = shell.graph
        for f in ("node", "input", "output", "value_info"):
            getattr(g, f).extend(getattr(m.graph, f))
        listed = {i.name for i in g.input}
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) > _CONST_LIMIT:
                if t.name not in listed:
                    g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            else:
                g.initializer.append(t)
        try:
            out = onnx.shape_inference.infer_shapes(shell, check_type=False, strict_mode=False, data_prop=True)
        except Exception:
            return self._inferred
        for vi in list(out.graph.value_info) + list(out.graph.output) + list(out.graph.input):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                self._inferred[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                           for d in tt.shape.dim]
        return self._inferred


def _relation_sets(groups: list[tuple[Relation, ...]]) -> list[tuple[Relation, ...]]:
    """Consistent sets of relations (each symbol defined once, no cycles): the first
    option of every Concat group, then one alternative at a time."""

    def consistent(rels) -> tuple[Relation, ...]:
        chosen: list[Relation] = []
        for r in rels:
            if any(c.target == r.target for c in chosen):
                continue
            trial = chosen + [r]
            if _resolve({}, trial, check_only=True) is not None:
                chosen = trial
        return tuple(chosen)

    if not groups:
        return []
    base = [g[0] for g in groups]
    sets = [consistent(base)]
    for i, g in enumerate(groups):
        for alt in g[1:]:
            s = consistent(base[:i] + [alt] + base[i + 1:])
            if s and s not in sets:
                sets.append(s)
            if len(sets) >= _MAX_RELATION_SETS:
                return sets
    return [s for s in sets if s]


def _resolve(values: dict[str, int], relations, check_only: bool = False) -> dict[str, int] | None:
    """Fill in every relation's target from its terms; None on a cycle."""
    vals = dict(values)
    pending = list(relations)
    targets = {r.target for r in relations}
    for _ in range(len(pending) + 1):
        rest = []
        for r in pending:
            if all(t in vals or (check_only and t not in targets) for t in r.terms):
                vals[r.target] = sum(vals.get(t, 0) for t in r.terms) + r.const
            else:
                rest.append(r)
        pending = rest
        if not pending:
            return vals
    return None


def integer_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input whose values the model bounds (Gather/GatherElements
    table axis, directly or through reshapes, casts and an Add of a constant; OneHot
    depth; Range/Slice operands), the exclusive upper bound of the generated values
    (token ids of an embedding, BERT's 2-row token_type_ids)."""
    return {n: p.high for n, p in Analysis(model).plans.items() if p.kind == "ints" and p.why}


# --------------------------------------------------------------------------- generator


@dataclass
class Candidate:
    feeds: dict[str, np.ndarray]
    symbols: dict[str, int]
    relations: tuple[Relation, ...] = ()
    zero: tuple[str, ...] = ()  # KV symbols bound to 0
    rejected: int = 0  # candidates tried before this one
    notes: list[str] = field(default_factory=list)


class InputGenerator:
    """Candidate input sets for a session's inputs, derived from ``model``'s graph."""

    def __init__(self, session_inputs, model: onnx.ModelProto | None = None, seed: int = 0,
                 sizes: Sequence[int] = DIM_SIZES):
        self.args = list(session_inputs)
        self.seed = seed
        self.sizes = tuple(sizes)
        self.error = None
        try:
            self.analysis = Analysis(model)
        except Exception as exc:  # a graph the analysis does not understand: plain N(0, 1) / 0..3
            self.analysis = Analysis(None)
            self.error = f"input analysis failed ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"
        for a in self.args:
            if a.type not in ORT_TYPES:
                raise InputError(f"input {a.name!r} has type {a.type}; pass --inputs to verify this model")
        keys: dict[str, None] = {}
        self._shape_keys: dict[str, list] = {}
        unnamed = 0
        for a in self.args:
            ks = []
            for d in a.shape:
                if isinstance(d, int) and d >= 0:
                    ks.append(d)
                else:
                    key = d if isinstance(d, str) and d else f"?{unnamed}"
                    unnamed += 0 if isinstance(d, str) and d else 1
                    keys.setdefault(key, None)
                    ks.append(key)
            self._shape_keys[a.name] = ks
        self.symbols = list(keys)
        rels = [tuple(r for r in s if r.target in keys and all(t in keys for t in r.terms))
                for s in self.analysis.relation_sets]
        self.relation_sets = [s for s in dict.fromkeys(rels) if s]
        self.kv_symbols = [s for s in self.symbols if s in self.analysis.kv_symbols]

    def plan(self, name: str) -> ValuePlan:
        return self.analysis.plans.get(name) or ValuePlan()

    def bind(self, sizes: Sequence[int], relations=(), zero=()) -> dict[str, int] | None:
        targets = {r.target for r in relations}
        vals, i = {}, 0
        for s in self.symbols:
            if s in targets:
                continue
            vals[s] = 0 if s in zero else sizes[min(i, len(sizes) - 1)]
            i += 0 if s in zero else 1
        return _resolve(vals, relations)

    def feeds(self, symbols: Mapping[str, int]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        out = {}
        for a in self.args:
            shape = [symbols[k] if isinstance(k, str) else k for k in self._shape_keys[a.name]]
            out[a.name] = self.plan(a.name).values(ORT_TYPES[a.type], shape, rng)
        return out

    def candidates(self) -> Iterator[Candidate]:
        """Bindings to try, best first: distinct sizes with the Concat relations
        (each alternative), then without; all dims 2, then 1; the KV past empty."""
        rel_sets = self.relation_sets
        order: list[tuple[Sequence[int], tuple, tuple]] = [(self.sizes, r, ()) for r in rel_sets]
        order.append((self.sizes, (), ()))
        for sizes in ((2,), (1,)):
            order.extend((sizes, r, ()) for r in rel_sets[:1])
            order.append((sizes, (), ()))
        if self.kv_symbols:
            order.append((self.sizes, rel_sets[0] if rel_sets else (), tuple(self.kv_symbols)))
        seen, tried = [], 0
        for sizes, rels, zero in order:
            binding = self.bind(sizes, rels, zero)
            if binding is None or binding in seen or any(v < 0 for v in binding.values()):
                continue
            seen.append(binding)
            yield Candidate(self.feeds(binding), binding, rels, zero, tried)
            tried += 1

    def zero_past(self, cand: Candidate) -> Candidate | None:
        """The chosen binding with the KV-cache symbols (only ever Concat operands) at 0."""
        if not self.kv_symbols or cand.zero:
            return None
        free = {s: v for s, v in cand.symbols.items() if s not in {r.target for r in cand.relations}}
        free.update({s: 0 for s in self.kv_symbols})
        binding = _resolve(free, cand.relations)
        if binding is None or binding == cand.symbols:
            return None
        return Candidate(self.feeds(binding), binding, cand.relations, tuple(self.kv_symbols))

    def describe(self, cand: Candidate, zero_note: str | None = None) -> dict[str, str]:
        """{input: "int64 [2,7] in 0..99 (Gather table of 100 rows)", ..., "<dims>": ...}"""
        out = {}
        for a in self.args:
            v = cand.feeds[a.name]
            dt = np.dtype(ORT_TYPES[a.type])
            out[a.name] = f"{'str' if dt.kind in 'US' else dt.name} [{','.join(map(str, v.shape))}] " \
                          + self.plan(a.name).describe(dt)
        if self.symbols:
            parts = [", ".join(f"{s}={cand.symbols[s]}" for s in self.symbols)]
            parts += [r.text() for r in cand.relations]
            if cand.zero:
                parts.append(", ".join(cand.zero) + " = 0 (KV cache empty)")
            if cand.rejected:
                parts.append(f"{cand.rejected} other binding(s) rejected by the original model")
            if zero_note:
                parts.append(zero_note)
            out["<dims>"] = "; ".join(parts)
        if self.error:
            out["<note>"] = self.error
        return out

    def failure(self, errors: list[str]) -> InputError:
        """The one-line error when the original fails on every candidate."""
        err = short_message(RuntimeError(errors[-1] if errors else "no candidate"), None)
        m = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", err)
        if m:  # "... running Reshape node. Name:'r' Status Message: x == y was false. The input ..."
            detail = re.sub(r"^[^.]{0,200}? was false\. ", "", m.group(3))
            err = f"{m.group(1)} node" + (f" {m.group(2)[:40]!r}" if m.group(2) else "") + f": {detail}"
        name = self._culprit(m.group(2) if m else "")
        tail = f"); pass --inputs with real values for {name[:40]!r} or use --no-verify"
        head = "cannot verify: the original fails on every generated input ("
        err = short_message(RuntimeError(err), limit=max(40, 195 - len(head) - len(tail)))
        return InputError(head + err + tail)

    def _culprit(self, node_name: str) -> str:
        """The input most likely at fault: one feeding the failing node, with
        symbolic dims or integers first."""
        names = [a.name for a in self.args]
        model = self.analysis.model
        if model is not None and node_name:
            producers = {o: n for n in model.graph.node for o in n.output}
            node = next((n for n in model.graph.node if n.name == node_name), None)
            found, todo, seen = [], list(node.input) if node is not None else [], set()
            while todo:
                t = todo.pop()
                if t in seen:
                    continue
                seen.add(t)
                if t in names:
                    found.append(t)
                elif t in producers:
                    todo.extend(producers[t].input)
            if found:
                names = [n for n in names if n in found]

        def rank(n):
            a = next(x for x in self.args if x.name == n)
            return (not any(not isinstance(d, int) for d in a.shape), a.type.startswith("tensor(float"))

        return min(names, key=rank) if names else "?"


def generate_inputs(sess, sizes: Sequence[int], seed: int = 0, model: onnx.ModelProto | None = None
                    ) -> dict[str, np.ndarray]:
    """Random inputs for ``sess``, symbolic dims bound to ``sizes`` in order: with
    ``model``, values follow the graph's use of each input (masks, table bounds);
    without, floats ~ N(0, 1) and integers in 0..3."""
    gen = InputGenerator(sess.get_inputs(), model, seed, sizes)
    return gen.feeds(gen.bind(sizes))


def random_samples(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], count: int, seed: int,
                   dtypes: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of the given static ``shapes`` (npu ``--calib random``), values as
    for verification: masks 0/1, indices inside their tables, floats N(0, 1)."""
    analysis = Analysis(model)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {}
        for name, dt in dtypes.items():
            dt = np.dtype(dt)
            if dt.kind not in "fiub":
                raise InputError(f"cannot generate random calibration data for input {name!r} of type {dt}")
            feed[name] = (analysis.plans.get(name) or ValuePlan()).values(dt, shapes[name], rng)
        out.append(feed)
    return out


def summary_line(generated: Mapping[str, str], limit: int = 4) -> str:
    """One compact line about generated inputs (the CLI's summary): inputs made
    alike are grouped, at most ``limit`` groups shown, then the dims."""
    groups: dict[str, list[str]] = {}
    for name, desc in generated.items():
        if not name.startswith("<"):
            groups.setdefault(desc, []).append(name)
    parts = [f"{names[0]}" + (f" (+{len(names) - 1} alike)" if len(names) > 1 else "") + f" {desc}"
             for desc, names in list(groups.items())[:limit]]
    if len(groups) > limit:
        parts.append(f"... {sum(len(n) for n in list(groups.values())[limit:])} more")
    parts += [generated[k] for k in ("<dims>", "<note>") if k in generated]
    return "generated inputs: " + "; ".join(parts)
