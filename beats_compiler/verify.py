"""Numerical verification of a compiled model against its original on ONNX Runtime."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from .errors import InputError, short_message
from passes.convert import uses_external_refs
from passes.graph import is_computed_ref
from passes.tensors import tensor_nbytes

from .inputs import InputGenerator
from .io import needs_external_data, save_model
from .wire import model_bytes
from .runner import (DEFAULT_BUDGET, FeedSession, NotRunnable, available_memory, external_range, graph_level,
                     weight_bytes)

# fp32 defaults: kernels may differ after fusion (Conv+BN, MatMul+Add->Gemm)
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
# Models with more weight bytes than this are verified one model at a time,
# their weights fed from their files (``runner.FeedSession``): two ORT sessions
# that own their weights need several times the model's memory.
ONE_AT_A_TIME_FROM = 1 << 30
# Past this many weight bytes the default check is partial (``scope="auto"``):
# the outputs that need the first 2 x ``memory_budget`` bytes of weights, run on a
# copy truncated to what they need, plus the weights compared tensor by tensor.
# Running a 7B decoder twice in full takes minutes (``scope="full"`` does it).
PARTIAL_FROM = 4 << 30
SCOPES = ("auto", "full", "partial")

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
    inputs: dict[str, list[int]] = field(default_factory=dict)  # the shapes of the inputs used
    input_source: str = "generated"
    # how each generated input was made (``inputs.InputGenerator.describe``); empty for the user's
    generated: dict[str, str] = field(default_factory=dict)
    # how the two models were run: "side by side" (two sessions, latency timed) or
    # "one at a time, ..." (runner.FeedSession: sequential, in segments when large)
    method: str = "side by side"
    # run one at a time because two sessions side by side would not fit (the culprit
    # search, which holds both, is then skipped)
    too_large: bool = False


def quiet_session_options():
    """ONNX Runtime session options that log only fatal errors: its own log lines on
    stderr would break the one-line errors the CLI prints."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    return so


class Session:
    """An ORT CPU session on a model given as a path or in memory.  An
    in-memory model over 2 GB is written to the system temp folder, which is
    removed on close."""

    def __init__(self, model: onnx.ModelProto | None, path: Path | None, optimize: bool | str = True,
                 base_dir: Path | None = None):
        import onnxruntime as ort

        self._tmp: str | None = None
        so = quiet_session_options()
        so.graph_optimization_level = graph_level(optimize)
        if path is not None:
            src: Any = str(path)
        elif needs_external_data(model) or uses_external_refs(model):
            self._tmp = tempfile.mkdtemp(prefix="beats-verify-")
            src = str(save_model(model, Path(self._tmp) / "model.onnx", external_data=True, base_dir=base_dir).path)
        else:
            src = model_bytes(model)  # the weights joined, not encoded through protobuf
        self.sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

    def close(self) -> None:
        self.sess = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def compare(name: str, a: Any, b: Any, rtol: float, atol: float) -> OutputDiff:
    """``a`` from the original, ``b`` from the result."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
            return OutputDiff(name, False, float("inf"), float("inf"), "sequence length differs")
        parts = [compare(name, x, y, rtol, atol) for x, y in zip(a, b)]
        return _merge(name, parts)
    if isinstance(a, dict) or isinstance(b, dict):
        if not isinstance(a, dict) or not isinstance(b, dict) or set(a) != set(b):
            return OutputDiff(name, False, float("inf"), float("inf"), "map keys differ")
        return _merge(name, [compare(name, a[k], b[k], rtol, atol) for k in a])
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


def time_alternating(s1, s2, feeds, budget_s: float, max_runs: int, run_options2=None) -> tuple[float, float]:
    """Median ms of ``s1`` and ``s2`` run in turn on ``feeds`` (``s2`` with
    ``run_options2``, e.g. an active adapter) until ``max_runs`` or the budget."""
    t1: list[float] = []
    t2: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max_runs):
        for sess, bucket, ro in ((s1, t1, None), (s2, t2, run_options2)):
            t0 = time.perf_counter()
            sess.run(None, feeds, ro)
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
    optimize: bool | str = True,
    memory_budget: int | None = None,
    scope: str = "auto",
    original_model: onnx.ModelProto | None = None,
) -> Verification:
    """Run ``original`` and ``result`` on the same inputs and compare every output.

    ``optimize``: ONNX Runtime's graph optimizations for both sessions (True: all,
    "extended": without the CPU-only layout level, False: none); models run one at
    a time because of their size always run with none (their fused kernels'
    rounding would depend on where a segment ends); without ``measure_latency``
    both run at ORT's basic level (True means the deployment level, which only a
    latency measurement needs).

    ``original_model``: the original already in memory when ``original`` is
    given by path (weights-fed runs use it instead of reading the file again).
    ``memory_budget``: weight bytes per segment when the models are run one at
    a time (see ``_one_at_a_time``); given, the models are always run so.
    ``scope``: "full" runs every output, "partial" the outputs that need the
    first 2 x ``memory_budget`` bytes of weights (plus a tensor-by-tensor weight
    comparison), "auto" partial past ``PARTIAL_FROM`` bytes of weights.

    Raises ``InputError`` when the original itself cannot run on ONNX Runtime
    (nothing can then be proved), when user inputs do not fit the model, or
    when even one segment of the model would not fit in the memory available.
    """
    if scope not in SCOPES:
        raise ValueError(f"verification scope {scope!r}: one of {', '.join(SCOPES)}")
    one_at_a_time = _one_at_a_time(original, original_path, result, memory_budget, scope)
    ref_model = original if original is not None else original_model
    if one_at_a_time is not None:
        budget, partial = one_at_a_time
        # ORT's own rewrites off: its fused kernels (layer norms, GELU, attention) round
        # differently from the ops they replace, and which of them a segment gets depends on
        # where it ends, so two models cut in different places would differ by that
        # rounding (a float16 decoder: 1e-3).  Each op runs as its graph says.
        ver = _verify_one_at_a_time(ref_model, original_path, result, base_dir, budget, inputs, rtol, atol, seed,
                                    False, partial)
        ver.too_large = True
        return ver
    if optimize is True and not measure_latency:
        # Sessions at the deployment level only when their speed is measured: ORT's
        # layout and fusion levels are not what is being checked, and optimizing both
        # models, or handing ORT their weights to copy, costs about what ORT's whole
        # offline optimization does.  So: one at a time, weights fed, ORT's basic level
        # (constant folding of what is not fed: a float16 weight computed from small
        # constants then meets the same MatMul kernel as its folded twin); a graph the
        # feeds cannot run goes side by side.
        try:
            return _verify_one_at_a_time(ref_model, original_path, result, base_dir, DEFAULT_BUDGET, inputs, rtol,
                                         atol, seed, "basic", fallback=True)
        except NotRunnable:
            optimize = "basic"
    try:
        s_orig = Session(original, original_path, base_dir=base_dir, optimize=optimize)
    except Exception as exc:
        raise InputError(f"cannot verify: ONNX Runtime cannot load the original model ({short_message(exc)}); use --no-verify to skip") from None
    try:
        s_new = Session(result, None, base_dir=base_dir, optimize=optimize)
    except Exception as exc:
        s_orig.close()
        return Verification(False, float("inf"), float("inf"), rtol, atol,
                            [OutputDiff("<session>", False, float("inf"), float("inf"),
                                        f"ONNX Runtime cannot load the compiled model: {short_message(exc)}")],
                            None, None)
    try:
        gen = None
        if inputs is None:
            gen = InputGenerator(s_orig.sess.get_inputs(), _analysis_model(original, original_path, result), seed)
        return _verify_sessions(s_orig.sess, s_new.sess, inputs, rtol, atol, measure_latency, latency_budget_s,
                                latency_runs, seed, generator=gen)
    finally:
        s_orig.close()
        s_new.close()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _one_at_a_time(original, original_path, result, memory_budget: int | None,
                   scope: str = "auto") -> tuple[int, bool] | None:
    """``(weight budget per segment, partial)`` when the two models are to be
    run one at a time with their weights fed (``runner.FeedSession``), else
    None (two ordinary sessions side by side, as for every model up to 1 GiB).
    Two sessions that own their weights need about three times each model (ORT
    copies weights it optimizes, casts, prepacks): past what is available, or
    past ``ONE_AT_A_TIME_FROM``, or when a budget or a scope is given, one at a
    time."""
    size = weight_bytes(result)
    need = _side_by_side_need(result)
    if original is not None:
        size = max(size, weight_bytes(original))
    # the original given by its path only: counted as the result's size
    need += _side_by_side_need(original) if original is not None else need
    avail = available_memory()
    if (memory_budget is None and scope == "auto" and size <= ONE_AT_A_TIME_FROM
            and (avail is None or need <= avail)):
        return None
    partial = scope == "partial" or (scope == "auto" and size > PARTIAL_FROM)
    return (int(memory_budget) if memory_budget is not None else DEFAULT_BUDGET), partial


_SIXTEEN_BIT_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _side_by_side_need(model: onnx.ModelProto) -> int:
    """What one ordinary ORT session of ``model`` may hold: three times its
    weights (its copy, the copies its optimizer makes when it folds or
    transposes a weight, prepacked kernels), a 16-bit float weight counted at
    its float32 size as well (ORT's CPU kernels take many ops in float32 only,
    and the inserted ``W0 + D * V`` of a float16 model is folded and cast).
    Measured: a 1-layer 7B-shaped float16 model after insert, 0.87 GiB of
    weights, peaked at 7.2 GB side by side (three times 2.6 GiB each)."""
    sixteen = sum(tensor_nbytes(t, external_length=True) or 0 for t in model.graph.initializer
                  if t.data_type in _SIXTEEN_BIT_FLOATS)
    return 3 * (weight_bytes(model) + 2 * sixteen)


def _feed_session(model, base_dir, budget, optimize, what: str, outputs=None, fallback=False) -> FeedSession:
    try:
        return FeedSession(model, base_dir, budget=budget, optimize=optimize, outputs=outputs)
    except NotRunnable as exc:
        if fallback:
            raise
        raise InputError(f"cannot verify the {what} model one segment at a time ({exc}); "
                         f"use --no-verify to skip") from None


def _check_fits(sessions: list[FeedSession]) -> None:
    """Stop with one line, before any ORT session starts, when the largest
    segment would not fit: its weights, plus the float32 copies ORT makes of
    16-bit weights its CPU kernels do not take (capped at two of the segment's
    largest weight: casts run one node at a time), plus 256 MB for activations."""
    avail = available_memory()
    if avail is None:
        return
    need = 0
    for fs in sessions:
        for seg in fs.segments:
            extra = sum(2 * fs.weights[w] for w in seg.weights if fs.inits[w].data_type in _SIXTEEN_BIT_FLOATS)
            need = max(need, seg.weight_bytes + min(extra, 2 * max((fs.weights[w] for w in seg.weights), default=0)))
    need += 256 << 20
    if need > avail:
        raise InputError(f"cannot verify: the largest part of the model needs about {_gib(need)} and "
                         f"{_gib(avail)} is available; use --verify-memory to run smaller parts, or --no-verify")


def _partial_outputs(fs: FeedSession, budget: int) -> tuple[list[str], int]:
    """The outputs whose computation needs the fewest weights, as many as fit
    ``budget`` bytes of weights together (at least one), and those bytes."""
    anc = fs.ancestor_weights()
    chosen: list[str] = []
    union: dict[str, int] = {}
    for name, ws in sorted(anc.items(), key=lambda kv: sum(kv[1].values())):
        merged = {**union, **ws}
        if chosen and sum(merged.values()) > budget:
            continue
        chosen.append(name)
        union = merged
    return chosen, sum(union.values())


def compare_weights(ref: onnx.ModelProto, ref_dir, result: onnx.ModelProto, res_dir) -> dict[str, list[str]]:
    """The result's initializers against the reference's of the same name, by
    name: ``same`` (the same bytes: the same range of the same data file, or
    equal bytes), ``changed`` (different dtype, shape or bytes), ``recomputed``
    (computed as the model is written: not compared here), ``new`` (no
    initializer of that name in the reference)."""
    refs = {t.name: t for t in ref.graph.initializer}
    out: dict[str, list[str]] = {"same": [], "changed": [], "recomputed": [], "new": []}
    for t in result.graph.initializer:
        r = refs.get(t.name)
        if r is None:
            kind = "new"
        elif r.data_type != t.data_type or list(r.dims) != list(t.dims):
            kind = "changed"
        elif is_computed_ref(t):
            kind = "recomputed"
        else:
            where_r, where_t = external_range(r, ref_dir), external_range(t, res_dir)
            same_place = where_t is not None and where_r is not None and (
                os.path.realpath(where_t[0]), where_t[1:]) == (os.path.realpath(where_r[0]), where_r[1:])
            kind = "same" if same_place or _same_bytes(r, ref_dir, t, res_dir) else "changed"
        out[kind].append(t.name)
    return out


_BLOCK = 64 << 20


def _blocks(t: onnx.TensorProto, folder):
    """``t``'s stored bytes, 64 MiB at a time (an inline tensor's as one block)."""
    where = external_range(t, folder)
    if where is None:
        yield t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
        return
    path, offset, left = where
    with open(path, "rb") as f:
        f.seek(offset)
        while left is None or left > 0:
            blk = f.read(_BLOCK if left is None else min(_BLOCK, left))
            if not blk:
                return
            if left is not None:
                left -= len(blk)
            yield blk


def _same_bytes(a: onnx.TensorProto, a_dir, b: onnx.TensorProto, b_dir) -> bool:
    """Whether two tensors of one dtype and shape hold the same bytes, read a
    block at a time (equal values stored as raw_data and as typed fields count
    as the same)."""
    try:
        if a.data_location != onnx.TensorProto.EXTERNAL and b.data_location != onnx.TensorProto.EXTERNAL:
            return a.SerializeToString() == b.SerializeToString() or np.array_equal(
                onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
        return b"".join(_blocks(a, a_dir)) == b"".join(_blocks(b, b_dir)) if max(
            tensor_nbytes(a, external_length=True) or 0, tensor_nbytes(b, external_length=True) or 0) <= _BLOCK \
            else all(x == y for x, y in zip(_blocks(a, a_dir), _blocks(b, b_dir)))
    except (OSError, ValueError):
        return False


def _verify_one_at_a_time(original, original_path, result, base_dir, budget, inputs, rtol, atol, seed, optimize,
                          partial: bool = False, fallback: bool = False):
    """``fallback``: a graph the feeds cannot run raises ``NotRunnable`` (the caller
    then runs two ordinary sessions) instead of an ``InputError``."""
    if original is None:
        try:
            ref = onnx.load(str(original_path), load_external_data=False)
        except Exception as exc:
            raise InputError(f"cannot verify: cannot read the original model ({short_message(exc)})") from None
        ref_dir = Path(original_path).parent
    else:
        ref, ref_dir = original, base_dir
    outputs = None
    if partial:
        probe = _feed_session(ref, ref_dir, budget, optimize, "original")
        outputs, covered = _partial_outputs(probe, 2 * budget)
        del probe
    s_orig = _feed_session(ref, ref_dir, budget, optimize, "original", outputs, fallback)
    s_new = _feed_session(result, base_dir, budget, optimize, "compiled", outputs, fallback)
    _check_fits([s_orig, s_new])
    gen = None if inputs is not None else InputGenerator(s_orig.get_inputs(), ref, seed)
    if inputs is not None and outputs is not None:
        # the truncated copy reads only some inputs: feed it those
        used = {a.name for a in s_orig.get_inputs()}
        inputs = {k: v for k, v in inputs.items() if k in used or k not in {vi.name for vi in ref.graph.input}}
    try:
        ver = _verify_sessions(s_orig, s_new, inputs, rtol, atol, False, 0.0, 0, seed, generator=gen)
    except (InputError, NotRunnable):
        raise
    except Exception as exc:  # the original fails in a segment
        raise InputError(f"cannot verify: the original model fails on ONNX Runtime ({short_message(exc)}); "
                         "use --no-verify to skip") from None
    parts = max(len(s_orig.segments), len(s_new.segments))
    how = ("one at a time, weights fed as inputs"
           + (f", in {parts} segments of at most {_gib(max(s_orig.largest_segment, s_new.largest_segment))} "
              f"of weights" if parts > 1 else ""))
    if outputs is None:
        ver.method = how
    else:
        total = max(weight_bytes(ref), 1)
        w = {k: len(v) for k, v in compare_weights(ref, ref_dir, result, base_dir).items()}
        shown = ", ".join(outputs[:4]) + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "")
        ver.method = (f"partially: {len(outputs)} of {len(ref.graph.output)} outputs ({shown}), which need "
                      f"{100 * covered / total:.0f}% of the weights, on a copy truncated to what they need, {how}; "
                      f"weights: {w['same']} identical to the original's bytes, {w['changed']} changed, "
                      f"{w['recomputed']} recomputed, {w['new']} new (--verify-scope full runs every output)")
    return ver


_ANALYSIS_FILE_LIMIT = 64 << 20  # re-read an original given by path for analysis up to this size


def _analysis_model(original, original_path, result) -> onnx.ModelProto:
    """The graph whose use of each input decides the generated values: the original
    (re-read without external data when only its path is at hand and it is small),
    else the result (the same function, the same inputs)."""
    if original is not None:
        return original
    if original_path is not None:
        try:
            if Path(original_path).stat().st_size <= _ANALYSIS_FILE_LIMIT:
                return onnx.load(str(original_path), load_external_data=False)
        except Exception:
            pass
    return result


def _finite(outputs) -> bool:
    for o in outputs:
        if isinstance(o, (list, tuple)):
            if not _finite(o):
                return False
        elif isinstance(o, dict):
            if not _finite(list(o.values())):
                return False
        else:
            a = np.asarray(o)
            if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
                return False
    return True


def pick_generated(so, generator: InputGenerator):
    """The first candidate input set (see ``InputGenerator.candidates``) on which the
    original session runs with finite outputs, else the first on which it runs at
    all: ``(candidate, expected outputs)``.  ``InputError`` (one line, naming an input)
    when it fails on every candidate."""
    errors: list[str] = []
    fallback = None
    for cand in generator.candidates():
        try:
            out = so.run(None, cand.feeds)
        except NotRunnable:
            raise
        except Exception as exc:
            errors.append(" ".join(str(exc).split()))
            continue
        if _finite(out):
            return cand, out
        if fallback is None:
            fallback = (cand, out)
    if fallback is not None:
        fallback[0].notes.append("outputs not finite on any generated input")
        return fallback
    raise generator.failure(errors)


def _shapes(feeds) -> dict[str, list[int]]:
    return {k: list(np.shape(v)) for k, v in feeds.items()}


def check_inputs_match(names: list[str], inputs: Mapping[str, Any], also=()) -> None:
    """``InputError`` unless ``inputs`` has exactly the model inputs ``names``
    (plus, optionally, names in ``also``: overridable initializers)."""
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names and n not in also]
    if missing or extra:
        raise InputError(
            "inputs file does not match the model: "
            + (f"missing {', '.join(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unknown {', '.join(extra)}" if extra else "")
            + f" (model inputs: {', '.join(names)})"
        )


def _verify_sessions(so, sn, inputs, rtol, atol, measure_latency, budget, runs, seed,
                     bounds: Mapping[str, int] | None = None, generator: InputGenerator | None = None) -> Verification:
    names = [i.name for i in so.get_inputs()]
    extra_run = None
    if inputs is not None:
        check_inputs_match(names, inputs, also=_overridable(so))
        feeds = dict(inputs)
        try:
            expected = so.run(None, feeds)
        except Exception as exc:
            raise InputError(f"cannot verify: the original model fails on ONNX Runtime with these inputs "
                             f"({short_message(exc)}); pass --inputs or use --no-verify") from None
        input_source, described = "user", {}
    else:
        if generator is None:
            generator = InputGenerator(so.get_inputs(), None, seed)
        cand, expected = pick_generated(so, generator)
        feeds, input_source = cand.feeds, "generated"
        note = None
        zero = generator.zero_past(cand)
        if zero is not None:
            try:
                zero_expected = so.run(None, zero.feeds)
                extra_run = (zero, zero_expected)
                note = ", ".join(zero.zero) + " = 0 also verified (empty KV cache)"
            except Exception as exc:
                note = ", ".join(zero.zero) + f" = 0 not verified: the original fails ({short_message(exc, 80)})"
        described = generator.describe(cand, note)
        if cand.notes:
            described["<note>"] = "; ".join(filter(None, [described.get("<note>")] + cand.notes))
    shapes = _shapes(feeds)
    out_names = [o.name for o in so.get_outputs()]
    try:
        got = sn.run(out_names, feeds)
    except NotRunnable:
        raise
    except Exception as exc:
        diff = OutputDiff("<run>", False, float("inf"), float("inf"), f"compiled model fails on ONNX Runtime: {short_message(exc)}")
        return Verification(False, float("inf"), float("inf"), rtol, atol, [diff], None, None, shapes, input_source,
                            described)
    diffs = [compare(n, a, b, rtol, atol) for n, a, b in zip(out_names, expected, got)]
    if extra_run is not None:
        zero, zero_expected = extra_run
        label = ", ".join(zero.zero) + " = 0"
        try:
            zero_got = sn.run(out_names, zero.feeds)
            more = [compare(n, a, b, rtol, atol) for n, a, b in zip(out_names, zero_expected, zero_got)]
        except Exception as exc:
            more = [OutputDiff(n, False, float("inf"), float("inf"), f"compiled model fails on ONNX Runtime: "
                                                                       f"{short_message(exc)}") for n in out_names]
        for d in more:
            if d.detail:
                d.detail = f"{d.detail} (with {label})"
            elif not d.ok:
                d.detail = f"with {label}"
        diffs = [_merge(d.name, [d, m]) for d, m in zip(diffs, more)]
    ok = all(d.ok for d in diffs)
    lat_b = lat_a = None
    if measure_latency:
        lat_b, lat_a = time_alternating(so, sn, feeds, budget, runs)
    return Verification(
        verified=ok,
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        max_rel_diff=max((d.max_rel_diff for d in diffs), default=0.0),
        rtol=rtol,
        atol=atol,
        outputs=diffs,
        latency_ms_before=lat_b,
        latency_ms_after=lat_a,
        inputs=shapes,
        input_source=input_source,
        generated=described,
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
