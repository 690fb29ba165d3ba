"""The Beats reparameterization: ``W = W0 + D (.) V``, inserted and folded.

One explicit transformation, two directions:

- ``insert`` keeps each selected weight ``W`` as the frozen ``W0`` (same name),
  adds trainable ``D`` and ``V`` (or ``V = A @ B``), and feeds the weight's
  consumers ``W0 + D (.) V`` (layout ``weight``) or adds a low-rank side path on
  the activations (layout ``branch``).  ``V`` (or ``B``) starts at zero, so the
  model's function is unchanged.
- ``fold`` computes ``W0 + D (.) V`` once, stores it under ``W0``'s name and
  removes every inserted node and tensor: the graph has the original nodes.

Everything fold needs is in a ``Record`` per weight, kept by the driver in the
model's ``metadata_props`` (key ``RECORD_KEY``).

Factorizations (``out`` = the weight's output-channel axis ``axis``, ``in`` =
the product of the other dims, in order):

- ``full``:   D, V shaped like W;            delta = D * V
- ``vector``: D of shape [out], V like W;    delta = D (broadcast on axis) * V
- ``rank:R``: D [out], A [in, R], B [R, out]; delta = moveaxis((A @ B) * D, -1, axis)
"""

from __future__ import annotations

import collections
import fnmatch
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import (ComputedValues, ExternalRows, NameScope, const_dtype, const_value, external_rows, index_of,
                    is_const, is_standard, onnx_dtype, producer, replace_uses)
from .gs_adapter import LazyValues

try:  # a declared dependency; without it BLAS keeps its own thread count (same bits, slower)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - depends on the environment
    ThreadpoolController = None

__all__ = [
    "DEFAULT_OPS",
    "FORMAT_VERSION",
    "FoldedValues",
    "InsertStats",
    "MIN_OPSET",
    "Policy",
    "RECORD_KEY",
    "RECURRENT_SLOTS",
    "Record",
    "ReparamError",
    "Rule",
    "Use",
    "WEIGHT_SLOTS",
    "apply_delta",
    "delta",
    "dump_records",
    "find_weights",
    "fold",
    "insert",
    "load_records",
    "parse_factorization",
    "reinsert",
    "shapes_for",
    "unfold",
    "zero_delta",
]

RECORD_KEY = "beats.reparam"
FORMAT_VERSION = 1

# op -> (weight input slot, output-channel axis of the tensor in that slot)
WEIGHT_SLOTS = {
    "MatMul": (1, -1),
    "Gemm": (1, None),  # depends on transB
    "Conv": (1, 0),
    "ConvTranspose": (1, 1),
    "Gather": (0, -1),
    # recurrent ops: W [dirs, gates*hidden, input] at 1 and R [dirs, gates*hidden, hidden] at 2
    "LSTM": (1, 1),
    "GRU": (1, 1),
    "RNN": (1, 1),
}
RECURRENT_SLOTS = (1, 2)  # both weight inputs of LSTM/GRU/RNN are selected
DEFAULT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN")
_FLOAT_TYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and friends live in ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
# The inserted Add/Mul broadcast numpy-style from opset 7 on (before it they need
# ``broadcast``/``axis`` attributes, and ONNX Runtime has no kernels for them).
MIN_OPSET = 7
# What exporters put between a weight and its consumer.
_CHAIN_OPS = ("Identity", "Cast", "Transpose", "Reshape")


class ReparamError(ValueError):
    """A request that cannot be carried out (the driver reports it as bad input)."""


# --------------------------------------------------------------------------- policy


def parse_factorization(text: str) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ReparamError(f"factorization must be a string (full, vector or rank:R), not {text!r}")
    if text in ("full", "vector"):
        return text, 0
    if text.startswith("rank:"):
        try:
            r = int(text[5:])
        except ValueError:
            r = 0
        if r >= 1:
            return "rank", r
    raise ReparamError(f"unknown factorization {text!r}: use full, vector or rank:R (R >= 1)")


@dataclass(frozen=True)
class Rule:
    ops: tuple[str, ...] = DEFAULT_OPS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 1024
    factorization: str = "full"  # full | vector | rank:R
    layout: str = "weight"  # weight | branch

    def __post_init__(self):
        parse_factorization(self.factorization)
        if self.layout not in ("weight", "branch"):
            raise ReparamError(f"unknown layout {self.layout!r}: use weight or branch")
        if self.layout == "branch" and not self.factorization.startswith("rank:"):
            raise ReparamError("the branch layout needs a low-rank factorization (rank:R)")
        unknown = [op for op in self.ops if op not in WEIGHT_SLOTS]
        if unknown:
            raise ReparamError(f"cannot select weights of {', '.join(unknown)}; known: {', '.join(WEIGHT_SLOTS)}")
        if self.min_size < 0:
            raise ReparamError("min_size must be >= 0")

    def matches(self, op: str, name: str, size: int) -> bool:
        if op not in self.ops or size < self.min_size:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = (Rule(),)
    seed: int = 0
    d_scale: float = 0.02  # D = 1 + d_scale * N(0, 1)

    def __post_init__(self):
        if not self.rules:
            raise ReparamError("a policy needs at least one rule")
        if self.seed < 0:
            raise ReparamError(f"seed must be >= 0, not {self.seed}")

    @classmethod
    def from_dict(cls, data: dict) -> "Policy":
        if not isinstance(data, dict):
            raise ReparamError("a policy config must be a JSON object")
        unknown = set(data) - {"rules", "seed", "d_scale"}
        if unknown:
            raise ReparamError(f"unknown config keys: {', '.join(sorted(unknown))}")
        rules = []
        raw_rules = data.get("rules", [{}])
        if not isinstance(raw_rules, list) or not raw_rules:
            raise ReparamError("config key 'rules' must be a non-empty list of objects")
        for i, r in enumerate(raw_rules):
            if not isinstance(r, dict):
                raise ReparamError(f"rule {i} must be an object")
            bad = set(r) - {"ops", "include", "exclude", "min_size", "factorization", "layout"}
            if bad:
                raise ReparamError(f"rule {i}: unknown keys {', '.join(sorted(bad))}")
            kw = {}
            for k, v in r.items():
                if k in ("ops", "include", "exclude"):
                    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                        raise ReparamError(f"rule {i}: {k} must be a list of strings")
                    v = tuple(v)
                elif k == "min_size" and (isinstance(v, bool) or not isinstance(v, int)):
                    raise ReparamError(f"rule {i}: min_size must be an integer")
                elif k in ("factorization", "layout") and not isinstance(v, str):
                    raise ReparamError(f"rule {i}: {k} must be a string")
                kw[k] = v
            rules.append(Rule(**kw))
        seed, d_scale = data.get("seed", 0), data.get("d_scale", 0.02)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ReparamError("config key 'seed' must be an integer")
        if isinstance(d_scale, bool) or not isinstance(d_scale, (int, float)) or not math.isfinite(d_scale):
            raise ReparamError("config key 'd_scale' must be a number")
        return cls(tuple(rules), seed, float(d_scale))


# --------------------------------------------------------------------------- records


@dataclass
class Record:
    """Everything needed to fold (or unfold) one reparameterized weight."""

    weight: str
    shape: list[int]
    dtype: str
    factorization: str  # full | vector | rank
    rank: int
    layout: str
    axis: int
    D: str
    V: str | None = None
    A: str | None = None
    B: str | None = None
    effective: str | None = None  # weight layout: the tensor consumers read
    nodes: list[str] = field(default_factory=list)  # inserted node names
    renamed: dict[str, str] = field(default_factory=dict)  # branch: base output -> original output
    helpers: list[str] = field(default_factory=list)  # inserted frozen constants (shapes)

    @property
    def trainable(self) -> list[str]:
        return [n for n in (self.D, self.V, self.A, self.B) if n]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**d)


def dump_records(records: list[Record]) -> str:
    return json.dumps({"version": FORMAT_VERSION, "weights": [r.to_dict() for r in records]}, sort_keys=True)


def load_records(text: str | None) -> list[Record]:
    if not text:
        return []
    try:
        data = json.loads(text)
        if data.get("version") != FORMAT_VERSION:
            raise ReparamError(f"reparameterization record version {data.get('version')} is not supported")
        return [Record.from_dict(w) for w in data["weights"]]
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ReparamError):
            raise
        raise ReparamError(f"the model's {RECORD_KEY} record is unreadable ({exc})") from None


# --------------------------------------------------------------------------- math


def shapes_for(record_or_shape, axis: int, factorization: str, rank: int) -> dict[str, tuple[int, ...]]:
    shape = tuple(record_or_shape)
    out = shape[axis]
    inn = math.prod(shape) // out if out else 0
    if factorization == "full":
        return {"D": shape, "V": shape}
    if factorization == "vector":
        return {"D": (out,), "V": shape}
    return {"D": (out,), "A": (inn, rank), "B": (rank, out)}


def delta(rec: Record, values: dict[str, np.ndarray]) -> np.ndarray:
    """``D (.) V`` in the weight's own layout, in float64."""
    shape = tuple(rec.shape)
    d = values[rec.D].astype(np.float64)
    if rec.factorization == "full":
        return d * values[rec.V].astype(np.float64)
    bshape = [1] * len(shape)
    bshape[rec.axis] = shape[rec.axis]
    if rec.factorization == "vector":
        return d.reshape(bshape) * values[rec.V].astype(np.float64)
    mat = values[rec.A].astype(np.float64) @ values[rec.B].astype(np.float64)  # [in, out]
    mat = mat * d  # D on the output axis
    rest = [s for i, s in enumerate(shape) if i != rec.axis]
    return np.moveaxis(mat.reshape(rest + [shape[rec.axis]]), -1, rec.axis)


_BLOCK_BYTES = 32 << 20


def _row_ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Blocks of rows (axis 0, contiguous in C order) whose float64 temporaries
    stay near ``_BLOCK_BYTES``.  The blocks are part of the result's
    definition: a rank factorization's ``A @ B`` is one BLAS call per block, and
    ``apply_delta`` and ``FoldedValues`` use the same blocks, so both give the
    same bits."""
    rows = int(shape[0])
    row_bytes = max(int(np.prod(shape[1:], dtype=np.int64)) * 8 * 3, 1)  # delta, W block, sum: float64
    step = max(1, _BLOCK_BYTES // row_bytes)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


class _OneBlasThread:
    """A context in which BLAS computes on one thread.  A rank factorization's
    ``A @ B`` is only R deep: split over BLAS's threads on a busy 2-core
    machine it took 6x longer than on one (the threads wait on each other).
    Each element is the same dot product either way: the same bits (checked
    against the multi-threaded reference on full-size weights).  Nested and
    concurrent uses (fold's worker threads) share one limit, set by the first
    to enter and restored by the last to leave.  Without threadpoolctl (a
    declared dependency, imported defensively) BLAS keeps its own thread count."""

    _lock = threading.Lock()
    _depth = 0
    _limiter = None
    _controller = None

    def __enter__(self):
        if ThreadpoolController is None:
            return self
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                if cls._controller is None:  # scans the loaded libraries once
                    cls._controller = ThreadpoolController()
                cls._limiter = cls._controller.limit(limits=1, user_api="blas")
            cls._depth += 1
        return self

    def __exit__(self, *exc):
        if ThreadpoolController is None:
            return
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                cls._limiter.restore_original_limits()
                cls._limiter = None


def _delta_rows(rec: Record, shape: tuple[int, ...], values, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` (axis 0) of ``D (.) V`` in the weight's layout, in float64.
    Full-size tensors (V; D of ``full``) are only sliced, so they may be
    ``graph.ExternalRows`` readers; D [out], A and B are arrays.  Products are
    taken in place, operands in the order of ``D (.) V`` (same bits as
    ``delta``'s out-of-place products)."""
    f64 = np.float64
    if rec.factorization == "full":
        out = values[rec.D][r0:r1].astype(f64)
        return np.multiply(out, values[rec.V][r0:r1].astype(f64), out=out)
    ax, d, nd = rec.axis, values[rec.D], len(shape)
    if rec.factorization == "vector":
        bshape = [1] * nd
        if ax == 0:
            bshape[0], d = r1 - r0, d[r0:r1]
        else:
            bshape[ax] = shape[ax]
        v = values[rec.V][r0:r1].astype(f64)
        return np.multiply(np.asarray(d, f64).reshape(bshape), v, out=v)
    rest = [s for i, s in enumerate(shape) if i != ax]
    a, b = values[rec.A], values[rec.B]
    if ax == 0:  # rows are output channels: columns r0:r1 of A @ B
        with _OneBlasThread():
            mat = np.asarray(a, f64) @ np.asarray(b[:, r0:r1], f64)
        np.multiply(mat, np.asarray(d[r0:r1], f64), out=mat)
        return np.moveaxis(mat.reshape(rest + [r1 - r0]), -1, 0)
    inner = int(np.prod(rest[1:], dtype=np.int64))  # rest[0] is axis 0: rows of A, ``inner`` per row
    with _OneBlasThread():
        mat = np.asarray(a[r0 * inner:r1 * inner], f64) @ np.asarray(b, f64)
    np.multiply(mat, np.asarray(d, f64), out=mat)
    return np.moveaxis(mat.reshape([r1 - r0] + rest[1:] + [shape[ax]]), -1, ax)


def _float_bits(dtype: np.dtype) -> tuple[type, int, int] | None:
    """(unsigned int type of the same size, |x| bit mask, bits of +inf) of a
    binary floating-point dtype, None for others."""
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_TYPES:
        return None
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    return uint, (1 << (8 * dtype.itemsize - 1)) - 1, int(np.array(np.inf, dtype).view(uint))


def _zero_or_nan(blk: np.ndarray) -> np.ndarray | None:
    """Where ``blk`` holds +-0 or a NaN (None: not a float dtype we know).
    These are the only values x for which ``cast(float64(x) +- 0)`` may not
    give x's bits back: for every other x (finite or infinite) x +- 0 == x
    exactly and both casts are exact."""
    bits = _float_bits(blk.dtype)
    if bits is None:
        return None
    uint, mask, inf = bits
    mag = np.bitwise_and(blk.view(uint), uint(mask))
    mag -= uint(1)  # wraps 0 to the largest value: |x| == 0 or |x| > inf (NaN) <=> |x| - 1 >= inf
    return mag >= uint(inf)


def _combine(blk: np.ndarray, dlt: np.ndarray, sign: int) -> tuple[np.ndarray, float]:
    """``blk + sign * dlt`` summed in float64, cast back to blk's dtype; where
    the delta is exactly zero blk's bits are kept (so -0.0 stays -0.0).
    Returns it and the largest |dlt|.  ``dlt`` (a fresh float64 array) is
    overwritten: the sum is taken in its buffer, blk cast to float64 as it is
    read (exact; the operands in the order ``blk + dlt``, so even NaN
    payloads are those of ``float64(blk) + dlt``).  The zero-delta mask is
    only needed where blk is +-0 or NaN (``_zero_or_nan``), so the float64
    ``dlt == 0`` test runs only on blocks that hold such values."""
    dlt = np.asarray(dlt, np.float64)  # ``delta`` of a 0-d weight is a numpy scalar
    biggest = _absmax(dlt)
    keep = _zero_or_nan(blk)
    if keep is None:
        keep = dlt == 0
    elif keep.any():
        keep &= dlt == 0
    else:
        keep = None
    (np.add if sign > 0 else np.subtract)(blk, dlt, out=dlt, dtype=np.float64)
    out = dlt.astype(blk.dtype)
    if keep is not None:
        np.copyto(out, blk, where=keep)
    return out, biggest


def _absmax(a: np.ndarray) -> float:
    """``max |a|`` (NaN when ``a`` holds a NaN), without an ``abs`` temporary."""
    if not a.size:
        return 0.0
    hi, lo = float(np.max(a)), float(np.min(a))
    return hi if math.isnan(hi) else max(0.0, hi, -lo)


_SCAN_BYTES = 64 << 20


def _scan(x):
    """``x`` (an array, or ``graph.ExternalRows``) in row blocks of about
    ``_SCAN_BYTES``, as arrays numpy's ``isfinite``/``any`` take."""
    if isinstance(x, ExternalRows):
        row = max(int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize, 1)
        step = max(1, _SCAN_BYTES // row)
        blocks = (x[r0:r0 + step] for r0 in range(0, x.shape[0], step))
    else:
        blocks = iter((np.asarray(x),))
    for blk in blocks:
        yield blk if blk.dtype.kind in "fiub" else blk.astype(np.float64)  # bfloat16 and friends


def _all_zero(x) -> bool:
    """Every element is +-0 (a NaN is not)."""
    return not any(np.any(blk) for blk in _scan(x))


def _all_finite(x) -> bool:
    return all(bool(np.isfinite(blk).all()) for blk in _scan(x))


def zero_delta(rec: Record, values: dict) -> bool:
    """Whether ``D (.) V`` is provably +-0 everywhere (no NaN): one factor is
    all zeros and the others are finite (for a zero D of ``rank``, ``A @ B``
    must be finite too: |A @ B| <= R * max|A| * max|B|).  Then every folded
    (or unfolded) weight is W0's bits.  Small factors are checked first;
    full-size ones (possibly ``ExternalRows``) are read block by block, and
    the scan stops at the first block that decides."""
    if rec.factorization == "rank":
        a, b, d = values[rec.A], values[rec.B], values[rec.D]
        if not (_all_finite(a) and _all_finite(b) and _all_finite(d)):
            return False
        if _all_zero(b) or _all_zero(a):
            return True
        if _all_zero(d):
            af, bf = np.asarray(a, np.float64), np.asarray(b, np.float64)
            return math.isfinite(max(rec.rank, 1) * _absmax(af) * _absmax(bf))
        return False
    d, v = values[rec.D], values[rec.V]
    return (_all_zero(v) and _all_finite(d)) or (_all_zero(d) and _all_finite(v))


def apply_delta(rec: Record, w: np.ndarray, values: dict[str, np.ndarray], sign: int = 1) -> tuple[np.ndarray, float]:
    """``w + sign * D (.) V``, block by block along axis 0, so the temporaries
    stay small next to the weight itself (the same blocks ``FoldedValues``
    writes, so both give the same bits).  Sums run in float64; W's bits are
    kept wherever the delta is exactly zero (all of them when ``zero_delta``:
    then nothing is computed).  Returns the new weight and the largest |delta|."""
    out = np.empty_like(w)
    if w.size == 0:
        return out, 0.0
    if zero_delta(rec, values):
        out[...] = w
        return out, 0.0
    if w.ndim == 0:
        out[...], biggest = _combine(w, delta(rec, values), sign)
        return out, biggest
    biggest = 0.0
    for r0, r1 in _row_ranges(w.shape):
        out[r0:r1], big = _combine(w[r0:r1], _delta_rows(rec, w.shape, values, r0, r1), sign)
        biggest = max(biggest, big)
    return out, biggest


# Threads that read and compute folded blocks ahead of the writer (numpy's
# casts and ufuncs and file reads release the GIL); blocks in flight: one more.
_WORKERS = 2


class FoldedValues(ComputedValues):
    """A folded weight ``W0 + D (.) V`` whose W0 stays in its external data
    file: computed block by block when the model is written (or loaded).  The
    delta is computed once per block, for the sum and for the largest |delta|,
    which is set (``max_abs_delta``, and ``entry["max_abs_delta"]`` of the
    fold's report entry, when given) once every block has been computed.
    ``_WORKERS`` threads read and compute the next blocks while the caller
    writes this one; blocks come out in order."""

    def __init__(self, rec: Record, w0: ExternalRows, values: dict, entry: dict | None = None):
        super().__init__(rec.weight, w0.dtype, w0.shape)
        self.rec, self.w0, self.values, self.entry = rec, w0, values, entry
        self.max_abs_delta: float | None = None

    def _block(self, r0: int, r1: int) -> tuple[np.ndarray, float]:
        return _combine(self.w0[r0:r1], _delta_rows(self.rec, self.w0.shape, self.values, r0, r1), 1)

    def blocks(self):
        biggest = 0.0
        pending: collections.deque = collections.deque()
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="beats-fold") as pool:
            try:
                for r0, r1 in _row_ranges(self.w0.shape):
                    pending.append(pool.submit(self._block, r0, r1))
                    if len(pending) > _WORKERS:
                        out, big = pending.popleft().result()
                        biggest = max(biggest, big)
                        yield out
                while pending:
                    out, big = pending.popleft().result()
                    biggest = max(biggest, big)
                    yield out
            finally:  # the caller stopped early (an error): nothing more is computed
                for f in pending:
                    f.cancel()
        self.max_abs_delta = biggest
        if self.entry is not None:
            self.entry["max_abs_delta"] = biggest


# --------------------------------------------------------------------------- sites


@dataclass
class Use:
    consumer: gs.Node
    slot: int
    chain: list[gs.Node]  # from the weight towards the consumer
    axis: int | None  # output-channel axis in the weight's layout (None: unknown)


def _consumer_axis(node: gs.Node, rank: int) -> int | None:
    slot, axis = WEIGHT_SLOTS[node.op]
    if node.op == "Gemm":
        axis = 0 if node.attrs.get("transB", 0) else 1
    if axis is None or rank == 0:
        return None
    return axis % rank


def _trace(t: gs.Tensor, through: dict[str, gs.Constant] | None = None) -> tuple[gs.Constant | None, list[gs.Node]]:
    """Follow ``t`` back through chain ops to a constant weight; ``through``
    maps an inserted weight's effective tensor to its W0 (so an already
    inserted weight is still found)."""
    chain: list[gs.Node] = []
    while not is_const(t):
        if through and t.name in through:
            return through[t.name], chain
        p = producer(t)
        if p is None or p.op not in _CHAIN_OPS or not is_standard(p) or not p.inputs or len(p.outputs) != 1:
            return None, []
        if p.op == "Reshape" and (len(p.inputs) < 2 or not is_const(p.inputs[1])):
            return None, []
        chain.insert(0, p)
        t = p.inputs[0]
    return t, chain


def _axis_through_chain(chain: list[gs.Node], axis: int | None, w_rank: int) -> int | None:
    """Map an axis of the consumer's input back to the weight's layout."""
    for node in reversed(chain):
        if axis is None:
            return None
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is None:
                perm = list(range(w_rank))[::-1]
            axis = int(perm[axis])
        elif node.op == "Reshape":
            return None
    return axis if axis is None else axis % max(w_rank, 1)


def find_weights(graph: gs.Graph, ops: set[str], through: dict[str, gs.Constant] | None = None,
                 ) -> dict[int, tuple[gs.Constant, list[Use]]]:
    """Weight constants read (directly or through a chain) at a weight slot."""
    found: dict[int, tuple[gs.Constant, list[Use]]] = {}
    for node in graph.nodes:
        if node.op not in ops or not is_standard(node):
            continue
        slot, _ = WEIGHT_SLOTS[node.op]
        for slot in (RECURRENT_SLOTS if node.op in ("LSTM", "GRU", "RNN") else (slot,)):
            if len(node.inputs) <= slot:
                continue
            w, chain = _trace(node.inputs[slot], through)
            if w is None:
                continue
            rank = len(w.shape)
            for n in chain:
                if n.op == "Reshape":
                    rank = int(const_value(n.inputs[1]).size)
            axis = _axis_through_chain(chain, _consumer_axis(node, rank), len(w.shape))
            entry = found.setdefault(id(w), (w, []))
            entry[1].append(Use(node, slot, chain, axis))
    return found


# --------------------------------------------------------------------------- insert


@dataclass
class InsertStats:
    inserted: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # weight -> reason
    already: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(w["trainable_params"] for w in self.inserted)


def insert(graph: gs.Graph, policy: Policy, records: list[Record],
           values: dict[str, np.ndarray] | None = None,
           only: dict[str, Record] | None = None, *, stream: bool = False) -> tuple[list[Record], InsertStats]:
    """Insert D/V for every weight the policy selects (or, with ``only``, for
    exactly those records, with initial ``values``: unfold).  Returns all
    records (old and new) and what happened.  ``stream``: full-size initial
    D/V over 1 MiB are ``ComputedValues`` (written block by block, never
    held whole); the numbers are the same."""
    if graph.opset is not None and graph.opset < MIN_OPSET:
        raise ReparamError(f"the model imports opset {graph.opset} of the default domain; inserting needs "
                           f"opset >= {MIN_OPSET} (convert it first, e.g. with onnx.version_converter)")
    stats = InsertStats()
    done = {r.weight for r in records}
    taken = set(done)
    for r in records:
        taken.update(r.trainable)
        taken.update(r.helpers)
        if r.effective:
            taken.add(r.effective)
    ops = {op for rule in policy.rules for op in rule.ops} if only is None else set(WEIGHT_SLOTS)
    tensors = graph.tensors()
    through = {r.effective: tensors[r.weight] for r in records
               if r.effective and is_const(tensors.get(r.weight))}
    sites = find_weights(graph, ops, through)
    names = NameScope(graph)
    rng = np.random.default_rng(policy.seed)
    new_records = list(records)
    for w, uses in sites.values():
        if w.name in done:
            size = int(np.prod(w.shape, dtype=np.int64))
            if only is None and any(r.matches(uses[0].consumer.op, w.name, size) for r in policy.rules):
                stats.already.append(w.name)
            continue
        if w.name in taken:
            continue
        size = int(np.prod(w.shape, dtype=np.int64))
        if only is not None:
            if w.name not in only:
                continue
            rec0 = only[w.name]
            rule = Rule(ops=tuple(WEIGHT_SLOTS), min_size=0,
                        factorization=rec0.factorization if rec0.factorization != "rank" else f"rank:{rec0.rank}",
                        layout=rec0.layout)
        else:
            rule = next((r for r in policy.rules if r.matches(uses[0].consumer.op, w.name, size)), None)
            if rule is None:
                continue
        reason = _why_not(w, uses, rule, only[w.name].axis if only is not None else None)
        if reason:
            stats.skipped[w.name] = reason
            continue
        rec = _insert_one(graph, w, uses, rule, names, rng, policy.d_scale, values, only.get(w.name) if only else None,
                          stream)
        new_records.append(rec)
        done.add(w.name)
        trainable = sum(int(np.prod(shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)[k])) for k in
                        ("D", "V", "A", "B") if getattr(rec, k))
        stats.inserted.append({
            "weight": rec.weight, "shape": rec.shape, "factorization": rec.factorization, "rank": rec.rank,
            "layout": rec.layout, "consumers": [u.consumer.op for u in uses], "weight_params": size,
            "trainable_params": trainable,
        })
    return new_records, stats


def _why_not(w: gs.Constant, uses: list[Use], rule: Rule, axis: int | None = None) -> str | None:
    """Why ``w`` cannot take ``rule`` (None: it can).  ``axis``: the output
    axis a record already fixed (re-insert), instead of the one the consumers
    imply; readers outside the original selection (a tied embedding's Gather)
    must not veto it."""
    try:
        dt = const_dtype(w)
        if dt is None:
            raise TypeError
    except TypeError:
        return f"weight dtype {w.dtype} is not supported"
    if dt not in _FLOAT_TYPES:
        return f"weight dtype {dt} is not a float type"
    fact, rank = parse_factorization(rule.factorization)
    shape = tuple(w.shape)
    if fact != "full":
        axes = {u.axis for u in uses} if axis is None else {axis % max(len(shape), 1)}
        if None in axes:
            return "output axis unknown through the ops between the weight and its consumer (use factorization full)"
        if len(axes) != 1:
            return "consumers disagree on the output axis (use factorization full)"
        axis = axes.pop()
        out = shape[axis]
        inn = math.prod(shape) // max(out, 1)
        if fact == "rank" and rank > min(inn, out):
            raise ReparamError(
                f"rank {rank} is larger than weight {w.name!r} of shape {list(shape)} allows (at most {min(inn, out)})")
    if rule.layout == "branch":
        readers = {id(u.chain[0] if u.chain else u.consumer) for u in uses}
        others = [n.op for n in w.outputs if id(n) not in readers]
        if others:
            return f"branch layout: the weight is also read by {', '.join(sorted(set(others)))} (use layout weight)"
        for u in uses:
            c = u.consumer
            if c.op not in ("MatMul", "Gemm") or len(shape) != 2:
                return f"branch layout supports 2-D MatMul/Gemm weights, not {c.op}"
            if c.op == "Gemm" and (c.attrs.get("transA", 0) or float(c.attrs.get("alpha", 1.0)) != 1.0):
                return "branch layout needs Gemm with transA=0 and alpha=1"
            if any(n.op not in ("Identity", "Transpose") for n in u.chain):
                return "branch layout cannot follow a Cast or Reshape between weight and consumer"
            if dt != np.float32:
                return "branch layout supports float32 weights (use layout weight)"
    return None


# Under ``stream``, inserted tensors larger than this are computed as the model is written.
_STREAM_BYTES = 1 << 20


class _NormalValues(ComputedValues):
    """D = 1 + scale * N(0, 1), float32, drawn block by block from a saved
    generator state: the same numbers one draw of the whole shape gives."""

    def __init__(self, name: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float):
        super().__init__(name, np.dtype(np.float32), shape)
        self.scale = scale
        self.kind, self.state = type(rng.bit_generator), rng.bit_generator.state
        for r0, r1 in _row_ranges(self.dims):  # move ``rng`` past D, as drawing it would
            rng.standard_normal((r1 - r0,) + self.dims[1:])

    def blocks(self):
        rng = np.random.Generator(self.kind())
        rng.bit_generator.state = self.state
        for r0, r1 in _row_ranges(self.dims):
            yield (1.0 + self.scale * rng.standard_normal((r1 - r0,) + self.dims[1:])).astype(np.float32)


class _ZeroValues(ComputedValues):
    zeros = True  # +0.0 everywhere: all bytes zero

    def __init__(self, name: str, shape: tuple[int, ...]):
        super().__init__(name, np.dtype(np.float32), shape)

    def blocks(self):
        for r0, r1 in _row_ranges(self.dims):
            yield np.zeros((r1 - r0,) + self.dims[1:], np.float32)


def _init_values(rec: Record, rng: np.random.Generator, d_scale: float, stream: bool = False) -> dict:
    """Initial D, V (or A, B).  ``stream``: a full-size D or V over
    ``_STREAM_BYTES`` is a ``ComputedValues`` with the same numbers."""
    shp = shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)

    def big(shape) -> bool:
        return stream and len(shape) >= 1 and int(np.prod(shape, dtype=np.int64)) * 4 > _STREAM_BYTES

    if big(shp["D"]):
        vals = {rec.D: _NormalValues(rec.D, shp["D"], rng, d_scale)}
    else:
        vals = {rec.D: (1.0 + d_scale * rng.standard_normal(shp["D"])).astype(np.float32)}
    if rec.V:
        vals[rec.V] = _ZeroValues(rec.V, shp["V"]) if big(shp["V"]) else np.zeros(shp["V"], np.float32)
    if rec.A:
        inn = shp["A"][0]
        vals[rec.A] = (rng.standard_normal(shp["A"]) / math.sqrt(max(inn, 1))).astype(np.float32)
        vals[rec.B] = np.zeros(shp["B"], np.float32)
    return vals


def _insert_one(graph, w: gs.Constant, uses: list[Use], rule: Rule, names: NameScope, rng, d_scale,
                values, given: Record | None, stream: bool = False) -> Record:
    fact, rank = parse_factorization(rule.factorization)
    shape = [int(s) for s in w.shape]
    axis = uses[0].axis if fact != "full" else (uses[0].axis if uses[0].axis is not None else 0)
    base = w.name
    if given is not None:
        rec = Record(weight=base, shape=shape, dtype=const_dtype(w).name, factorization=given.factorization,
                     rank=given.rank, layout=given.layout, axis=given.axis, D=given.D, V=given.V, A=given.A,
                     B=given.B)
        for n in rec.trainable:
            names.used.add(n)
    else:
        rec = Record(weight=base, shape=shape, dtype=const_dtype(w).name, factorization=fact, rank=rank,
                     layout=rule.layout, axis=int(axis), D=names.fresh(f"{base}.beats_D"))
        if fact == "rank":
            rec.A = names.fresh(f"{base}.beats_A")
            rec.B = names.fresh(f"{base}.beats_B")
        else:
            rec.V = names.fresh(f"{base}.beats_V")
    init = dict(values or {}) if given is not None else _init_values(rec, rng, d_scale, stream)
    want = shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)
    consts = {}
    for key in ("D", "V", "A", "B"):
        name = getattr(rec, key)
        if not name:
            continue
        if name not in init:
            raise ReparamError(f"no value for {name!r}")
        if isinstance(init[name], ComputedValues):  # made by _init_values in its shape
            consts[key] = gs.Constant(name, init[name])
            continue
        arr = np.asarray(init[name], dtype=np.float32)
        if tuple(arr.shape) != tuple(want[key]):
            raise ReparamError(f"{name!r} has shape {list(arr.shape)}, expected {list(want[key])}")
        consts[key] = gs.Constant(name, np.ascontiguousarray(arr))
    if rec.layout == "branch":
        _build_branch(graph, rec, uses, consts, names)
    else:
        _build_weight(graph, rec, w, uses, consts, names)
    return rec


def _node(graph, rec: Record, names: NameScope, op: str, inputs, out_name: str, dtype=np.float32, **attrs):
    out = gs.Variable(names.fresh(out_name), dtype=dtype)
    n = gs.Node(op, name=names.fresh(f"{rec.weight}.beats_{op}"), inputs=list(inputs), outputs=[out], attrs=attrs)
    rec.nodes.append(n.name)
    return n, out


def _helper_const(rec: Record, names: NameScope, base: str, value) -> gs.Constant:
    c = gs.Constant(names.fresh(f"{rec.weight}.beats_{base}"), np.asarray(value, dtype=np.int64))
    rec.helpers.append(c.name)
    return c


def _build_weight(graph, rec: Record, w: gs.Constant, uses: list[Use], c: dict, names: NameScope) -> None:
    new: list[gs.Node] = []

    def add(op, inputs, out, **attrs):
        n, t = _node(graph, rec, names, op, inputs, out, **attrs)
        new.append(n)
        return t

    shape = rec.shape
    bshape = [1] * len(shape)
    bshape[rec.axis] = shape[rec.axis]
    if rec.factorization == "full":
        dv = add("Mul", [c["D"], c["V"]], f"{rec.weight}.beats_DV")
    elif rec.factorization == "vector":
        d = add("Reshape", [c["D"], _helper_const(rec, names, "Dshape", bshape)], f"{rec.weight}.beats_Db")
        dv = add("Mul", [d, c["V"]], f"{rec.weight}.beats_DV")
    else:
        ab = add("MatMul", [c["A"], c["B"]], f"{rec.weight}.beats_AB")
        dv = add("Mul", [ab, c["D"]], f"{rec.weight}.beats_ABD")
        rest = [s for i, s in enumerate(shape) if i != rec.axis]
        if len(shape) != 2 or rec.axis != 1:
            dv = add("Reshape", [dv, _helper_const(rec, names, "Vshape", rest + [shape[rec.axis]])], f"{rec.weight}.beats_DVr")
            if rec.axis != len(shape) - 1:
                perm = list(range(len(shape) - 1))
                perm.insert(rec.axis, len(shape) - 1)
                dv = add("Transpose", [dv], f"{rec.weight}.beats_DVt", perm=perm)
    wdt = _dtype(rec.dtype)
    if wdt == np.float32:
        eff = add("Add", [w, dv], f"{rec.weight}.beats_W")
    elif wdt.itemsize > 4:  # float64: widen the delta, never round W0 through float32
        dv = add("Cast", [dv], f"{rec.weight}.beats_DVw", dtype=wdt, to=onnx_dtype(wdt))
        eff = add("Add", [w, dv], f"{rec.weight}.beats_W", dtype=wdt)
    else:  # float16: add in float32, cast back
        onnx_dt = onnx_dtype(wdt)
        w32 = add("Cast", [w], f"{rec.weight}.beats_W0f", to=onnx.TensorProto.FLOAT)
        s = add("Add", [w32, dv], f"{rec.weight}.beats_Wf")
        eff = add("Cast", [s], f"{rec.weight}.beats_W", to=onnx_dt)
        eff.dtype = wdt if wdt.kind == "f" and wdt.itemsize == 2 and wdt == np.float16 else None
    rec.effective = eff.name
    at = {id(n): i for i, n in enumerate(graph.nodes)}  # the first reader in this graph
    first = min(at[id(n)] for n in w.outputs if id(n) in at)
    mine = {id(n) for n in new}
    for reader in list(w.outputs):
        if id(reader) in mine:
            continue
        for i, t in enumerate(reader.inputs):
            if t is w:
                reader.inputs[i] = eff
    graph.nodes[first:first] = new


def _build_branch(graph, rec: Record, uses: list[Use], c: dict, names: NameScope) -> None:
    for u in uses:
        node = u.consumer
        x = node.inputs[0]
        y = node.outputs[0]
        new: list[gs.Node] = []

        def add(op, inputs, out, **attrs):
            n, t = _node(graph, rec, names, op, inputs, out, **attrs)
            new.append(n)
            return t

        # D scales B's columns ([R, out], tiny) rather than the activations
        # ([..., out]): one elementwise op per step on R x out values instead of
        # a full-size one forward and backward.  Same delta, (A @ B) * D.
        bd = add("Mul", [c["B"], c["D"]], f"{y.name}.beats_BD")
        xa = add("MatMul", [x, c["A"]], f"{y.name}.beats_xA")
        side = add("MatMul", [xa, bd], f"{y.name}.beats_side")
        base = gs.Variable(names.fresh(f"{y.name}.beats_base"), dtype=y.dtype, shape=y.shape)
        node.outputs[0] = base
        add_node = gs.Node("Add", name=names.fresh(f"{rec.weight}.beats_Add"), inputs=[base, side], outputs=[y])
        rec.nodes.append(add_node.name)
        new.append(add_node)
        rec.renamed[base.name] = y.name
        at = index_of(graph, node) + 1
        graph.nodes[at:at] = new


# --------------------------------------------------------------------------- fold


def fold(graph: gs.Graph, records: list[Record], values: dict[str, np.ndarray] | None = None, *,
         stream: bool = False) -> list[dict]:
    """Fold every record: ``W0 + D (.) V`` under W0's name, inserted nodes and
    tensors removed.  ``values`` overrides the D/V tensors stored in the graph
    (trained values from a file).  ``stream``: a W0 still in its external data
    file is not read here: where the delta is provably zero (``zero_delta``:
    an untrained insert) W0 itself is kept, so the writer copies its bytes;
    otherwise its folded weight becomes a ``FoldedValues`` (computed block by
    block when the model is written), and full-size D/V kept in external data
    are read a block at a time.  Returns one entry per folded weight: its name
    and ``max_abs_delta``, which for a ``FoldedValues`` is None until the
    weight is computed (the model written or loaded)."""
    tensors = graph.tensors()
    folded = []
    for rec in records:
        vals = {}
        for name in rec.trainable:
            if values is not None and name in values:
                vals[name] = np.asarray(values[name])
            else:
                t = tensors.get(name)
                if not is_const(t):
                    raise ReparamError(f"trained tensor {name!r} of weight {rec.weight!r} is neither in the model nor in the values")
                full_size = name == rec.V or (name == rec.D and rec.factorization == "full")
                rows = external_rows(t) if stream and full_size else None
                vals[name] = rows if rows is not None else const_value(t)
        _check_shapes(rec, vals)
        w = _weight_of(tensors, rec)
        w0 = external_rows(w) if stream else None
        entry = {"weight": rec.weight, "max_abs_delta": 0.0}
        if w0 is not None and zero_delta(rec, vals):
            new_w = w  # W0's bytes, copied from its data file as they are when the model is written
        elif w0 is not None and int(np.prod(w0.shape)) > 0:
            entry["max_abs_delta"] = None  # set as the folded weight is computed (written)
            new_w = gs.Constant(rec.weight, FoldedValues(rec, w0, vals, entry))
        else:
            vals = {k: (v[0:v.shape[0]] if isinstance(v, ExternalRows) else v) for k, v in vals.items()}
            new_value, entry["max_abs_delta"] = apply_delta(rec, const_value(w), vals)
            new_w = _as_constant(rec.weight, new_value)
            del new_value
        _remove_inserted(graph, rec, w, new_w, tensors)
        folded.append(entry)
    return folded


def _as_constant(name: str, value: np.ndarray) -> gs.Constant:
    """A large folded weight is kept as its serialized tensor only (the form
    export writes), not as an array plus a serialized copy."""
    if value.nbytes <= 1 << 20 and value.dtype in (np.float16, np.float32, np.float64):
        return gs.Constant(name, value)
    try:
        tensor = onnx.numpy_helper.from_array(value, name)
    except ValueError:  # onnx < 1.18 cannot take ml_dtypes arrays: write the bits
        tensor = onnx.helper.make_tensor(name, onnx_dtype(value.dtype), value.shape,
                                         np.ascontiguousarray(value).tobytes(), raw=True)
    return gs.Constant(name, LazyValues(tensor))


def _check_shapes(rec: Record, vals: dict[str, np.ndarray]) -> None:
    want = shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)
    for key in ("D", "V", "A", "B"):
        name = getattr(rec, key)
        if name and tuple(np.shape(vals[name])) != tuple(want[key]):
            raise ReparamError(f"{name!r} has shape {list(np.shape(vals[name]))}, expected {list(want[key])}")


def _weight_of(tensors: dict, rec: Record) -> gs.Constant:
    """The record's weight, checked against the record (an adapter may be
    applied to a model it was not made for)."""
    w = tensors.get(rec.weight)
    if not is_const(w):
        raise ReparamError(f"weight {rec.weight!r} is not an initializer of the model")
    if [int(d) for d in w.shape] != list(rec.shape):
        raise ReparamError(f"weight {rec.weight!r} has shape {[int(d) for d in w.shape]}, "
                           f"the reparameterization record expects {list(rec.shape)}")
    return w


def _remove_inserted(graph: gs.Graph, rec: Record, w_old: gs.Constant, w_new: gs.Constant,
                     tensors: dict[str, gs.Tensor]) -> None:
    """``tensors``: the graph's tensors by name before the fold (this record's
    inserted tensors are still those; a map rebuilt per record is quadratic)."""
    ids = set(rec.nodes)
    inserted = [n for n in graph.nodes if n.name in ids]
    if not inserted:  # a base model and an adapter: only the weight changes
        replace_uses(w_old, w_new)
        return
    if len(inserted) != len(ids):
        missing = ids - {n.name for n in inserted}
        raise ReparamError(f"weight {rec.weight!r}: inserted nodes {', '.join(sorted(missing))} are missing from the model")
    if rec.layout == "weight":
        eff = tensors.get(rec.effective)
        if eff is None:
            raise ReparamError(f"weight {rec.weight!r}: effective tensor {rec.effective!r} is missing")
        replace_uses(eff, w_new)
    for base_name, orig_name in rec.renamed.items():
        base, orig = tensors.get(base_name), tensors.get(orig_name)
        if base is None or orig is None:
            raise ReparamError(f"weight {rec.weight!r}: branch output {orig_name!r} is missing")
        prod = producer(base)
        for n in inserted:
            n.inputs.clear()
            n.outputs.clear()
        idx = [i for i, t in enumerate(prod.outputs) if t is base][0]
        prod.outputs[idx] = orig
    for n in inserted:
        n.inputs.clear()
        n.outputs.clear()
    replace_uses(w_old, w_new)
    graph.nodes = [n for n in graph.nodes if n.name not in ids]


def unfold(graph: gs.Graph, records: list[Record], values: dict[str, np.ndarray]) -> list[Record]:
    """Re-insert D/V with ``values`` into a folded model: each weight becomes
    ``W0 = W - D (.) V`` again, so ``W0 + D (.) V`` is the folded weight."""
    tensors = graph.tensors()
    for rec in records:
        w = _weight_of(tensors, rec)
        missing = [n for n in rec.trainable if n not in values]
        if missing:
            raise ReparamError(f"no value for {', '.join(missing)}")
        _check_shapes(rec, values)
        w0 = gs.Constant(rec.weight, apply_delta(rec, const_value(w), values, sign=-1)[0])
        replace_uses(w, w0)
    return reinsert(graph, records, values)


def reinsert(graph: gs.Graph, records: list[Record], values: dict[str, np.ndarray]) -> list[Record]:
    """Insert D/V with the given ``values`` and the records' names and shapes,
    keeping each weight as it is (it becomes W0)."""
    fresh = [Record(weight=r.weight, shape=r.shape, dtype=r.dtype, factorization=r.factorization, rank=r.rank,
                    layout=r.layout, axis=r.axis, D=r.D, V=r.V, A=r.A, B=r.B) for r in records]
    out, stats = insert(graph, Policy(), [], values=values, only={r.weight: r for r in fresh})
    missing = {r.weight for r in records} - {r.weight for r in out}
    if missing:
        raise ReparamError(f"cannot re-insert {', '.join(sorted(missing))}: "
                           + "; ".join(f"{k}: {v}" for k, v in stats.skipped.items() if k in missing))
    return out
