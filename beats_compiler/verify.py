"""Numerical verification of a compiled model against its original on ONNX Runtime."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .errors import InputError
from passes.convert import uses_external_refs

from .io import needs_external_data, save_model

# fp32 defaults: kernels may differ after fusion (Conv+BN, MatMul+Add->Gemm)
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4

_ORT_TYPES = {
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


@dataclass
class OutputDiff:
    name: str
    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    detail: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "ok": self.ok,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "detail": self.detail,
        }


@dataclass
class Verification:
    verified: bool
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    outputs: list[OutputDiff]
    latency_ms_before: float | None
    latency_ms_after: float | None
    inputs: dict[str, list[int]] = field(default_factory=dict)
    input_source: str = "generated"

    def failed_outputs(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.ok]


def quiet_session_options():
    """ONNX Runtime session options that log only fatal errors: its own log lines on
    stderr would break the one-line errors the CLI prints."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    return so


class _Session:
    """An ORT CPU session on a model given as a path or in memory.  An
    in-memory model over 2 GB is written to the system temp folder, which is
    removed on close."""

    def __init__(self, model: onnx.ModelProto | None, path: Path | None, optimize: bool = True,
                 base_dir: Path | None = None):
        import onnxruntime as ort

        self._tmp: str | None = None
        so = quiet_session_options()
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if path is not None:
            src: Any = str(path)
        elif needs_external_data(model) or uses_external_refs(model):
            self._tmp = tempfile.mkdtemp(prefix="beats-verify-")
            src = str(save_model(model, Path(self._tmp) / "model.onnx", external_data=True, base_dir=base_dir).path)
        else:
            src = model.SerializeToString()
        self.sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

    def close(self) -> None:
        self.sess = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _bind_dims(inputs, sizes: Sequence[int]) -> dict[str, list[int]]:
    symbols: dict[str, int] = {}
    shapes = {}
    for inp in inputs:
        dims = []
        for d in inp.shape:
            if isinstance(d, int) and d >= 0:
                dims.append(d)
            else:
                key = d if isinstance(d, str) and d else f"?{len(symbols)}"
                if key not in symbols:
                    symbols[key] = sizes[min(len(symbols), len(sizes) - 1)]
                dims.append(symbols[key])
        shapes[inp.name] = dims
    return shapes


# Ops whose first input reaches their output element for element (indices stay indices).
_INDEX_PASS_THROUGH = frozenset("Cast Unsqueeze Squeeze Reshape Flatten Identity Expand Slice Transpose".split())


def integer_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input used as Gather/GatherElements indices (directly or
    through reshapes and casts), the size of the smallest table axis it indexes: generated
    inputs stay below it (token ids of an embedding, BERT's 2-row token_type_ids)."""
    g = model.graph
    dims: dict[str, list] = {t.name: list(t.dims) for t in g.initializer}
    for vi in list(g.value_info) + list(g.input):
        tt = vi.type.tensor_type
        if vi.name not in dims and vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    readers: dict[str, list] = {}
    for node in g.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))
    bounds: dict[str, int] = {}
    for inp in g.input:
        elem = inp.type.tensor_type.elem_type
        if not elem or np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).kind not in "iu":
            continue
        todo, seen, best = [inp.name], set(), None
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for node, slot in readers.get(t, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in ("Gather", "GatherElements") and slot == 1:
                    table = dims.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if table and -len(table) <= axis < len(table) and isinstance(table[axis], int) and table[axis] > 0:
                        best = table[axis] if best is None else min(best, table[axis])
                elif node.op_type in _INDEX_PASS_THROUGH and slot == 0:
                    todo.extend(o for o in node.output if o)
        if best is not None:
            bounds[inp.name] = best
    return bounds


def _random(dtype, shape, rng: np.random.Generator, high: int = 4) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, max(1, high), size=shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "US":
        return np.full(shape, "a", dtype=object)
    raise InputError(f"cannot generate inputs of type {dt}")


def generate_inputs(sess, sizes: Sequence[int], seed: int = 0,
                    bounds: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for ``sess``: floats ~ N(0, 1), integers in 0..3 (below ``bounds[name]``
    where the model indexes a smaller table with them), symbolic dims bound to ``sizes``."""
    rng = np.random.default_rng(seed)
    shapes = _bind_dims(sess.get_inputs(), sizes)
    bounds = bounds or {}
    feeds = {}
    for inp in sess.get_inputs():
        if inp.type not in _ORT_TYPES:
            raise InputError(f"input {inp.name!r} has type {inp.type}; pass --inputs to verify this model")
        feeds[inp.name] = _random(_ORT_TYPES[inp.type], shapes[inp.name], rng, min(4, bounds.get(inp.name, 4)))
    return feeds


def _compare(name: str, a: Any, b: Any, rtol: float, atol: float) -> OutputDiff:
    """``a`` from the original, ``b`` from the result."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
            return OutputDiff(name, False, float("inf"), float("inf"), "sequence length differs")
        parts = [_compare(name, x, y, rtol, atol) for x, y in zip(a, b)]
        return _merge(name, parts)
    if isinstance(a, dict) or isinstance(b, dict):
        if not isinstance(a, dict) or not isinstance(b, dict) or set(a) != set(b):
            return OutputDiff(name, False, float("inf"), float("inf"), "map keys differ")
        return _merge(name, [_compare(name, a[k], b[k], rtol, atol) for k in a])
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return OutputDiff(name, False, float("inf"), float("inf"), f"shape {a.shape} became {b.shape}")
    if a.dtype != b.dtype:
        return OutputDiff(name, False, float("inf"), float("inf"), f"dtype {a.dtype} became {b.dtype}")
    if a.dtype.kind not in "fc":
        same = bool(np.array_equal(a, b))
        return OutputDiff(name, same, 0.0 if same else float("inf"), 0.0 if same else float("inf"), "" if same else "values differ")
    if a.size == 0:
        return OutputDiff(name, True, 0.0, 0.0)
    a64, b64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64), b.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return OutputDiff(name, False, float("inf"), float("inf"), "NaN positions differ")
    with np.errstate(invalid="ignore", over="ignore"):
        same_inf = np.isinf(a64) & (a64 == b64)
        diff = np.where(nan_a | same_inf, 0.0, np.abs(a64 - b64))
        rel = diff / np.maximum(np.abs(a64), np.finfo(np.float64).tiny)
        rel = np.where(diff == 0, 0.0, rel)
    ok = bool(np.all(diff <= atol + rtol * np.abs(np.where(np.isfinite(a64), a64, 0))))
    return OutputDiff(name, ok, float(np.max(diff)), float(np.max(rel)))


def _merge(name: str, parts: list[OutputDiff]) -> OutputDiff:
    if not parts:
        return OutputDiff(name, True, 0.0, 0.0)
    bad = [p for p in parts if not p.ok]
    return OutputDiff(
        name,
        not bad,
        max(p.max_abs_diff for p in parts),
        max(p.max_rel_diff for p in parts),
        bad[0].detail if bad else "",
    )


def _median_ms(runs: list[float]) -> float:
    return round(statistics.median(runs) * 1000.0, 4)


def _time_alternating(s1, s2, feeds, budget_s: float, max_runs: int) -> tuple[float, float]:
    t1: list[float] = []
    t2: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max_runs):
        for sess, bucket in ((s1, t1), (s2, t2)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            bucket.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(t1) >= 3:
            break
    return _median_ms(t1), _median_ms(t2)


def verify(
    original: onnx.ModelProto | None,
    result: onnx.ModelProto,
    *,
    original_path: Path | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    measure_latency: bool = True,
    latency_budget_s: float = 2.0,
    latency_runs: int = 50,
    seed: int = 0,
    base_dir: Path | None = None,
) -> Verification:
    """Run ``original`` and ``result`` on the same inputs and compare every output.

    Raises ``InputError`` when the original itself cannot run on ONNX Runtime
    (nothing can then be proved) or when user inputs do not fit the model.
    """
    try:
        s_orig = _Session(original, original_path, base_dir=base_dir)
    except Exception as exc:
        raise InputError(f"cannot verify: ONNX Runtime cannot load the original model ({short_message(exc)}); use --no-verify to skip") from None
    try:
        s_new = _Session(result, None, base_dir=base_dir)
    except Exception as exc:
        s_orig.close()
        return Verification(False, float("inf"), float("inf"), rtol, atol,
                            [OutputDiff("<session>", False, float("inf"), float("inf"),
                                        f"ONNX Runtime cannot load the compiled model: {short_message(exc)}")],
                            None, None)
    try:
        bounds = integer_bounds(original if original is not None else result) if inputs is None else {}
        return _verify_sessions(s_orig.sess, s_new.sess, inputs, rtol, atol, measure_latency, latency_budget_s,
                                latency_runs, seed, bounds)
    finally:
        s_orig.close()
        s_new.close()


_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")
# "/onnxruntime_src/.../reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const ..., bool) "
_SOURCE_LOCATION = re.compile(r"(?:/[\w.+-]+)+\.(?:h|hpp|cc|cpp|cu|cuh):\d+ (?:[\w:~<>]+\([^()]*\)(?: const)? )?")
SHORT_LIMIT = 160


def short_message(exc: BaseException, limit: int = SHORT_LIMIT) -> str:
    """An exception's message for a one-line error: whitespace collapsed, ONNX Runtime's
    status prefix and C++ source locations dropped, cut at a word boundary."""
    text = " ".join(str(exc).split())
    text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", text)).strip()
    if len(text) > limit:
        cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
        text = cut + " ..."
    return text or type(exc).__name__


def _verify_sessions(so, sn, inputs, rtol, atol, measure_latency, budget, runs, seed,
                     bounds: Mapping[str, int] | None = None) -> Verification:
    names = [i.name for i in so.get_inputs()]
    if inputs is not None:
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names and n not in _overridable(so)]
        if missing or extra:
            raise InputError(
                "inputs file does not match the model: "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {', '.join(extra)}" if extra else "")
                + f" (model inputs: {', '.join(names)})"
            )
        candidates = [("user", dict(inputs))]
    else:
        candidates = [("generated", None)]
    feeds = None
    expected = None
    errors = []
    for source, given in candidates:
        for sizes in ((2, 3, 4, 5, 6), (2,), (1,)) if given is None else ((),):
            feeds = given if given is not None else generate_inputs(so, sizes, seed, bounds)
            try:
                expected = so.run(None, feeds)
                break
            except Exception as exc:
                errors.append(short_message(exc))
                expected = None
        if expected is not None:
            input_source = source
            break
    if expected is None:
        raise InputError(f"cannot verify: the original model fails on ONNX Runtime with these inputs ({errors[-1]}); pass --inputs or use --no-verify")
    out_names = [o.name for o in so.get_outputs()]
    try:
        got = sn.run(out_names, feeds)
    except Exception as exc:
        diff = OutputDiff("<run>", False, float("inf"), float("inf"), f"compiled model fails on ONNX Runtime: {short_message(exc)}")
        return Verification(False, float("inf"), float("inf"), rtol, atol, [diff], None, None,
                            {k: list(np.shape(v)) for k, v in feeds.items()}, input_source)
    diffs = [_compare(n, a, b, rtol, atol) for n, a, b in zip(out_names, expected, got)]
    ok = all(d.ok for d in diffs)
    lat_b = lat_a = None
    if measure_latency:
        lat_b, lat_a = _time_alternating(so, sn, feeds, budget, runs)
    return Verification(
        verified=ok,
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        max_rel_diff=max((d.max_rel_diff for d in diffs), default=0.0),
        rtol=rtol,
        atol=atol,
        outputs=diffs,
        latency_ms_before=lat_b,
        latency_ms_after=lat_a,
        inputs={k: list(np.shape(v)) for k, v in feeds.items()},
        input_source=input_source,
    )


def _overridable(sess) -> set[str]:
    try:
        return {i.name for i in sess.get_overridable_initializers()}
    except Exception:
        return set()


def load_inputs(path: str | os.PathLike, what: str = "inputs") -> dict[str, np.ndarray]:
    """Read an ``.npz`` of name -> array, as ``InputError`` on failure
    (``what`` names the file in the message: inputs, calibration, training data...)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} file not found")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz file ({short_message(exc)})") from None
