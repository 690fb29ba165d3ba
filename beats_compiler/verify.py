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

from .inputs import InputGenerator
from .io import needs_external_data, save_model

# fp32 defaults: kernels may differ after fusion (Conv+BN, MatMul+Add->Gemm)
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4

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
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif optimize == "extended":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
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
) -> Verification:
    """Run ``original`` and ``result`` on the same inputs and compare every output.

    ``optimize``: ONNX Runtime's graph optimizations for both sessions (True: all,
    "extended": without the CPU-only layout level, False: none).

    Raises ``InputError`` when the original itself cannot run on ONNX Runtime
    (nothing can then be proved) or when user inputs do not fit the model.
    """
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
